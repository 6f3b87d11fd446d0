"""Operations on tasks that the API, the console and the commands all call."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models.functions import Now

from sagas import audit
from sagas.audit import AuditAction
from sagas.definitions import CircuitBreakerPolicy, ParallelGroup, Saga, registry
from sagas.engine import apply, deadlines, decisions, reaper, requests
from sagas.engine.apply import Loaded
from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import redis
from sagas.engine.locks import LOCK_PREFIX, release_if_held_by, task_of_lock
from sagas.engine.requests import CancelOutcome
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.states import AttemptOutcome, TaskStatus

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

    Actor = AbstractBaseUser | AnonymousUser | None

MAX_KEY_LENGTH = 200


class InvalidInput(ValidationError):
    """The input, business key or correlation id of a start was rejected."""


class BusinessKeyConflict(Exception):
    """The business key is already used by a task of this saga with a different input."""

    def __init__(self, task: TaskInstance) -> None:
        super().__init__(
            f"business key {task.business_key!r} of saga {task.saga!r} is already used by "
            f"task {task.pk} with a different input"
        )
        self.task = task


def start(
    saga_name: str,
    input: Any,
    business_key: str | None = None,
    correlation_id: str | None = None,
    actor: Actor = None,
) -> tuple[TaskInstance, bool]:
    """Create a task and its steps, like ``get_or_create`` on the business key.

    Returns ``(task, created)``. Raises ``UnknownSaga``, ``InvalidInput`` (a
    ``ValidationError``, also for the saga's ``validate_input``) or ``BusinessKeyConflict``.
    """
    saga = registry.get(saga_name)
    payload = _json_object(input)
    _check_key("business_key", business_key, allow_none=True)
    _check_key("correlation_id", correlation_id, allow_none=True)
    if business_key is not None:
        # A replay returns the task it created even if validation has been tightened since.
        existing = _task_with_key(saga, business_key, payload)
        if existing is not None:
            return existing, False
    _validate(saga, payload)
    try:
        with transaction.atomic():
            return _create_task(saga, payload, business_key, correlation_id, actor), True
    except IntegrityError:
        # A concurrent start with the same key committed first: its task is the answer.
        existing = _task_with_key(saga, business_key, payload) if business_key else None
        if existing is None:
            raise
        return existing, False


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"input must be a JSON object, got {type(value).__name__}")
    try:
        # Round-trip so what is compared and stored is exactly what JSON can hold.
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        payload: dict[str, Any] = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input is not JSON-serialisable: {exc}") from None
    for string in _strings(payload):
        _check_storable("input", string)
    return payload


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_storable(name: str, text: str) -> None:
    """Postgres text and jsonb hold neither NUL characters nor lone surrogates."""
    if "\x00" in text:
        raise InvalidInput(f"{name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} contains an invalid Unicode character") from None


def _validate(saga: Saga, payload: dict[str, Any]) -> None:
    if saga.validate_input is None:
        return
    try:
        saga.validate_input(payload)
    except ValidationError as exc:
        raise InvalidInput(exc.messages) from None


def _check_key(name: str, value: Any, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-empty string")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidInput(f"{name} is longer than {MAX_KEY_LENGTH} characters")
    _check_storable(name, value)


def _task_with_key(saga: Saga, business_key: str, payload: dict[str, Any]) -> TaskInstance | None:
    task = TaskInstance.objects.filter(saga=saga.name, business_key=business_key).first()
    if task is not None and task.input != payload:
        raise BusinessKeyConflict(task)
    return task


def step_records(saga: Saga, task: TaskInstance) -> list[StepRecord]:
    """One row per top-level step, per parallel group and per branch, in declaration order."""
    levels, graph = saga.levels(), saga.dependencies()
    rows: list[StepRecord] = []

    def row(name: str, **fields: Any) -> None:
        rows.append(
            StepRecord(
                task=task,
                index=len(rows),
                name=name,
                level=levels[name],
                trace_id=task.trace_id,
                span_id=secrets.token_hex(8),
                **fields,
            )
        )

    for node in saga.nodes:
        after = list(graph[node.name])
        if isinstance(node, ParallelGroup):
            row(
                node.name,
                after=after,
                critical=node.critical,
                is_group=True,
                group_mode=node.mode,
                group_timeout_s=node.timeout_s,
                group_schedule_to_close_s=node.schedule_to_close_s,
            )
            for branch in node.branches:
                row(branch.name, group=node.name)
        else:
            row(node.name, after=after, critical=node.critical)
    return rows


def _create_task(
    saga: Saga,
    payload: dict[str, Any],
    business_key: str | None,
    correlation_id: str | None,
    actor: Actor,
) -> TaskInstance:
    task = TaskInstance.objects.create(
        saga=saga.name,
        input=payload,
        business_key=business_key,
        correlation_id=correlation_id or str(uuid.uuid4()),
        trace_id=secrets.token_hex(16),
        # On the database's clock, like every time the reaper compares.
        deadline_at=Now() + timedelta(seconds=saga.deadline_s) if saga.deadline_s else None,
    )
    StepRecord.objects.bulk_create(step_records(saga, task))
    audit.record(
        task,
        audit.AuditAction.STARTED,
        actor=actor,
        to_status=task.status,
        details={"steps": [s.name for s in saga.steps], "business_key": business_key},
    )
    # The first level is recorded now and enqueued only once this transaction commits.
    loaded = apply.load(task.pk)
    decisions.advance(loaded.plan)
    apply.apply(loaded)
    if saga.deadline_s:
        deadlines.schedule(loaded.task, saga.deadline_s)
    return loaded.task


class TaskNotFound(LookupError):
    """No task with that id."""


class ActionNotAllowed(Exception):
    """The operation does not apply to a task in its current status."""

    def __init__(self, task: TaskInstance, operation: str, allowed: tuple[str, ...]) -> None:
        super().__init__(
            f"cannot {operation} task {task.pk}: it is {task.status} "
            f"(only {', '.join(allowed)} tasks can be)"
        )
        self.task = task
        self.status = task.status


def _operate(task_id: Any, operation: Any) -> TaskInstance:
    """Decide an operator's action on the task's locked rows (``requests``)."""
    pk = _uuid_or_none(task_id)
    if pk is None or not TaskInstance.objects.filter(pk=pk).exists():
        raise TaskNotFound(f"no task {task_id}")

    def decide(loaded: Loaded) -> TaskInstance:
        try:
            operation(loaded)
        except requests.NotAllowed as refused:
            loaded.plan.effects.clear()
            raise ActionNotAllowed(loaded.task, refused.operation, refused.allowed) from None
        return loaded.task

    return apply.decide(pk, decide)


def _require_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} is required")
    return value.strip()


def resolve(task_id: Any, actor: Actor, note: str) -> TaskInstance:
    """Close a parked task by hand (after fixing things outside); the note is mandatory."""
    note = _require_text("note", note)
    return _operate(task_id, lambda loaded: requests.resolve(loaded.plan, actor, note))


def retry_compensation(task_id: Any, actor: Actor, reason: str) -> TaskInstance:
    """Run the failed compensations again, each with a fresh retry budget."""
    reason = _require_text("reason", reason)
    return _operate(task_id, lambda loaded: requests.retry_compensation(loaded.plan, actor, reason))


def redrive(task_id: Any, actor: Actor, reason: str) -> TaskInstance:
    """Retry exactly the work that dead-lettered the task, with a fresh retry budget."""
    reason = _require_text("reason", reason)

    def operation(loaded: Loaded) -> None:
        requests.redrive(loaded.plan, actor, reason, _parked_by(loaded.task))

    return _operate(task_id, operation)


def _parked_by(task: TaskInstance) -> list[str] | None:
    """The steps the task's latest ``dead_lettered`` entry names (None before they were)."""
    entry = (
        AuditEntry.objects.filter(task=task, action=AuditAction.DEAD_LETTERED)
        .order_by("-created_at", "-id")
        .values_list("details", flat=True)
        .first()
    )
    steps = entry.get("steps") if isinstance(entry, dict) else None
    return [str(s) for s in steps] if isinstance(steps, list) else None


def cancel(task_id: Any, actor: Actor = None, reason: str = "") -> CancelOutcome:
    """Cancel a task: stop its running step, then undo what succeeded (``cancelling``)."""
    pk = _uuid_or_none(task_id)
    task = TaskInstance.objects.filter(pk=pk).first() if pk else None
    if task is None:
        return CancelOutcome("not_found", "", 404)
    saga = registry.get(task.saga) if task.saga in registry else None
    if saga is not None and not saga.cancellable:
        return CancelOutcome("not_cancellable", task.status, 409, task)
    return request_cancel(task.pk, actor, reason)


def request_cancel(task_id: Any, actor: Actor, reason: str, by: str = "operator") -> CancelOutcome:
    """Decide a cancel with the task row locked, so it has exactly one winner against a
    finishing step."""

    def decide(loaded: Loaded) -> CancelOutcome:
        outcome = requests.cancel(loaded.plan, actor, reason, by)
        return CancelOutcome(outcome.outcome, outcome.status, outcome.http_status, loaded.task)

    return apply.decide(task_id, decide)


@dataclass(frozen=True)
class OperatorAction:
    """An operator's action on one task: its URL slug, permission and allowed statuses."""

    slug: str
    label: str
    permission: str
    allowed: tuple[str, ...]
    note_required: bool


OPERATOR_ACTIONS = {
    a.slug: a
    for a in (
        OperatorAction(
            "cancel", "Cancel", "sagas.cancel_taskinstance", requests.CANCELLABLE, False
        ),
        OperatorAction(
            "resolve", "Resolve", "sagas.resolve_taskinstance", requests.RESOLVABLE, True
        ),
        OperatorAction(
            "retry-compensation",
            "Retry compensation",
            "sagas.resolve_taskinstance",
            (TaskStatus.COMPENSATION_FAILED,),
            True,
        ),
        OperatorAction(
            "redrive", "Redrive", "sagas.redrive_taskinstance", (TaskStatus.DEAD_LETTERED,), True
        ),
    )
}


def available_actions(task: TaskInstance, user: Any) -> list[OperatorAction]:
    """The actions whose button a user sees on a task: permitted and allowed by its status
    (and, for cancel, by its saga). Decided again under the row lock when clicked."""
    saga = registry.get(task.saga) if task.saga in registry else None
    return [
        a
        for a in OPERATOR_ACTIONS.values()
        if task.status in a.allowed
        and user.has_perm(a.permission)
        and not (a.slug == "cancel" and saga is not None and not saga.cancellable)
    ]


def running_steps(task_id: Any) -> list[str]:
    """Names of the task's steps with an attempt running now."""
    return list(
        StepAttempt.objects.filter(step__task_id=task_id, outcome=AttemptOutcome.RUNNING)
        .order_by("step__index")
        .values_list("step__name", flat=True)
        .distinct()
    )


class NothingToDo(Exception):
    """The operator's request found nothing to change (the reason is the message)."""


def reset_breaker(name: str, actor: Actor) -> dict[str, Any]:
    """Close a circuit breaker by hand; returns the state it had (audited, task-less)."""
    policy = _declared_or_found_breaker(name)
    breaker = CircuitBreaker(redis(), policy)
    before = breaker.state()
    if before.failures == 0 and not before.open_until:
        raise NothingToDo(f"breaker {name} is already closed with no failures counted")
    breaker.reset()
    details = {"breaker": name, "failures": before.failures, "open_until": before.open_until}
    audit.record(None, AuditAction.BREAKER_RESET, actor=actor, details=details)
    return details


def _declared_or_found_breaker(name: str) -> Any:
    declared = registry.breakers().get(name)
    if declared is not None:
        return declared[0]
    # A breaker left in Redis by a step this deploy no longer has can still be reset.
    try:
        return CircuitBreakerPolicy(name)
    except ValueError:
        raise NothingToDo(f"there is no breaker named {name[:100]!r}") from None


def release_lock(lock_key: str, token: str, actor: Actor) -> None:
    """Release a task lock whose holder is gone: only if its attempt's database heartbeat
    is stale, and only if the lock still holds the token the operator saw."""
    if not lock_key.startswith(LOCK_PREFIX) or not token:
        raise InvalidInput("not a task lock")
    holder = _live_holder(token)
    if holder is not None:
        raise NothingToDo(
            f"the lock's holder is alive: attempt {holder.number} of {holder.step.name} "
            f"beat until {holder.heartbeat_expires_at:%H:%M:%S}"
        )
    if not release_if_held_by(redis(), lock_key, token):
        raise NothingToDo("the lock was already released or has a new holder")
    task_id = _uuid_or_none(task_of_lock(lock_key))
    task = TaskInstance.objects.filter(pk=task_id).first() if task_id else None
    audit.record(
        task, AuditAction.LOCK_RELEASED, actor=actor, details={"lock": lock_key, "token": token}
    )


def requeue_stuck(task_id: Any, actor: Actor, note: str = "") -> reaper.Push:
    """Push a stuck task (the design's one definition, judged again now): settle its
    attempts whose heartbeat expired as lost and enqueue what it should have queued."""
    pk = _uuid_or_none(task_id)
    task = TaskInstance.objects.filter(pk=pk).first() if pk else None
    if task is None:
        raise TaskNotFound(f"no task {task_id}")
    if not reaper.is_stuck(task.pk):
        raise NothingToDo(f"the task is no longer stuck (it is {task.status} and moving)")
    pushed = reaper.push_stuck(task.pk)
    if not (pushed.lost_attempts or pushed.jobs):
        raise NothingToDo("nothing to re-enqueue: no step of the task is waiting for a job")
    details = {"note": note, "lost_attempts": pushed.lost_attempts, "jobs": pushed.jobs}
    audit.record(task, AuditAction.TASK_REQUEUED, actor=actor, details=details)
    return pushed


def _live_holder(token: str) -> Any:
    return (
        StepAttempt.objects.filter(
            lock_token=token,
            outcome=AttemptOutcome.RUNNING,
            heartbeat_expires_at__gt=Now(),
        )
        .select_related("step")
        .first()
    )


__all__ = [
    "CancelOutcome",
    "cancel",
    "redrive",
    "release_lock",
    "requeue_stuck",
    "reset_breaker",
    "resolve",
    "retry_compensation",
    "start",
]


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        return None
