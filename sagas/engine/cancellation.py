"""Cancellation: signals addressed to a task or one attempt, and the cancel decision itself.

Running steps are asked to stop through a Redis key that ``ctx.cancelled`` reads in one
round trip; a step that does not cooperate within the grace period is stopped with RQ's
stop-job command (its worker's parent then records the attempt ``cancelled``). The task
stays ``cancelling`` until the running step has stopped and every compensation has run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis import Redis
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError

from sagas import audit
from sagas.audit import AuditAction
from sagas.engine import flow
from sagas.engine.connection import key, queue, redis
from sagas.models import StepAttempt, TaskInstance
from sagas.states import (
    AttemptKind,
    CompensationReason,
    StepStatus,
    TaskStatus,
)

if TYPE_CHECKING:
    from sagas.services import Actor

logger = logging.getLogger("sagas.engine")

SIGNAL_TTL_S = 7 * 24 * 3600
CANCELLABLE = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.WAITING_RETRY,
    TaskStatus.DEAD_LETTERED,
)
ALREADY_CANCELLED = (TaskStatus.CANCELLING, TaskStatus.CANCELLED)
# What a deadline cancels: tasks the engine is still moving forward (not parked ones).
STILL_ACTIVE = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING_RETRY)
DECIDE_TRIES = 3


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel request did; ``outcome`` and ``status`` are the API's JSON body."""

    outcome: str
    status: str
    http_status: int
    task: TaskInstance | None = None


# --- signals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptAddress:
    """Names one attempt the way its job does, so a worker's parent can read its signals."""

    task_id: str
    step_name: str
    kind: str
    number: int


def task_signal_key(task_id: object) -> str:
    return key("cancel", "task", task_id)


def attempt_signal_key(a: AttemptAddress) -> str:
    return key("cancel", "attempt", a.task_id, a.step_name, a.kind, a.number)


def signal_task(connection: Redis, task_id: object) -> None:
    """Ask every running action attempt of a task to stop (the value is when it was asked)."""
    connection.set(task_signal_key(task_id), str(time.time()), ex=SIGNAL_TTL_S)


def signal_attempt(connection: Redis, attempt: AttemptAddress) -> None:
    """Ask one attempt (e.g. a branch its group no longer needs) to stop."""
    connection.set(attempt_signal_key(attempt), str(time.time()), ex=SIGNAL_TTL_S)


def signal_attempt_safely(attempt: AttemptAddress) -> None:
    """After commit: ask one attempt to stop; if Redis is down the attempt just runs on."""
    try:
        signal_attempt(redis(), attempt)
    except RedisError as exc:
        logger.warning("could not signal attempt %s to stop: %s", attempt, exc)


def signalled_at(connection: Redis, attempt: AttemptAddress) -> float | None:
    """When this attempt was first asked to stop, or None. One round trip.

    A compensation is the undo a cancel asked for: only a signal addressed to its own
    attempt stops it, never the task's cancellation.
    """
    keys = [attempt_signal_key(attempt)]
    if attempt.kind != AttemptKind.COMPENSATION:
        keys.append(task_signal_key(attempt.task_id))
    times = [float(v) for v in connection.mget(keys) if v is not None]
    return min(times) if times else None


def grace_expired(connection: Redis, attempt: AttemptAddress, now: float) -> bool:
    """Whether the attempt was asked to stop longer than the grace period ago."""
    asked = signalled_at(connection, attempt)
    return asked is not None and now - asked >= settings.SAGAS_CANCEL_GRACE


# --- the decision ----------------------------------------------------------------------


def request(
    task_id: UUID, actor: Actor = None, reason: str = "", *, by: str = "operator"
) -> CancelOutcome:
    """Decide a cancel with the task row locked, so it has exactly one winner against
    a finishing step; a lost race is decided again on fresh rows."""
    for _ in range(DECIDE_TRIES):
        try:
            with transaction.atomic():
                return _decide(flow.locked_task(task_id), actor, reason, by)
        except flow.ConcurrentChange:
            continue
    raise RuntimeError(f"task {task_id}: cancel could not be decided")


def _decide(task: TaskInstance, actor: Actor, reason: str, by: str) -> CancelOutcome:
    if task.status in ALREADY_CANCELLED:
        return CancelOutcome("already_cancelled", task.status, 200, task)
    if task.status == TaskStatus.COMPLETED:
        return CancelOutcome("already_completed", task.status, 409, task)
    if task.status not in CANCELLABLE:
        return CancelOutcome("already_finished", task.status, 409, task)
    if by == "deadline" and flow.work_done(flow.steps_of(task)):
        # Its work is done and only stopped branches are winding down: that is not
        # "still active at the deadline", and undoing the work now would be wrong.
        return CancelOutcome("work_done", task.status, 409, task)
    audit.record(
        task,
        AuditAction.CANCEL_REQUESTED,
        actor=actor,
        details={"reason": reason, "by": by, "from_status": task.status},
    )
    fields = {
        "cancel_requested_at": timezone.now(),
        "cancelled_by": actor,
        "cancel_reason": reason[:2000],
        "compensation_reason": CompensationReason.CANCEL,
    }
    _stop_waiting_steps(task)
    steps = flow.steps_of(task)
    busy = (StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
    if not any(s.status in busy for s in steps):
        flow.skip_unstarted(task)
        now = timezone.now()
        flow.move(
            task,
            TaskStatus.CANCELLED,
            AuditAction.CANCELLED,
            actor=actor,
            fields={**fields, "finished_at": now, "cancelled_at": now},
        )
        return CancelOutcome("cancelled", task.status, 202, task)
    flow.move(task, TaskStatus.CANCELLING, actor=actor, fields=fields)
    flow.compensate_next(task, _saga(task))  # waits for a running step, if there is one
    transaction.on_commit(lambda: stop_running_attempts(task.pk))
    return CancelOutcome("cancelled", task.status, 202, task)


def _stop_waiting_steps(task: TaskInstance) -> None:
    """A step waiting for a retry will not get one: its scheduled job finds it cancelled."""
    for step in flow.steps_of(task):
        if step.status == StepStatus.WAITING_RETRY:
            flow.move_step(
                step, StepStatus.CANCELLED, next_attempt_at=None, finished_at=timezone.now()
            )


def _saga(task: TaskInstance) -> Any:
    from sagas.definitions import registry

    return registry.get(task.saga) if task.saga in registry else None


# --- stopping running attempts -------------------------------------------------------------


def stop_running_attempts(task_id: UUID) -> None:
    """After commit: ask the task's running attempts to stop.

    Each worker's parent watches its own running job and sends RQ's stop-job once the
    grace period is over (``SagaWorker``), so enforcement never waits for a free worker;
    the reaper repeats signal and stop for cancellations that Redis lost.
    """
    try:
        signal_task(redis(), task_id)
    except RedisError as exc:
        logger.warning("could not signal cancellation of %s (%s); the reaper will", task_id, exc)


def stop_attempt_job(attempt: StepAttempt) -> bool:
    """RQ's stop-job kills the work horse outright; its worker's parent records it."""
    try:
        send_stop_job_command(redis(), attempt.job_id)
    except (NoSuchJobError, InvalidJobOperation, RedisError) as exc:
        logger.warning("could not stop job %s of attempt %s: %s", attempt.job_id, attempt.pk, exc)
        return False
    logger.warning("stopped job %s: it ignored cancellation past the grace period", attempt.job_id)
    return True


# --- deadlines ---------------------------------------------------------------------------


def schedule_deadline(task: TaskInstance, deadline_s: int) -> None:
    """After commit: a job that cancels the task if it is still active at its deadline."""
    at = task.created_at + timedelta(seconds=deadline_s)

    def enqueue() -> None:
        try:
            queue().enqueue_at(
                at, enforce_deadline, str(task.pk), job_id=f"deadline-{task.pk}", result_ttl=0
            )
        except RedisError as exc:
            logger.warning(
                "deadline of %s not scheduled (%s); the reaper enforces it", task.pk, exc
            )

    transaction.on_commit(enqueue)


def enforce_deadline(task_id: str) -> str:
    """Cancel by ``system`` a task still active at its saga's deadline."""
    task = TaskInstance.objects.get(pk=task_id)
    if task.status not in STILL_ACTIVE:
        return task.status
    return request(task.pk, None, "deadline passed", by="deadline").outcome
