"""The one place where decisions become changes: load a task's rows (row-locked), let a
pure decision plan on them, then apply the plan: fenced transitions and audit entries in
the caller's transaction, the task's next wake-up time, and, only once the transaction
has committed, jobs, stop signals and notifications.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from sagas import audit, ownership
from sagas.definitions import registry
from sagas.engine import dispatch, notify, stopping
from sagas.engine.plan import (
    AttemptRow,
    Audit,
    Effect,
    MoveStep,
    MoveTask,
    NotifyCompensationFailed,
    Plan,
    PromoteJob,
    Schedule,
    SignalAttempt,
    SignalTask,
    StepRow,
    StopAttempt,
    TaskRow,
    UpdateStep,
    UpdateTask,
)
from sagas.engine.rescue import Timing, wake_time
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import AttemptKind, AttemptOutcome, StepStatus
from sagas.transitions import transition, transition_step

logger = logging.getLogger("sagas.engine")

DECIDE_TRIES = 3
T = TypeVar("T")


class ConcurrentChange(Exception):
    """A fenced update lost although the task row was locked: take the decision again."""


@dataclass
class Loaded:
    """A task's models (to write through) and its plan (to decide on)."""

    task: TaskInstance
    steps: dict[str, StepRecord]
    plan: Plan


def timing() -> Timing:
    return Timing(
        grace=timedelta(seconds=settings.SAGAS_REAPER_GRACE),
        cancel_grace=timedelta(seconds=settings.SAGAS_CANCEL_GRACE),
        stuck_after=timedelta(seconds=settings.SAGAS_STUCK_AFTER),
    )


# --- loading -------------------------------------------------------------------------------


def load(task_id: UUID | str, *, lock: bool = True) -> Loaded:
    """The task's rows, read with the database's clock (and its row lock, by default).

    The task is locked by a statement of its own, and its steps and attempts are read by
    later ones: each sees what the holder of the lock before committed. (Read in one
    statement with the task joined, the steps would come from that statement's snapshot,
    taken before it waited for the lock: a concurrent branch's settle would be missed.)
    """
    query = TaskInstance.objects.annotate(db_now=Now())
    if lock:
        query = query.select_for_update(of=("self",))
    task = query.get(pk=task_id)
    steps = list(StepRecord.objects.filter(task=task).order_by("index"))
    attempts = StepAttempt.objects.filter(step_id__in=[s.pk for s in steps]).order_by("number")
    rows = _step_rows(steps, attempts.values(*ATTEMPT_FIELDS) if steps else [])
    plan = Plan(_task_row(task), rows, task.db_now, _saga(task.saga))
    return Loaded(task, {s.name: s for s in steps}, plan)


def load_plans(task_ids: list[Any], now: datetime) -> list[Plan]:
    """Unlocked plans for many tasks in three queries (the reaper's batch look)."""
    tasks = TaskInstance.objects.filter(pk__in=task_ids)
    steps: dict[Any, list[StepRecord]] = {}
    step_ids = []
    for step in steps_of_tasks(task_ids):
        steps.setdefault(step.task_id, []).append(step)
        step_ids.append(step.pk)
    running = running_attempts(step_ids).values(*ATTEMPT_FIELDS)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for attempt in running:
        by_step.setdefault(attempt["step_id"], []).append(attempt)
    return [
        Plan(_task_row(t), _rows_of(steps.get(t.pk, []), by_step), now, _saga(t.saga))
        for t in tasks
    ]


def steps_of_tasks(task_ids: list[Any]) -> QuerySet[StepRecord]:
    return StepRecord.objects.filter(task_id__in=task_ids).order_by("task_id", "index")


def running_attempts(step_ids: list[int]) -> QuerySet[StepAttempt]:
    """By step id (its own index), not through a join on the steps table."""
    return StepAttempt.objects.filter(step_id__in=step_ids, outcome=AttemptOutcome.RUNNING)


ATTEMPT_FIELDS = (
    "pk",
    "step_id",
    "kind",
    "number",
    "outcome",
    "worker",
    "job_id",
    "heartbeat_expires_at",
)


def _saga(name: str) -> Any:
    return registry.get(name) if name in registry else None


def _task_row(task: TaskInstance) -> TaskRow:
    return TaskRow(
        pk=task.pk,
        saga=task.saga,
        status=task.status,
        input=task.input,
        trace_id=task.trace_id,
        correlation_id=task.correlation_id,
        compensation_reason=task.compensation_reason,
        started_at=task.started_at,
        updated_at=task.updated_at,
        cancel_requested_at=task.cancel_requested_at,
        undo_started_at=task.undo_started_at,
        deadline_at=task.deadline_at,
        wake_at=task.wake_at,
    )


def _step_rows(steps: list[StepRecord], attempts: Iterable[dict[str, Any]]) -> list[StepRow]:
    by_step: dict[int, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_step.setdefault(attempt["step_id"], []).append(attempt)
    return _rows_of(steps, by_step)


def _rows_of(steps: list[StepRecord], attempts: dict[int, list[dict[str, Any]]]) -> list[StepRow]:
    return [step_row(s, attempts.get(s.pk, [])) for s in steps]


def step_row(step: StepRecord, attempts: list[dict[str, Any]]) -> StepRow:
    """A step's row as decisions see it, with its attempts (``ATTEMPT_FIELDS`` dicts)."""
    actions = [a for a in attempts if a["kind"] == AttemptKind.ACTION]
    running = [
        AttemptRow(
            a["pk"], a["kind"], a["number"], a["worker"], a["job_id"], a["heartbeat_expires_at"]
        )
        for a in attempts
        if a["outcome"] == AttemptOutcome.RUNNING
    ]
    return StepRow(
        **{name: getattr(step, name) for name in STEP_FIELDS},
        after=tuple(step.after or ()),
        last_action_outcome=actions[-1]["outcome"] if actions else "",
        running=running,
    )


STEP_FIELDS = (
    "pk",
    "name",
    "index",
    "status",
    "critical",
    "level",
    "is_group",
    "group",
    "group_mode",
    "group_timeout_s",
    "group_schedule_to_close_s",
    "deadline_at",
    "schedule_deadline_at",
    "compensate_alone",
    "attempt_count",
    "compensation_attempt_count",
    "attempt_budget_base",
    "compensation_budget_base",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "job_id",
    "data",
    "error",
    "compensation_error",
    "trace_id",
)


# --- deciding ------------------------------------------------------------------------------


def decide(task_id: UUID | str, decision: Callable[[Loaded], T]) -> T:
    """Load the task row-locked, let ``decision`` plan on it, apply the plan; a fenced
    update that still loses rolls everything back and the decision is taken again."""
    for _ in range(DECIDE_TRIES):
        try:
            with transaction.atomic():
                loaded = load(task_id)
                result = decision(loaded)
                apply(loaded)
                return result
        except ConcurrentChange:
            continue
    raise RuntimeError(f"task {task_id}: could not decide after {DECIDE_TRIES} tries")


def apply(loaded: Loaded) -> None:
    """Write the plan's effects in order, then when the reaper should next look."""
    plan = loaded.plan
    writer = _Writer(loaded)
    for effect in plan.effects:
        writer.write(effect)
    wake = wake_time(plan, timing())
    if plan.changed or wake != loaded.task.wake_at:
        writer.finish(wake)
    plan.effects.clear()


class _Writer:
    """Applies effects to one loaded task inside the caller's transaction."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.plan = loaded.plan
        self.task_fields: dict[str, Any] = {}

    def step(self, name: str) -> StepRecord:
        return self.loaded.steps[name]

    def write(self, effect: Effect) -> None:
        handler = getattr(self, f"_{type(effect).__name__}")
        handler(effect)

    def finish(self, wake_at: datetime | None) -> None:
        fields = {**self.task_fields, "wake_at": wake_at}
        if self.plan.changed:
            fields["updated_at"] = self.plan.now
        TaskInstance.objects.filter(pk=self.loaded.task.pk).update(**fields)
        for name, value in fields.items():
            setattr(self.loaded.task, name, value)

    def _MoveTask(self, e: MoveTask) -> None:
        step = self.step(e.step) if e.step else None
        if not transition(
            self.loaded.task,
            e.to,  # type: ignore[arg-type]
            action=e.action,
            actor=e.actor,
            step=step,
            details=e.details,
            fields=e.fields,
        ):
            raise ConcurrentChange(f"task {self.loaded.task.pk} changed under its lock")

    def _MoveStep(self, e: MoveStep) -> None:
        step = self.step(e.step)
        owned_before = ownership.keys_in(step.data)
        if not transition_step(step, e.to, fields=e.fields):  # type: ignore[arg-type]
            raise ConcurrentChange(f"step {e.step} changed under its task's lock")
        self._track_ownership(step, e.fields, e.to, owned_before)

    def _UpdateStep(self, e: UpdateStep) -> None:
        step = self.step(e.step)
        owned_before = ownership.keys_in(step.data)
        StepRecord.objects.filter(pk=step.pk).update(**e.fields)
        for name, value in e.fields.items():
            setattr(step, name, value)
        self._track_ownership(step, e.fields, None, owned_before)

    def _track_ownership(
        self, step: StepRecord, fields: dict[str, Any], to: Any, owned_before: list[str]
    ) -> None:
        """Keep the owned-keys index (reconciliation's) in step with the step's data; steps
        whose data names no key, before or after, cost no query."""
        if to == StepStatus.COMPENSATED:
            if owned_before:
                ownership.release(step)
        elif "data" in fields and (owned_before or ownership.keys_in(fields["data"])):
            ownership.record(step, self.loaded.task.saga, fields["data"])

    def _UpdateTask(self, e: UpdateTask) -> None:
        self.task_fields.update(e.fields)

    def _Schedule(self, e: Schedule) -> None:
        dispatch.schedule(
            self.step(e.step),
            e.kind,
            e.attempt,
            e.job_id,
            at=self._local(e.at),
            step_timeout_s=e.timeout_s,
            meta=e.meta,
        )

    def _Audit(self, e: Audit) -> None:
        step = self.step(e.step) if e.step else None
        audit.record(self.loaded.task, e.action, actor=e.actor, step=step, details=e.details)

    def _SignalTask(self, e: SignalTask) -> None:
        transaction.on_commit(partial(stopping.signal_task_safely, self.loaded.task.pk))

    def _SignalAttempt(self, e: SignalAttempt) -> None:
        address = stopping.AttemptAddress(str(self.loaded.task.pk), e.step, e.kind, e.number)
        transaction.on_commit(partial(stopping.signal_attempt_safely, address))

    def _StopAttempt(self, e: StopAttempt) -> None:
        transaction.on_commit(partial(stopping.stop_job, e.worker, e.job_id))

    def _PromoteJob(self, e: PromoteJob) -> None:
        transaction.on_commit(partial(dispatch.promote, e.job_id))

    def _NotifyCompensationFailed(self, e: NotifyCompensationFailed) -> None:
        transaction.on_commit(partial(notify.compensation_failed, self.loaded.task.pk))

    def _local(self, at: datetime | None) -> datetime | None:
        """A database-clock time on this machine's clock (RQ's scheduler uses ours)."""
        return None if at is None else timezone.now() + (at - self.plan.now)


def database_now() -> datetime:
    """The database's clock (heartbeats, wake-ups and plans all use it)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return timezone.now()  # SQLite is embedded: it shares this machine's clock
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        row = cursor.fetchone()
    return row[0]  # type: ignore[no-any-return]
