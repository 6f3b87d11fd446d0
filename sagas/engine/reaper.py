"""The reaper: rebuilds from the database what Redis or a dead worker lost.

Run by the workers themselves, at most one at a time fleet-wide (a Redis lock that
lives for one interval). Liveness is judged by the attempt's database heartbeat, so a
Redis flush never makes a live attempt look lost.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from sagas import audit
from sagas.audit import AuditAction
from sagas.definitions import UnknownSaga, registry
from sagas.engine import cancellation, dispatch, flow
from sagas.engine.connection import key, queue, redis
from sagas.engine.executor import Outcome, settle_dead_attempt
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import ACTIVE_TASK_STATUSES, AttemptKind, AttemptOutcome, StepStatus, TaskStatus

logger = logging.getLogger("sagas.engine")

ALIVE_STATUSES = {JobStatus.QUEUED, JobStatus.DEFERRED}
ALIVE, STUCK_SCHEDULED, MISSING = "alive", "stuck_scheduled", "missing"
ACTION_WAITING = (StepStatus.PENDING, StepStatus.WAITING_RETRY)
COMPENSATION_WAITING = (StepStatus.SUCCEEDED, StepStatus.COMPENSATING)


@dataclass
class ReapReport:
    lost_attempts: list[int] = field(default_factory=list)
    requeued_jobs: list[str] = field(default_factory=list)
    deadlines: list[str] = field(default_factory=list)
    stopped_jobs: int = 0


def database_now() -> datetime:
    """The database's clock. Heartbeats are written with it (``Now()``), so a reaper on a
    machine whose clock runs fast never takes a live attempt for a lost one."""
    if connection.vendor != "postgresql":
        return timezone.now()  # SQLite is embedded: it shares this machine's clock
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        row = cursor.fetchone()
    return row[0]  # type: ignore[no-any-return]


def reap(now: datetime | None = None, *, force: bool = False) -> ReapReport | None:
    """One reaper pass; None if another worker holds the fleet-wide reaper lock."""
    if not force and not _take_turn():
        return None
    report = ReapReport()
    # Heartbeats are written on the database's clock; the other times it compares (retry
    # times, updates, deadlines, RQ's own) come from the workers' clocks.
    report.lost_attempts = reap_lost_attempts(now or database_now())
    now = now or timezone.now()
    report.requeued_jobs = requeue_missing_jobs(now)
    report.deadlines = cancel_past_deadline(now)
    report.stopped_jobs = enforce_cancellations(now)
    if report.lost_attempts or report.requeued_jobs:
        logger.info(
            "reaper: %s lost attempts, %s jobs re-enqueued",
            len(report.lost_attempts),
            len(report.requeued_jobs),
        )
    return report


def _grace() -> timedelta:
    """How late a job may be: the scheduler polls every second and rounds up to the next
    one, and a queued job may wait for a free worker (SAGAS_REAPER_GRACE)."""
    return timedelta(seconds=settings.SAGAS_REAPER_GRACE)


def _take_turn() -> bool:
    interval_ms = max(1000, int(settings.SAGAS_REAPER_INTERVAL * 1000) - 500)
    return bool(redis().set(key("reaper"), secrets.token_hex(8), nx=True, px=interval_ms))


# --- attempts whose worker died ----------------------------------------------------------


def reap_lost_attempts(now: datetime) -> list[int]:
    shortest = min((s.lock_expiry_s for s in map(registry.get, registry.names())), default=60)
    candidates = StepAttempt.objects.filter(
        outcome=AttemptOutcome.RUNNING, heartbeat_at__lt=now - timedelta(seconds=shortest)
    ).select_related("step__task")
    return [a.pk for a in candidates if _is_stale(a, now) and _guarded(_declare_lost, a, now)]


def _guarded(work: Callable[..., Any], *args: Any) -> Any:
    """One item's failure is logged and skipped: it must never stop the fleet's reaper."""
    try:
        with transaction.atomic():
            return work(*args)
    except Exception:
        logger.exception("reaper: %s%r failed; skipped this pass", work.__name__, args[:1])
        return None


def _is_stale(attempt: StepAttempt, now: datetime) -> bool:
    try:
        expiry = registry.get(attempt.step.task.saga).lock_expiry_s
    except UnknownSaga:
        expiry = 60
    # Heartbeats come every third of the lock expiry: a full expiry means three were missed.
    return attempt.heartbeat_at is not None and attempt.heartbeat_at < now - timedelta(
        seconds=expiry
    )


def _declare_lost(attempt: StepAttempt, now: datetime) -> bool:
    error = f"lost: no heartbeat from {attempt.worker or 'its worker'} since {attempt.heartbeat_at}"
    if not settle_dead_attempt(attempt, Outcome(AttemptOutcome.LOST, error=error)):
        return False
    audit.record(
        attempt.step.task,
        AuditAction.ATTEMPT_LOST,
        step=attempt.step,
        details={
            "kind": attempt.kind,
            "attempt": attempt.number,
            "worker": attempt.worker,
            "last_heartbeat": attempt.heartbeat_at.isoformat() if attempt.heartbeat_at else None,
        },
    )
    return True


# --- work that should be queued but is not -------------------------------------------------


def requeue_missing_jobs(now: datetime) -> list[str]:
    """Active tasks whose next job vanished (Redis flush, enqueue failure, slow fail-over)."""
    requeued: list[str] = []
    # Active tasks, and ended ones with a late branch still to undo on its own.
    alone = Q(steps__compensate_alone=True, steps__status__in=COMPENSATION_WAITING)
    stale_tasks = TaskInstance.objects.filter(
        Q(status__in=ACTIVE_TASK_STATUSES) | alone, updated_at__lt=now - _grace()
    ).distinct()
    for task in stale_tasks.iterator():
        requeued += _guarded(_requeue_task_jobs, task, now) or []
    return requeued


def _requeue_task_jobs(task: TaskInstance, now: datetime) -> list[str]:
    # Decide on fresh rows with the task locked: a worker may have just scheduled its next
    # job, and a stale job id written here would hide that job from the next pass.
    task = flow.locked_task(task.pk)
    if task.updated_at >= now - _grace():
        return []  # it moved since we looked: not stale any more
    requeued = []
    for step, kind in expected_jobs(task):
        if not _overdue(step, now):
            continue
        state = job_state(step.job_id, now)
        if state == STUCK_SCHEDULED:
            _promote(step.job_id)
            requeued.append(step.job_id)
        elif state == MISSING and (jid := _enqueue_again(task, step, kind)):
            requeued.append(jid)
    return requeued


def expected_jobs(task: TaskInstance) -> list[tuple[StepRecord, str]]:
    """Steps that were handed to a worker and should have a job now (none while running)."""
    running = set(
        StepAttempt.objects.filter(step__task=task, outcome=AttemptOutcome.RUNNING).values_list(
            "step_id", flat=True
        )
    )
    undoing = task.status in (TaskStatus.COMPENSATING, TaskStatus.CANCELLING)
    expected = []
    for step in StepRecord.objects.filter(task=task, is_group=False).exclude(job_id=""):
        if step.pk in running or step.status == StepStatus.RUNNING:
            continue
        kind = _job_kind(task, step)
        if (kind == AttemptKind.ACTION and not undoing and step.status in ACTION_WAITING) or (
            kind == AttemptKind.COMPENSATION
            and (undoing or step.compensate_alone)
            and step.status in COMPENSATION_WAITING
        ):
            expected.append((step, kind))
    return expected


def _job_kind(task: TaskInstance, step: StepRecord) -> str:
    letter = step.job_id.removeprefix(f"saga-{task.pk}-{step.name}-")[:1]
    return AttemptKind.COMPENSATION if letter == "c" else AttemptKind.ACTION


def _overdue(step: StepRecord, now: datetime) -> bool:
    return step.next_attempt_at is None or step.next_attempt_at < now - _grace()


def job_state(job_id: str, now: datetime) -> str:
    """ALIVE (queued, running, or scheduled for later), STUCK_SCHEDULED or MISSING."""
    job = Job.fetch_many([job_id], connection=redis())[0] if job_id else None
    if job is None:
        return MISSING
    status = job.get_status(refresh=False)
    if status == JobStatus.SCHEDULED:
        # No scheduler moved it in time: its scheduler died and the lock fails over slowly.
        try:
            due = queue().scheduled_job_registry.get_scheduled_time(job_id)
        except NoSuchJobError:
            return ALIVE  # the scheduler moved it just now
        return STUCK_SCHEDULED if _aware(due) < now - _grace() else ALIVE
    if status in ALIVE_STATUSES:
        return ALIVE
    # A started job is alive only while its worker keeps beating.
    beat = job.last_heartbeat
    if status == JobStatus.STARTED and beat and (now - _aware(beat)).total_seconds() < 120:
        return ALIVE
    return MISSING


def _promote(job_id: str) -> None:
    """Do the scheduler's work for one overdue job: move it onto the queue."""
    job = Job.fetch(job_id, connection=redis())
    q = queue()
    q.scheduled_job_registry.remove(job)
    q.enqueue_job(job, at_front=job.should_enqueue_at_front())
    logger.warning("reaper moved overdue scheduled job %s onto the queue", job_id)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _enqueue_again(task: TaskInstance, step: StepRecord, kind: str) -> str:
    attempt = (
        step.compensation_attempt_count if kind == AttemptKind.COMPENSATION else step.attempt_count
    ) + 1
    suffix = f"r{int(timezone.now().timestamp())}"
    definition = _definition(task, step.name)
    timeout = definition.timeout_s if definition else None
    jid = dispatch.schedule(step, kind, attempt, suffix=suffix, step_timeout_s=timeout)
    logger.warning("reaper re-enqueues %s for task %s (%s)", jid, task.pk, task.status)
    return jid


def _definition(task: TaskInstance, step_name: str):  # type: ignore[no-untyped-def]
    try:
        return registry.get(task.saga).get_step(step_name)
    except UnknownSaga:
        return None


# --- cancellations the fast path may have missed ---------------------------------------------


def cancel_past_deadline(now: datetime) -> list[str]:
    """Tasks still active past their saga's ``deadline_s`` (the scheduled job may be gone)."""
    cancelled = []
    for saga in (registry.get(name) for name in registry.names()):
        if not saga.deadline_s:
            continue
        overdue = TaskInstance.objects.filter(
            saga=saga.name,
            status__in=cancellation.STILL_ACTIVE,  # parked tasks wait for their operator
            created_at__lt=now - timedelta(seconds=saga.deadline_s),
        )
        for task_id in overdue.values_list("pk", flat=True):
            if _guarded(cancellation.enforce_deadline, str(task_id)) == "cancelled":
                cancelled.append(str(task_id))
    return cancelled


def enforce_cancellations(now: datetime) -> int:
    """Attempts still running well after their task's cancel: signal and stop them again."""
    late = now - timedelta(seconds=settings.SAGAS_CANCEL_GRACE) - _grace()
    attempts = StepAttempt.objects.filter(
        outcome=AttemptOutcome.RUNNING,
        kind=AttemptKind.ACTION,  # compensations are the undo the cancel asked for
        step__task__status=TaskStatus.CANCELLING,
        step__task__cancel_requested_at__lt=late,
    ).select_related("step")
    return _signal_and_stop(attempts, _signal_its_task) + stop_unneeded_branches(late)


def stop_unneeded_branches(late: datetime) -> int:
    """Branches still running well after their group decided without them (their stop
    signal may have been lost): their task cannot complete until they stop."""
    decided = StepRecord.objects.filter(
        task=OuterRef("step__task"),
        name=OuterRef("step__group"),
        is_group=True,
        finished_at__lt=late,
    ).exclude(status=StepStatus.RUNNING)
    attempts = (
        StepAttempt.objects.filter(outcome=AttemptOutcome.RUNNING, kind=AttemptKind.ACTION)
        .exclude(step__group="")
        .filter(Exists(decided))
        .select_related("step")
    )
    return _signal_and_stop(attempts, _signal_the_attempt)


def _signal_and_stop(attempts: Iterable[StepAttempt], signal: Callable[[StepAttempt], None]) -> int:
    """Repeat the stop signal, then stop the job outright (its worker's parent records it)."""
    stopped = 0
    for attempt in attempts:
        signal(attempt)
        stopped += bool(_guarded(cancellation.stop_attempt_job, attempt))
    return stopped


def _signal_its_task(attempt: StepAttempt) -> None:
    with contextlib.suppress(RedisError):
        cancellation.signal_task(redis(), attempt.step.task_id)


def _signal_the_attempt(attempt: StepAttempt) -> None:
    cancellation.signal_attempt_safely(
        cancellation.AttemptAddress(
            str(attempt.step.task_id), attempt.step.name, attempt.kind, attempt.number
        )
    )
