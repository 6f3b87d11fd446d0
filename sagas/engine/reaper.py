"""The reaper: rebuilds from the database what Redis or a dead worker lost.

A pass costs what the tasks that need help cost, not what the active ones do. It looks
at two indexed sets only: attempts whose heartbeat expired, and tasks whose wake-up time
(kept by every applied decision, ``rescue.wake_time``) has passed. Each set is read in
batches; the Redis checks of a batch are pipelined; tasks whose jobs merely wait for a
worker are pushed back with one UPDATE; only tasks that need a change are locked.

The workers run it (no extra process): their maintenance enqueues a pass as a job at
the front of the queue at most once per ``SAGAS_REAPER_INTERVAL`` fleet-wide, so no
worker's main loop is blocked by it, and a pass hands each next batch on as a new job,
so no worker is busy with it for more than a batch. One pass at a time holds the turn,
renewed with every batch, until it ends.

Liveness is judged on the database's clock and by the database heartbeat, so a Redis
flush never makes a live attempt look lost; and after an outage, or a gap between
passes, longer than a saga's lock expiry (every heartbeat looks stale then), nothing is
declared lost until one full expiry has been watched with the database reachable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, DateTimeField, F, Q, QuerySet, Value, When
from django.db.models.functions import Cast
from redis.exceptions import RedisError

from sagas import audit
from sagas.definitions import registry
from sagas.engine import apply, dispatch, rescue
from sagas.engine.apply import Loaded
from sagas.engine.connection import key, queue, redis
from sagas.engine.decisions import Outcome
from sagas.engine.executor import settle_dead_attempt
from sagas.engine.locks import Lease
from sagas.engine.plan import Plan, Schedule, StopAttempt
from sagas.engine.requests import BY_DEADLINE
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import AttemptOutcome, AuditAction

logger = logging.getLogger("sagas.engine")

LOST, WOKEN = "lost", "woken"
UNKNOWN_SAGA_EXPIRY_S = 60
TURN_KEY = key("reaper", "turn")
CADENCE_KEY = key("reaper", "cadence")
FOLLOW_UP_KEY = key("reaper", "follow-up")
WATCH_KEY = key("reaper", "watch")
REAPER_JOB = "sagas.engine.reaper.reaper_pass"
# Reconciliation runs as its own job on the same cadence mechanism; by dotted path, as
# the engine must not import what sits above it.
RECONCILE_CADENCE_KEY = key("reconcile", "cadence")
RECONCILE_JOB = "sagas.reconciliation.scheduled_run"
JOB_OPTIONS: dict[str, Any] = {"result_ttl": 0, "job_timeout": 600}


@dataclass
class ReapReport:
    lost_attempts: list[int] = field(default_factory=list)
    requeued_jobs: list[str] = field(default_factory=list)
    deadlines: list[str] = field(default_factory=list)
    stopped_jobs: int = 0
    stuck: list[str] = field(default_factory=list)
    waiting_for_watch: int = 0

    def merge(self, other: ReapReport) -> None:
        self.lost_attempts += other.lost_attempts
        self.requeued_jobs += other.requeued_jobs
        self.deadlines += other.deadlines
        self.stopped_jobs += other.stopped_jobs
        self.stuck += other.stuck
        self.waiting_for_watch += other.waiting_for_watch


@dataclass(frozen=True)
class Cursor:
    """Where a pass goes on: the stage and the last (time, id) it handled there."""

    stage: str = LOST
    after_time: str = ""
    after_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "after_time": self.after_time, "after_id": self.after_id}


# --- passes --------------------------------------------------------------------------------


def reap(now: datetime | None = None, *, force: bool = False) -> ReapReport | None:
    """A whole pass in this process (tests, commands); None if another pass holds the turn.

    ``now`` pretends the database's clock says so.
    """
    turn = _turn()
    if not force and not turn.acquire():
        return None
    report = ReapReport()
    try:
        cursor: Cursor | None = Cursor()
        first = True
        while cursor is not None:
            cursor = run_batch(report, cursor, now, first=first)
            first = False
            if not force:
                turn.renew()
    finally:
        if not force:
            turn.release()
    _log(report)
    return report


def reaper_pass(
    token: str = "", cursor: dict[str, str] | None = None, follow_up: bool = False
) -> None:
    """The RQ job: one batch of a pass, then the rest handed on at the front of the queue."""
    turn = _turn(token)
    if not (turn.renew() if token else turn.acquire()):
        if follow_up:  # a watch waits for it: come back once the running pass is done
            queue().enqueue_in(timedelta(seconds=1), REAPER_JOB, follow_up=True, **JOB_OPTIONS)
        return  # another pass holds the turn (or this one's turn ran out)
    nxt: Cursor | None = None
    try:
        report = ReapReport()
        start = cursor is None
        nxt = run_batch(report, Cursor(**cursor) if cursor else Cursor(), None, first=start)
        _log(report)
    finally:
        if nxt is None:
            turn.release()  # done, or failed: the next pass must not wait for a lease
    if nxt is not None:
        queue().enqueue(REAPER_JOB, turn.token, nxt.as_dict(), at_front=True, **JOB_OPTIONS)


def schedule_pass() -> bool:
    """From a worker's maintenance: enqueue a pass unless one was enqueued this interval."""
    interval_ms = max(1000, int(settings.SAGAS_REAPER_INTERVAL * 1000))
    if not redis().set(CADENCE_KEY, "1", nx=True, px=interval_ms):
        return False
    queue().enqueue(REAPER_JOB, at_front=True, **JOB_OPTIONS)
    return True


def schedule_reconciliation() -> bool:
    """From a worker's maintenance: enqueue a reconciliation run once per
    ``SAGAS_RECONCILE_INTERVAL`` fleet-wide (the run itself allows one at a time); ``0s``
    switches the schedule off (the test suite does)."""
    if settings.SAGAS_RECONCILE_INTERVAL <= 0:
        return False
    interval_ms = max(1000, int(settings.SAGAS_RECONCILE_INTERVAL * 1000))
    if not redis().set(RECONCILE_CADENCE_KEY, "1", nx=True, px=interval_ms):
        return False
    timeout = max(600, int(settings.SAGAS_RECONCILE_INTERVAL))
    queue().enqueue(RECONCILE_JOB, result_ttl=0, job_timeout=timeout)
    return True


def _turn(token: str = "") -> Lease:
    lease_s = max(60, 3 * settings.SAGAS_REAPER_INTERVAL)
    return Lease(redis(), TURN_KEY, lease_s, token)


def run_batch(
    report: ReapReport, cursor: Cursor, now: datetime | None, *, first: bool = False
) -> Cursor | None:
    """One batch of the cursor's stage; the cursor to go on from, or None at the end."""
    db_now = now or apply.database_now()
    if cursor.stage == LOST:
        watch = observe(db_now, first=first)
        nxt = _lost_batch(report, cursor, db_now, watch)
        return nxt or Cursor(WOKEN)
    return _woken_batch(report, cursor, db_now)


def _log(report: ReapReport) -> None:
    if report.lost_attempts or report.requeued_jobs or report.stuck or report.deadlines:
        logger.info(
            "reaper: %s lost attempts, %s jobs re-enqueued, %s deadlines, %s stuck",
            len(report.lost_attempts),
            len(report.requeued_jobs),
            len(report.deadlines),
            len(report.stuck),
        )


def _guarded(work: Callable[..., Any], *args: Any) -> Any:
    """One item's failure is logged and skipped: it must never stop the fleet's reaper."""
    try:
        return work(*args)
    except Exception:
        logger.exception("reaper: %s%r failed; skipped this pass", work.__name__, args[:1])
        return None


def _batch_size() -> int:
    return max(1, int(settings.SAGAS_REAPER_BATCH))


def _after(field_name: str, cursor: Cursor) -> Q:
    """Keyset pagination on (time, id): rows after the last one this pass handled."""
    if not cursor.after_time:
        return Q()
    moment = datetime.fromisoformat(cursor.after_time)
    return Q(**{f"{field_name}__gt": moment}) | Q(**{field_name: moment, "pk__gt": cursor.after_id})


# --- the watch: no bulk "lost" after an outage ------------------------------------------------


@dataclass(frozen=True)
class Watch:
    """Since when (database clock, epoch seconds) passes have watched without a gap longer
    than each lock expiry."""

    now: float
    since: dict[int, float]

    def observed(self, expiry_s: int) -> bool:
        since = self.since.get(expiry_s)
        return since is not None and self.now - since >= expiry_s


def watch_after(state: dict[str, float], now: float, expiries: set[int]) -> dict[str, float]:
    """The watch after a pass at ``now`` (pure): an expiry's watch starts again when the
    previous pass was longer ago than that expiry, or there is none on record."""
    last = state.get("last")
    gap = now - last if last is not None else math.inf
    updated = {"last": now}
    # Expiries only other workers know (a rolling deploy) restart on a gap too.
    known = {int(key.split(":")[1]) for key in state if key.startswith("since:")}
    for expiry in expiries | known:
        since = state.get(f"since:{expiry}")
        updated[f"since:{expiry}"] = now if since is None or gap > expiry else since
    return updated


def observe(db_now: datetime, *, first: bool) -> Watch:
    """Read (and at a pass's start, advance) the fleet-wide watch kept in Redis. Losing it
    only restarts the watch: the safe direction."""
    now = db_now.timestamp()
    try:
        raw = redis().hgetall(WATCH_KEY)
        state = {_text(k): float(v) for k, v in raw.items()}
        if first:
            state = watch_after(state, now, _expiries())
            redis().hset(WATCH_KEY, mapping=state)  # type: ignore[arg-type]
    except RedisError:
        state = {}
    since = {int(k.split(":")[1]): v for k, v in state.items() if k.startswith("since:")}
    return Watch(now, since)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _expiries() -> set[int]:
    return {registry.get(n).lock_expiry_s for n in registry.names()} | {UNKNOWN_SAGA_EXPIRY_S}


def _follow_up(expiry_s: int) -> None:
    """Come back within half an expiry, so the watch can complete without a gap."""
    delay = max(1.0, expiry_s / 2)
    try:
        if redis().set(FOLLOW_UP_KEY, "1", nx=True, px=int(delay * 1000)):
            queue().enqueue_in(timedelta(seconds=delay), REAPER_JOB, follow_up=True, **JOB_OPTIONS)
    except RedisError as exc:
        logger.warning("reaper: could not schedule its follow-up pass: %s", exc)


# --- attempts whose heartbeat expired ------------------------------------------------------


def lost_candidates(now: datetime, cursor: Cursor) -> QuerySet[StepAttempt]:
    """Running attempts whose heartbeat expired, oldest first (partial index on running;
    no join: the few that are declared lost load their step one by one)."""
    return (
        StepAttempt.objects.filter(
            _after("heartbeat_expires_at", cursor),
            outcome=AttemptOutcome.RUNNING,
            heartbeat_expires_at__lt=now,
        )
        .only(*LOST_FIELDS)
        .order_by("heartbeat_expires_at", "pk")[: _batch_size()]
    )


def _lost_batch(report: ReapReport, cursor: Cursor, now: datetime, watch: Watch) -> Cursor | None:
    candidates = list(lost_candidates(now, cursor))
    waiting = [a for a in candidates if not watch.observed(_lease(a))]
    foreign = _code_elsewhere([a for a in candidates if a not in waiting], now)
    for attempt in candidates:
        if attempt not in waiting and attempt not in foreign and _guarded(_declare_lost, attempt):
            report.lost_attempts.append(attempt.pk)
    if waiting:
        report.waiting_for_watch += len(waiting)
        _follow_up(min(_lease(a) for a in waiting))
    if len(candidates) < _batch_size():
        return None
    last = candidates[-1]
    assert last.heartbeat_expires_at is not None
    return Cursor(LOST, last.heartbeat_expires_at.isoformat(), str(last.pk))


LOST_FIELDS = (
    "pk",
    "kind",
    "number",
    "worker",
    "lock_key",
    "lock_token",
    "heartbeat_at",
    "heartbeat_expires_at",
    "step_id",
)


def _code_elsewhere(attempts: list[StepAttempt], now: datetime) -> list[StepAttempt]:
    """Attempts of steps this worker has no code for (an old worker in a rolling deploy):
    what comes after their loss is decided by a worker that has it. Only once no worker has
    claimed them for as long as jobs are handed back for the code are they settled here
    (and park their task, as the step's code is gone)."""
    if not attempts:
        return []
    steps = StepRecord.objects.filter(pk__in=[a.step_id for a in attempts])
    known = {
        row["pk"]
        for row in steps.values("pk", "name", "task__saga")
        if row["task__saga"] in registry and registry.get(row["task__saga"]).get_step(row["name"])
    }
    wait = timedelta(seconds=code_wait_s())
    return [
        a
        for a in attempts
        if a.step_id not in known and a.heartbeat_expires_at and now - a.heartbeat_expires_at < wait
    ]


def code_wait_s() -> float:
    """How long jobs are handed back for a worker with the code, at most."""
    return float(sum(min(2**n, 30) + 1 for n in range(settings.SAGAS_CODE_REQUEUES)))


def _lease(attempt: StepAttempt) -> int:
    """The lock expiry this attempt beats against (written with each heartbeat)."""
    if attempt.heartbeat_at is None or attempt.heartbeat_expires_at is None:
        return UNKNOWN_SAGA_EXPIRY_S
    return round((attempt.heartbeat_expires_at - attempt.heartbeat_at).total_seconds())


def _declare_lost(attempt: StepAttempt) -> bool:
    beat = attempt.heartbeat_at.isoformat() if attempt.heartbeat_at else None
    error = f"lost: no heartbeat from {attempt.worker or 'its worker'} since {beat}"
    with transaction.atomic():
        if not settle_dead_attempt(attempt, Outcome(AttemptOutcome.LOST, error=error)):
            return False
        task = TaskInstance.objects.get(pk=attempt.step.task_id)
        details = {
            "kind": attempt.kind,
            "attempt": attempt.number,
            "worker": attempt.worker,
            "last_heartbeat": beat,
        }
        audit.record(task, AuditAction.ATTEMPT_LOST, step=attempt.step, details=details)
    return True


# --- tasks whose wake-up time passed -------------------------------------------------------


def woken_candidates(now: datetime, cursor: Cursor) -> QuerySet[TaskInstance, Any]:
    """Tasks whose wake-up time passed, earliest first (partial index on wake_at)."""
    return (
        TaskInstance.objects.filter(_after("wake_at", cursor), wake_at__lt=now)
        .order_by("wake_at", "pk")
        .values_list("pk", "wake_at")[: _batch_size()]
    )


def _woken_batch(report: ReapReport, cursor: Cursor, now: datetime) -> Cursor | None:
    woken = list(woken_candidates(now, cursor))
    if woken:
        _visit([pk for pk, _ in woken], now, report)
    if len(woken) < _batch_size():
        return None
    pk, moment = woken[-1]
    assert moment is not None  # the filter is wake_at < now
    return Cursor(WOKEN, moment.isoformat(), str(pk))


def _visit(task_ids: list[Any], now: datetime, report: ReapReport) -> None:
    """Look at a batch without locks; rescue (locked) only the tasks that need it."""
    timing = apply.timing()
    plans = apply.load_plans(task_ids, now)
    states = dispatch.job_states(jid for plan in plans for jid in rescue.jobs_to_check(plan))
    later: dict[Any, tuple[datetime | None, Plan]] = {}
    for plan in plans:
        try:
            if rescue.needs_rescue(plan, states, timing):
                _guarded(_rescue, plan.task.pk, report)
            else:
                later[plan.task.pk] = (_next_look(plan, states, timing, report), plan)
        except Exception:  # one task's rows must never stop the fleet's reaper
            logger.exception("reaper: task %s could not be judged; looked at later", plan.task.pk)
            later[plan.task.pk] = (plan.now + timing.stuck_after, plan)
    _postpone(later)


def _next_look(
    plan: Plan, states: dict[str, str], timing: rescue.Timing, report: ReapReport
) -> datetime | None:
    """When to look again at a task that needs nothing now: its own wake-up time, or,
    while its jobs wait for a worker, a little later each time."""
    if rescue.stuck(plan, states, timing):
        report.stuck.append(str(plan.task.pk))
        logger.warning("reaper: task %s is stuck and nothing it could do moves it", plan.task.pk)
        return plan.now + timing.stuck_after
    wake = rescue.wake_time(plan, timing)
    if wake is None or wake > plan.now + timing.grace:
        return wake  # nothing to wait for, or a real moment ahead (a retry, a deadline)
    # Its jobs wait for a free worker: look again later the longer it has waited.
    unchanged = plan.now - (plan.task.updated_at or plan.now)
    return plan.now + min(max(timing.grace, unchanged), timing.stuck_after)


def _postpone(later: dict[Any, tuple[datetime | None, Plan]]) -> None:
    """One UPDATE for the whole batch (it is not a change of the task: no updated_at).
    Only rows unchanged since the batch read them: a decision that committed meanwhile
    wrote its own wake-up time, which a value computed from older rows must not undo."""
    if not later:
        return
    moment = DateTimeField()
    # Cast: in a CASE, Postgres would otherwise take the bound parameters for text.
    whens = [
        When(
            pk=pk,
            wake_at=plan.task.wake_at,
            updated_at=plan.task.updated_at,
            then=Cast(Value(at), moment),
        )
        for pk, (at, plan) in later.items()
    ]
    TaskInstance.objects.filter(pk__in=list(later)).update(
        wake_at=Case(*whens, default=F("wake_at"), output_field=moment)
    )


def _rescue(task_id: Any, report: ReapReport) -> None:
    def decide(loaded: Loaded) -> list[Any]:
        plan = loaded.plan
        if plan.task.wake_at is None or plan.task.wake_at > plan.now:
            return []  # it moved on since the batch looked
        states = dispatch.job_states(rescue.jobs_to_check(plan))
        rescue.rescue(plan, states, apply.timing())
        return list(plan.effects)

    effects = apply.decide(task_id, decide)
    for effect in effects:
        if isinstance(effect, Schedule):
            report.requeued_jobs.append(effect.job_id)
            logger.warning("reaper re-enqueues %s for task %s", effect.job_id, task_id)
        elif isinstance(effect, StopAttempt):
            report.stopped_jobs += 1
        elif getattr(effect, "details", None) and effect.details.get("by") == BY_DEADLINE:
            report.deadlines.append(str(task_id))


# --- an operator's push for one stuck task -------------------------------------------------


@dataclass
class Push:
    """What pushing a stuck task did: attempts settled as lost, jobs enqueued."""

    lost_attempts: int = 0
    jobs: list[str] = field(default_factory=list)


def is_stuck(task_id: Any) -> bool:
    """The design's one definition, judged now on the task's unlocked rows."""
    plans = apply.load_plans([task_id], apply.database_now())
    if not plans:
        return False
    states = dispatch.job_states(rescue.jobs_to_check(plans[0]))
    return rescue.stuck(plans[0], states, apply.timing())


def push_stuck(task_id: Any) -> Push:
    """Do for one task what a reaper pass would, now: its attempts whose heartbeat expired
    are settled as lost (the operator has looked, so a full expiry need not be watched
    first), then whatever it should have queued is enqueued, under its row lock."""
    pushed = Push()
    expired = StepAttempt.objects.filter(
        step__task_id=task_id,
        outcome=AttemptOutcome.RUNNING,
        heartbeat_expires_at__lt=apply.database_now(),
    ).only(*LOST_FIELDS)
    pushed.lost_attempts = sum(_declare_lost(attempt) for attempt in expired)

    def decide(loaded: Loaded) -> list[str]:
        plan = loaded.plan
        rescue.rescue(plan, dispatch.job_states(rescue.jobs_to_check(plan)), apply.timing())
        return [e.job_id for e in plan.effects if isinstance(e, Schedule)]

    pushed.jobs = apply.decide(task_id, decide)
    for job in pushed.jobs:
        logger.warning("an operator's push re-enqueues %s for task %s", job, task_id)
    return pushed
