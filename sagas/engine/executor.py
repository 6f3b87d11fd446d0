"""The RQ job: one attempt of one step's action or compensation, fenced end to end.

run_step -> lock the task (or branch) -> admit (database state, breaker, claim) ->
record the attempt as running -> run the body with heartbeat and timeout -> settle the
attempt (only if it is still the current one) -> decide what happens next (``flow``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.models.functions import Now
from django.utils import timezone
from redis.exceptions import RedisError
from rq import get_current_job

from sagas import audit
from sagas.audit import AuditAction
from sagas.definitions import Saga, StepDefinition, UnknownSaga, registry
from sagas.engine import dispatch, flow, notify
from sagas.engine.breaker import Admission, CircuitBreaker
from sagas.engine.cancellation import AttemptAddress, signal_attempt
from sagas.engine.connection import redis
from sagas.engine.context import StepCancelled, StepContext
from sagas.engine.idempotency import claim, claim_name, idempotency_key
from sagas.engine.locks import Heartbeat, TaskLock, lock_key, release_if_held_by
from sagas.engine.logs import engine_logger
from sagas.engine.retry import can_retry
from sagas.engine.timeouts import StepTimedOut, exceeded, step_deadline
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import AttemptKind, AttemptOutcome, StepStatus, TaskStatus

logger = logging.getLogger("sagas.engine")

ACTION_TASK_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING_RETRY)
COMPENSATION_TASK_STATUSES = (TaskStatus.COMPENSATING, TaskStatus.CANCELLING)
ACTION_STEP_STATUSES = (StepStatus.PENDING, StepStatus.WAITING_RETRY)
COMPENSATION_STEP_STATUSES = (StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
SETTLE_TRIES = 3


@dataclass(frozen=True)
class Delivery:
    """One delivery of a step job, as RQ handed it to this worker."""

    task_id: str
    step_name: str
    kind: str
    attempt: int
    job_id: str
    worker: str

    @property
    def is_action(self) -> bool:
        return self.kind == AttemptKind.ACTION


@dataclass(frozen=True)
class Outcome:
    status: str
    data: Any = None
    error: str = ""
    traceback: str = ""


@dataclass
class Started:
    delivery: Delivery
    saga: Saga
    definition: StepDefinition
    attempt: StepAttempt
    lock: TaskLock
    trial: bool
    ctx: StepContext
    timeout_s: float | None
    log: logging.LoggerAdapter[logging.Logger] = field(repr=False)


def run_step(task_id: str, step_name: str, kind: str, attempt: int) -> None:
    """The job RQ runs. Step errors are recorded, never raised to RQ."""
    delivery = _delivery(task_id, step_name, kind, attempt)
    log = engine_logger(delivery.task_id, step=step_name, kind=kind, attempt=attempt)
    task = TaskInstance.objects.filter(pk=task_id).first()
    if task is None:
        log.warning("job for a task that does not exist; dropped")
        return
    log = engine_logger(task, step=step_name, kind=kind, attempt=attempt)
    saga, definition = _definitions(task, step_name)
    if saga is None or definition is None:
        _definition_missing(delivery, task, log)
        return
    lock = TaskLock(redis(), task.pk, saga.lock_expiry_s, scope=lock_scope(saga, step_name))
    if not lock.acquire():
        _requeue_for_lock(delivery, definition, log)
        return
    try:
        started = _begin(delivery, saga, definition, lock, log)
        if started is None:
            return
        outcome = _perform(started)
        # The body is done: free the lock before settling, so the next step's job (enqueued
        # when the settle commits) does not find it held. The settle is fenced in the DB.
        lock.release()
        _settle(started, outcome)
    finally:
        lock.release()


def lock_scope(saga: Saga, step_name: str) -> str:
    """A linear saga locks the whole task; steps that may run side by side lock themselves."""
    return "" if saga.is_linear else step_name


def _delivery(task_id: str, step_name: str, kind: str, attempt: int) -> Delivery:
    job = get_current_job()
    worker = (getattr(job, "worker_name", None) if job else None) or os.environ.get(
        "RQ_WORKER_ID", f"{socket.gethostname()}.{os.getpid()}"
    )
    return Delivery(
        str(task_id), step_name, AttemptKind(kind), int(attempt), job.id if job else "", str(worker)
    )


def _definitions(task: TaskInstance, step_name: str) -> tuple[Saga | None, StepDefinition | None]:
    try:
        saga = registry.get(task.saga)
    except UnknownSaga:
        return None, None
    return saga, saga.get_step(step_name)


# --- admission -------------------------------------------------------------------------


def admissible(task: TaskInstance, step: StepRecord, delivery: Delivery) -> str:
    """Empty if this delivery may run now, else why not (pure)."""
    statuses: tuple[TaskStatus, ...]
    if delivery.is_action:
        statuses, step_statuses = ACTION_TASK_STATUSES, ACTION_STEP_STATUSES
        done = step.attempt_count
    else:
        statuses, step_statuses = COMPENSATION_TASK_STATUSES, COMPENSATION_STEP_STATUSES
        done = step.compensation_attempt_count
    if done >= delivery.attempt:
        return "duplicate"
    alone = not delivery.is_action and step.compensate_alone
    if (task.status not in statuses and not alone) or step.status not in step_statuses:
        return f"stale: task is {task.status}, step is {step.status}"
    if done != delivery.attempt - 1:
        return f"stale: step is at attempt {done}"
    return ""


def _begin(
    delivery: Delivery,
    saga: Saga,
    definition: StepDefinition,
    lock: TaskLock,
    log: logging.LoggerAdapter[logging.Logger],
) -> Started | None:
    with transaction.atomic():
        task = flow.locked_task(delivery.task_id)
        step = StepRecord.objects.get(task=task, name=delivery.step_name)
        verdict = admissible(task, step, delivery)
        if verdict:
            _refuse(task, step, delivery, verdict, log)
            return None
        if delivery.is_action and _group_expired(step):
            flow.give_up_step(step, "timed out: the group's deadline passed before it could run")
            flow.branch_settled(task, step, saga)
            return None
        admission = _breaker_admission(definition, delivery)
        if not admission.allowed:
            _defer_for_breaker(task, step, definition, admission, log)
            return None
        if not _claim_attempt(step, delivery, log):
            _refuse(task, step, delivery, "duplicate", log)
            return None
        attempt = _mark_running(task, step, delivery, lock)
    ctx = _context(task, step, delivery, attempt, log)
    timeout = effective_timeout(definition.timeout_s, _group_deadline(step))
    if not delivery.is_action:
        timeout = definition.timeout_s  # an undo is never cut short by its group's deadline
    log.info("attempt started")
    return Started(delivery, saga, definition, attempt, lock, admission.trial, ctx, timeout, log)


def _claim_attempt(
    step: StepRecord, delivery: Delivery, log: logging.LoggerAdapter[logging.Logger]
) -> bool:
    """The per-attempt claim. Claims are only taken with the task row locked, and the
    attempt row is written in the same transaction: a claim without its attempt row is
    an orphan of a transaction that rolled back or died, and is taken over."""
    name = claim_name(step.task_id, step.name, delivery.kind, delivery.attempt)
    owner = delivery.job_id or delivery.worker
    if claim(redis(), name, owner):
        return True
    started = StepAttempt.objects.filter(step=step, kind=delivery.kind, number=delivery.attempt)
    if started.exists():
        return False
    log.warning("claim %s had no attempt behind it (a rolled-back start); taken over", name)
    claim(redis(), name, owner, force=True)
    return True


def _refuse(
    task: TaskInstance,
    step: StepRecord,
    delivery: Delivery,
    verdict: str,
    log: logging.LoggerAdapter[logging.Logger],
) -> None:
    log.info("delivery not run: %s", verdict)
    if verdict == "duplicate":
        audit.record(
            task,
            AuditAction.DUPLICATE_DELIVERY,
            step=step,
            details={
                "kind": delivery.kind,
                "attempt": delivery.attempt,
                "job_id": delivery.job_id,
                "worker": delivery.worker,
            },
        )


def _breaker_admission(definition: StepDefinition, delivery: Delivery) -> Admission:
    if not delivery.is_action or definition.breaker is None:
        return Admission(True)
    return CircuitBreaker(redis(), definition.breaker).admit()


def _defer_for_breaker(
    task: TaskInstance,
    step: StepRecord,
    definition: StepDefinition,
    admission: Admission,
    log: logging.LoggerAdapter[logging.Logger],
) -> None:
    """Open breaker: no attempt, no retry used; come back when it half-opens (plus jitter)."""
    at = datetime.fromtimestamp(admission.retry_at + random.uniform(0, 1), tz=UTC)  # noqa: S311
    deadline = _group_deadline(step)
    if deadline is not None and at >= deadline:
        flow.give_up_step(step, "timed out: its breaker stays open past the group's deadline")
        flow.branch_settled(task, step, definition.saga)
        return
    if step.status == StepStatus.WAITING_RETRY:
        StepRecord.objects.filter(pk=step.pk).update(next_attempt_at=at)
    else:
        flow.move_step(step, StepStatus.WAITING_RETRY, next_attempt_at=at)
    if task.status == TaskStatus.PENDING:
        flow.move(task, TaskStatus.WAITING_RETRY)
    else:
        flow.sync_activity(task)  # waiting_retry only if no other step runs
    breaker = definition.breaker
    audit.record(
        task,
        AuditAction.BREAKER_OPEN,
        step=step,
        details={
            "breaker": breaker.name if breaker else "",
            "next_attempt_at": at.isoformat(),
        },
    )
    dispatch.schedule(
        step,
        AttemptKind.ACTION,
        step.attempt_count + 1,
        at=at,
        suffix=f"b{int(at.timestamp())}",
        step_timeout_s=definition.timeout_s,
    )
    log.info("breaker open; step deferred to %s", at.isoformat())


def _mark_running(
    task: TaskInstance, step: StepRecord, delivery: Delivery, lock: TaskLock
) -> StepAttempt:
    now = timezone.now()
    if delivery.is_action:
        flow.move_step(
            step,
            StepStatus.RUNNING,
            attempt_count=delivery.attempt,
            started_at=step.started_at or now,
            next_attempt_at=None,
        )
        if task.status != TaskStatus.RUNNING:
            flow.move(
                task,
                TaskStatus.RUNNING,
                fields={"started_at": task.started_at or now, "current_step": step.name},
            )
    elif step.status == StepStatus.SUCCEEDED:
        flow.move_step(
            step,
            StepStatus.COMPENSATING,
            compensation_attempt_count=delivery.attempt,
            next_attempt_at=None,
        )
    else:
        StepRecord.objects.filter(pk=step.pk).update(
            compensation_attempt_count=delivery.attempt, next_attempt_at=None
        )
    TaskInstance.objects.filter(pk=task.pk).update(current_step=step.name)
    return StepAttempt.objects.create(
        step=step,
        kind=delivery.kind,
        number=delivery.attempt,
        worker=delivery.worker[:200],
        job_id=delivery.job_id,
        lock_token=lock.token,
        lock_key=lock.key,
        heartbeat_at=Now(),  # the database's clock, which the reaper judges by
    )


def _context(
    task: TaskInstance,
    step: StepRecord,
    delivery: Delivery,
    attempt: StepAttempt,
    log: logging.LoggerAdapter[logging.Logger],
) -> StepContext:
    results = dict(
        StepRecord.objects.filter(task=task, status=StepStatus.SUCCEEDED).values_list(
            "name", "data"
        )
    )
    return StepContext(
        task_id=str(task.pk),
        step_name=step.name,
        kind=delivery.kind,
        attempt=delivery.attempt,
        attempt_id=attempt.pk,
        input=task.input,
        results=results,
        idempotency_key=idempotency_key(task.pk, step.name, delivery.kind),
        trace_id=task.trace_id,
        correlation_id=task.correlation_id,
        data=step.data,
        logger=log,
        _redis=redis(),
    )


def _group_deadline(step: StepRecord) -> datetime | None:
    if not step.group:
        return None
    return (
        StepRecord.objects.filter(task_id=step.task_id, name=step.group, is_group=True)
        .values_list("deadline_at", flat=True)
        .first()
    )


def _group_expired(step: StepRecord) -> bool:
    deadline = _group_deadline(step)
    return deadline is not None and deadline <= timezone.now()


def effective_timeout(
    step_timeout_s: float | None, group_deadline: datetime | None
) -> float | None:
    """A branch's own timeout, cut short by its group's deadline (pure)."""
    if group_deadline is None:
        return step_timeout_s
    left = max((group_deadline - timezone.now()).total_seconds(), 0.001)
    return min(step_timeout_s, left) if step_timeout_s else left


# --- running the body ------------------------------------------------------------------


def _perform(started: Started) -> Outcome:
    definition, ctx = started.definition, started.ctx
    body = definition.action if started.delivery.is_action else definition.compensation
    interval = max(0.5, started.saga.lock_expiry_s / 3)
    with Heartbeat(interval, lambda: _keep_alive(started), on_exit=connections.close_all):
        began = time.monotonic()
        timeout = started.timeout_s
        outcome = _call(body, ctx, timeout)
    if outcome.status == AttemptOutcome.SUCCEEDED and exceeded(timeout, time.monotonic() - began):
        return Outcome(AttemptOutcome.TIMED_OUT, error="step returned after its timeout")
    return outcome


def _call(body: Any, ctx: StepContext, timeout_s: float | None) -> Outcome:
    try:
        with step_deadline(timeout_s):
            result = body(ctx) if body is not None else None
        return Outcome(AttemptOutcome.SUCCEEDED, data=_json_safe(result))
    except StepTimedOut as exc:
        return Outcome(AttemptOutcome.TIMED_OUT, error=str(exc), traceback=traceback.format_exc())
    except StepCancelled as exc:
        return Outcome(AttemptOutcome.CANCELLED, error=str(exc))
    except Exception as exc:
        return Outcome(
            AttemptOutcome.FAILED,
            error=f"{type(exc).__name__}: {exc}"[:4000],
            traceback=traceback.format_exc(),
        )


def _json_safe(result: Any) -> Any:
    try:
        return json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"step result is not JSON-serialisable: {exc}") from None


def _keep_alive(started: Started) -> None:
    """One beat; a failing beat is logged and the next one tries again (never dies)."""
    try:
        if not started.lock.renew():
            started.log.warning("task lock lost while the step runs; the database still fences")
    except RedisError as exc:
        started.log.warning("could not renew the task lock: %s", exc)
    try:
        alive = StepAttempt.objects.filter(
            pk=started.attempt.pk, outcome=AttemptOutcome.RUNNING
        ).update(heartbeat_at=Now())
        if not alive:
            _superseded(started)
    except DatabaseError as exc:
        started.log.warning("heartbeat not written (%s); reconnecting for the next beat", exc)
        connections.close_all()


def _superseded(started: Started) -> None:
    """The reaper declared this attempt lost: tell the body to stop (``ctx.cancelled``)."""
    d = started.delivery
    started.log.warning("attempt was superseded while running; asking it to stop")
    with contextlib.suppress(RedisError):
        signal_attempt(redis(), AttemptAddress(d.task_id, d.step_name, d.kind, d.attempt))


# --- settling the attempt --------------------------------------------------------------


def _settle(started: Started, outcome: Outcome) -> None:
    # A long step may outlive its database connection (a restart, a failover).
    close_old_connections()
    try:
        settle_attempt(started.attempt.pk, outcome, token=started.lock.token, log=started.log)
    except (OperationalError, InterfaceError):
        connections.close_all()
        settle_attempt(started.attempt.pk, outcome, token=started.lock.token, log=started.log)
    try:
        _record_breaker(started, outcome)
    except RedisError as exc:
        started.log.warning("breaker not updated: %s", exc)


def _record_breaker(started: Started, outcome: Outcome) -> None:
    policy = started.definition.breaker
    if policy is None or not started.delivery.is_action:
        return
    breaker = CircuitBreaker(redis(), policy)
    if outcome.status == AttemptOutcome.SUCCEEDED:
        breaker.record_success()
    elif outcome.status != AttemptOutcome.CANCELLED and breaker.record_failure(started.trial):
        started.log.warning("breaker %s opened", policy.name)


def settle_attempt(
    attempt_id: int,
    outcome: Outcome,
    *,
    token: str | None = None,
    log: logging.LoggerAdapter[logging.Logger] | logging.Logger = logger,
) -> bool:
    """Record how an attempt ended and decide what comes next; False if it was superseded.

    ``token`` fences the write to the attempt's owner; the reaper and the worker's parent
    (which know the attempt is dead) settle without it.
    """
    for _ in range(SETTLE_TRIES):
        try:
            with transaction.atomic():
                return _settle_locked(attempt_id, outcome, token, log)
        except flow.ConcurrentChange:
            continue
    raise RuntimeError(f"attempt {attempt_id}: could not settle after {SETTLE_TRIES} tries")


def settle_dead_attempt(attempt: StepAttempt, outcome: Outcome) -> bool:
    """Settle an attempt whose worker is gone (reaper, worker's parent): free the lock it
    held, then record the outcome without a token (we know the holder is dead)."""
    held = attempt.lock_key or lock_key(attempt.step.task_id)
    with contextlib.suppress(RedisError):  # otherwise the lock expires on its own
        release_if_held_by(redis(), held, attempt.lock_token)
    return settle_attempt(attempt.pk, outcome)


def _settle_locked(
    attempt_id: int,
    outcome: Outcome,
    token: str | None,
    log: logging.LoggerAdapter[logging.Logger] | logging.Logger,
) -> bool:
    attempt = StepAttempt.objects.select_related("step").get(pk=attempt_id)
    task = flow.locked_task(attempt.step.task_id)
    if not _fence(attempt, outcome, token, task, log):
        return False
    step = StepRecord.objects.get(pk=attempt.step_id)
    saga, definition = _definitions(task, step.name)
    if attempt.kind == AttemptKind.ACTION:
        _after_action(task, step, saga, definition, outcome)
    else:
        _after_compensation(task, step, saga, definition, outcome)
    log.info("attempt settled: %s", outcome.status)
    return True


def _fence(
    attempt: StepAttempt,
    outcome: Outcome,
    token: str | None,
    task: TaskInstance,
    log: logging.LoggerAdapter[logging.Logger] | logging.Logger,
) -> bool:
    """Write the outcome only if this attempt is still the running, current one."""
    current = StepAttempt.objects.filter(pk=attempt.pk, outcome=AttemptOutcome.RUNNING)
    if token is not None:
        current = current.filter(lock_token=token)
    changes = {
        "outcome": outcome.status,
        "finished_at": timezone.now(),
        "error": outcome.error,
        "traceback": outcome.traceback,
    }
    try:
        with transaction.atomic():
            won = current.update(**changes)
    except IntegrityError:
        # The database is the final judge: this step already has a success of this kind.
        current.update(
            **{
                **changes,
                "outcome": AttemptOutcome.FAILED,
                "error": "result refused: another attempt already succeeded",
            }
        )
        audit.record(
            task,
            AuditAction.DUPLICATE_DELIVERY,
            step=attempt.step,
            details={
                "kind": attempt.kind,
                "attempt": attempt.number,
                "refused": "second success",
            },
        )
        return False
    if not won:
        log.warning("superseded attempt %s wrote nothing", attempt.number)
    return bool(won)


def _after_action(
    task: TaskInstance,
    step: StepRecord,
    saga: Saga | None,
    definition: StepDefinition | None,
    outcome: Outcome,
) -> None:
    if saga is None or definition is None:
        flow.give_up_step(step, _missing_message(task, step.name))
        if task.status in flow.FORWARD:
            flow.dead_letter(task, _missing_message(task, step.name))
    elif outcome.status == AttemptOutcome.SUCCEEDED:
        flow.move_step(
            step,
            StepStatus.SUCCEEDED,
            data=outcome.data,
            error="",
            progress=100,
            finished_at=timezone.now(),
        )
        audit.record(
            task, AuditAction.STEP_SUCCEEDED, step=step, details={"attempt": step.attempt_count}
        )
        flow.settled(task, step, saga)
    elif outcome.status == AttemptOutcome.CANCELLED:
        flow.move_step(step, StepStatus.CANCELLED, error=outcome.error, finished_at=timezone.now())
        flow.settled(task, step, saga)
    else:
        flow.action_failed(task, step, saga, definition, outcome.error)


def _after_compensation(
    task: TaskInstance,
    step: StepRecord,
    saga: Saga | None,
    definition: StepDefinition | None,
    outcome: Outcome,
) -> None:
    if outcome.status == AttemptOutcome.SUCCEEDED:
        flow.move_step(
            step, StepStatus.COMPENSATED, finished_at=timezone.now(), compensation_error=""
        )
        audit.record(
            task,
            AuditAction.STEP_COMPENSATED,
            step=step,
            details={"attempt": step.compensation_attempt_count},
        )
        _undo_done(task, step, saga)
        return
    error = outcome.error or outcome.status
    if definition is None:
        error = _missing_message(task, step.name)
    if definition is not None and can_retry(
        definition.compensation_policy,
        step.compensation_attempt_count - step.compensation_budget_base,
    ):
        flow.retry_compensation_later(task, step, definition, error)
    else:
        flow.compensation_failed_for_good(task, step, error, outcome.traceback)
        _undo_done(task, step, saga)


def _undo_done(task: TaskInstance, step: StepRecord, saga: Saga | None) -> None:
    if task.status in COMPENSATION_TASK_STATUSES:
        flow.compensate_next(task, saga)
        return
    if step.status == StepStatus.COMPENSATION_FAILED:
        # A lone late branch could not be undone while its task went on: the task's
        # status cannot say so, so tell the humans the same way.
        transaction.on_commit(partial(notify.compensation_failed, task.pk))
    flow.advance(task, saga)  # the task waited for this undo before it could complete


# --- deliveries that cannot run --------------------------------------------------------


def _missing_message(task: TaskInstance, step_name: str) -> str:
    return (
        f"step {step_name!r} of saga {task.saga!r} no longer exists in the deployed code; "
        "redeploy it, or resolve or cancel the task"
    )


def _definition_missing(
    delivery: Delivery, task: TaskInstance, log: logging.LoggerAdapter[logging.Logger]
) -> None:
    """A deploy removed a step (or saga) this task still needs: park it, don't crash."""
    log.error(_missing_message(task, delivery.step_name))
    with transaction.atomic():
        task = flow.locked_task(task.pk)
        step = StepRecord.objects.filter(task=task, name=delivery.step_name).first()
        if step is None or admissible(task, step, delivery):
            return
        if delivery.is_action:
            # The step fails (so a redrive after a redeploy retries it); the task is parked.
            flow.give_up_step(step, _missing_message(task, delivery.step_name))
            flow.dead_letter(task, _missing_message(task, delivery.step_name))
        else:
            if step.status == StepStatus.SUCCEEDED:
                flow.move_step(step, StepStatus.COMPENSATING)
            flow.compensation_failed_for_good(task, step, _missing_message(task, step.name), "")
            _undo_done(task, step, None)


def _requeue_for_lock(
    delivery: Delivery, definition: StepDefinition, log: logging.LoggerAdapter[logging.Logger]
) -> None:
    """Someone holds the task lock: come back shortly, a bounded number of times."""
    base = dispatch.job_id(delivery.task_id, delivery.step_name, delivery.kind, delivery.attempt)
    tries = _lock_tries(delivery.job_id, base) + 1
    if tries > settings.SAGAS_LOCK_REQUEUES:
        log.warning("task lock still busy after %s re-queues; left to the reaper", tries - 1)
        task = TaskInstance.objects.get(pk=delivery.task_id)
        audit.record(
            task,
            AuditAction.LOCK_BUSY,
            details={
                "step": delivery.step_name,
                "kind": delivery.kind,
                "attempt": delivery.attempt,
            },
        )
        return
    at = timezone.now() + timedelta(seconds=random.uniform(0.2, 1.5))  # noqa: S311
    jid = dispatch.job_id(
        delivery.task_id, delivery.step_name, delivery.kind, delivery.attempt, f"l{tries}"
    )
    StepRecord.objects.filter(task__pk=delivery.task_id, name=delivery.step_name).update(job_id=jid)
    dispatch.enqueue(
        delivery.task_id,
        delivery.step_name,
        delivery.kind,
        delivery.attempt,
        jid,
        at,
        definition.timeout_s,
    )
    log.info("task lock busy; re-queued as %s", jid)


def _lock_tries(job_id: str, base: str) -> int:
    suffix = job_id[len(base) :] if job_id.startswith(base) else ""
    return int(suffix[2:]) if suffix.startswith("-l") and suffix[2:].isdigit() else 0
