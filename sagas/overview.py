"""What the console shows: cheap, bounded reads of the database and Redis.

Nothing here changes anything; the console's actions go through ``sagas.services``. Every
function runs a fixed number of queries whatever the number of tasks (the console's pages
are tested for that), and Redis being down degrades a panel, never a page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from django.db import connection
from django.db.models import Case, Count, F, Max, Min, Q, Value, When
from django.db.models.functions import StrIndex, Substr
from django.utils import timezone
from redis.exceptions import RedisError
from rq import Worker

from sagas import health
from sagas.definitions import CircuitBreakerPolicy, registry
from sagas.engine import apply, dispatch, rescue
from sagas.engine.breaker import all_states
from sagas.engine.connection import queue, redis
from sagas.engine.locks import lock_names, task_of_lock
from sagas.models import (
    AuditEntry,
    BulkOperation,
    Finding,
    FindingKind,
    FindingState,
    ReconciliationRun,
    StepAttempt,
    StepRecord,
    TaskInstance,
)
from sagas.states import (
    ACTIVE_TASK_STATUSES,
    AttemptOutcome,
    AuditAction,
    StepStatus,
    TaskStatus,
)

# Statuses that wait for an operator: counted exactly, listed in the inbox.
ATTENTION_STATUSES = (TaskStatus.COMPENSATION_FAILED, TaskStatus.DEAD_LETTERED)
EXACT_STATUSES = (*sorted(ACTIVE_TASK_STATUSES), *ATTENTION_STATUSES)
FAILURE_ACTIONS = (
    AuditAction.STEP_FAILED,
    AuditAction.ATTEMPT_LOST,
    AuditAction.COMPENSATION_FAILED,
    AuditAction.DEAD_LETTERED,
)
# Bounds that keep every panel cheap on a million tasks.
STUCK_SAMPLE = 200
# The dashboard judges fewer candidates on each refresh; the filtered list shows them all.
DASHBOARD_STUCK_SAMPLE = 50
LOCK_SAMPLE = 500
INBOX_SAMPLE = 5000
# Below this many tasks (the planner's estimate) finished tasks are counted exactly.
EXACT_BELOW_ROWS = 200_000


# --- tasks by status ---------------------------------------------------------------------


@dataclass(frozen=True)
class StatusCount:
    status: str
    count: int
    exact: bool

    @property
    def label(self) -> str:
        return TaskStatus(self.status).label


def status_counts() -> list[StatusCount]:
    """Exact counts where an operator acts on the number (active and parked tasks: each an
    index range), planner estimates for the finished ones (a full count is a table scan)."""
    exact = dict(
        TaskInstance.objects.filter(status__in=EXACT_STATUSES)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    finished = [s for s in TaskStatus if s not in EXACT_STATUSES]
    estimates = _estimated_counts(finished)
    return [
        StatusCount(s.value, exact.get(s.value, 0), True) for s in TaskStatus if s in EXACT_STATUSES
    ] + [StatusCount(s.value, estimates.get(s.value, 0), estimates.exact) for s in finished]


class _Counts(dict[str, int]):
    exact = True


def _estimated_counts(statuses: list[TaskStatus]) -> _Counts:
    counts = _Counts()
    if connection.vendor == "postgresql" and _estimated_rows() > EXACT_BELOW_ROWS:
        counts.update(_planner_estimates())
        counts.exact = False
        return counts
    # A small table (and SQLite, the demo's database) is counted exactly: that is cheap.
    counts.update(
        TaskInstance.objects.filter(status__in=statuses)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    return counts


def _estimated_rows() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
            [TaskInstance._meta.db_table],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _planner_estimates() -> dict[str, int]:
    """Rows per status from Postgres' statistics (ANALYZE): the table's row estimate times
    each status' most-common-value frequency. One catalogue query, no table scan."""
    sql = """
        SELECT v.status, round(c.reltuples * v.freq)::bigint
        FROM pg_class c, pg_stats s,
             LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs)
                 AS v(status, freq)
        WHERE c.oid = %s::regclass AND s.tablename = %s AND s.attname = 'status'
          AND s.schemaname = current_schema() AND c.reltuples > 0
    """
    table = TaskInstance._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(sql, [table, table])
        return {status: int(n) for status, n in cursor.fetchall()}


# --- needing attention ---------------------------------------------------------------------


def stuck_task_ids(limit: int = STUCK_SAMPLE) -> list[Any]:
    """Tasks stuck by the design's one definition (``rescue.stuck``): active, no fresh
    attempt, no job queued or scheduled, unchanged for longer than ``SAGAS_STUCK_AFTER``."""
    timing = apply.timing()
    now = apply.database_now()
    candidates = list(
        TaskInstance.objects.filter(
            status__in=ACTIVE_TASK_STATUSES, updated_at__lt=now - timing.stuck_after
        )
        .order_by("updated_at")
        .values_list("pk", flat=True)[:limit]
    )
    if not candidates:
        return []
    plans = apply.load_plans(candidates, now)
    jobs = [jid for plan in plans for jid in rescue.jobs_to_check(plan)]
    try:
        states = dispatch.job_states(jobs)
    except RedisError:
        return []  # without Redis nobody can tell a queued job from a missing one
    return [plan.task.pk for plan in plans if rescue.stuck(plan, states, timing)]


def failures_since(since: datetime) -> int:
    """Failed, lost and parked work since ``since`` (audit index on action and time)."""
    return AuditEntry.objects.filter(action__in=FAILURE_ACTIONS, created_at__gte=since).count()


# --- queues, workers, breakers ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerView:
    name: str
    state: str
    last_heartbeat: datetime | None
    current_job: str


def queue_summary() -> dict[str, Any] | None:
    """Depth, scheduled, started and failed jobs and the oldest wait; None without Redis."""
    try:
        return next(iter(health.queue_depths().values()))
    except RedisError:
        return None


def workers() -> list[WorkerView] | None:
    try:
        found = Worker.all(queue=queue())
    except RedisError:
        return None
    views = [
        WorkerView(w.name, w.get_state(), _aware(w.last_heartbeat), w.get_current_job_id() or "")
        for w in found
        if w is not None
    ]
    return sorted(views, key=lambda w: w.name)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@dataclass
class BreakerView:
    name: str
    state: str
    failures: int
    open_until: datetime | None
    policy: CircuitBreakerPolicy | None
    steps: list[str] = field(default_factory=list)


def breakers() -> list[BreakerView] | None:
    """Declared breakers and any found in Redis (a removed step's), with their state."""
    declared = registry.breakers()
    try:
        states = all_states(redis(), declared)
    except RedisError:
        return None
    now = time.time()
    return [
        BreakerView(
            name,
            state.status(now),
            state.failures,
            datetime.fromtimestamp(state.open_until, UTC) if state.open_until else None,
            declared.get(name, (None, []))[0],
            declared.get(name, (None, []))[1],
        )
        for name, state in sorted(states.items())
    ]


def open_breakers() -> list[BreakerView] | None:
    found = breakers()
    return None if found is None else [b for b in found if b.state != "closed"]


# --- locks -------------------------------------------------------------------------------------


@dataclass
class LockView:
    key: str
    token: str
    task_id: str
    expires_in_s: float | None
    attempt: StepAttempt | None

    @property
    def holder_alive(self) -> bool:
        """The holding attempt is running and its database heartbeat has not expired."""
        a = self.attempt
        if a is None or a.outcome != AttemptOutcome.RUNNING:
            return False
        return a.heartbeat_expires_at is None or a.heartbeat_expires_at > timezone.now()

    @property
    def age(self) -> timedelta | None:
        return timezone.now() - self.attempt.started_at if self.attempt else None


def locks(limit: int = LOCK_SAMPLE) -> list[LockView] | None:
    """Held task locks (at most ``limit``), each with the attempt that holds its token."""
    try:
        held = _held_locks(limit)
    except RedisError:
        return None
    attempts = {
        a.lock_token: a
        for a in StepAttempt.objects.filter(lock_token__in=[token for _, token, _ in held])
        .select_related("step")
        .order_by("pk")
    }
    return [
        LockView(name, token, task_of_lock(name), ttl, attempts.get(token))
        for name, token, ttl in held
    ]


def _held_locks(limit: int) -> list[tuple[str, str, float | None]]:
    client = redis()
    names = list(islice(lock_names(client), limit))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
        pipe.pttl(name)
    raw = pipe.execute()
    held = []
    for name, token, ttl in zip(names, raw[::2], raw[1::2], strict=True):
        if token is not None:
            held.append((name, token.decode(), ttl / 1000 if ttl and ttl > 0 else None))
    return sorted(held)


# --- the inbox ----------------------------------------------------------------------------------


@dataclass
class InboxGroup:
    """Parked tasks failing the same way: one saga, one step, one error type."""

    status: str
    saga: str
    step: str
    error_type: str
    count: int
    first_seen: datetime
    last_seen: datetime
    example_error: str


def inbox_groups() -> list[InboxGroup]:
    """``compensation_failed`` tasks by the undo that failed, ``dead_lettered`` ones by the
    step that exhausted its retries; each with its error type (the exception class).

    Grouped in SQL by the text before the message's first colon (error messages name ids,
    so grouping by message would make a group per task): a few rows come back whatever
    the number of parked tasks; Python only folds heads that are no class name into
    "other"."""
    failing = Q(task__status=TaskStatus.COMPENSATION_FAILED, status=StepStatus.COMPENSATION_FAILED)
    failing |= Q(task__status=TaskStatus.DEAD_LETTERED, status=StepStatus.FAILED, critical=True)
    message = Case(
        When(task__status=TaskStatus.COMPENSATION_FAILED, then=F("compensation_error")),
        default=F("error"),
    )
    rows = (
        StepRecord.objects.filter(failing, task__status__in=ATTENTION_STATUSES)
        .annotate(message=message)
        .annotate(colon=StrIndex("message", Value(":")))
        .annotate(
            head=Case(
                When(colon__gt=1, then=Substr("message", 1, F("colon") - 1)),
                default=Value(""),
            )
        )
        .values_list("task__status", "task__saga", "name", "head")
        .annotate(
            n=Count("pk"),
            first=Min("task__finished_at"),
            last=Max("task__updated_at"),
            example=Max(Substr("message", 1, 500)),
        )
        .order_by()[:INBOX_SAMPLE]
    )
    groups: dict[tuple[str, str, str, str], InboxGroup] = {}
    for status, saga, step, head, n, first, last, example in rows:
        kind = error_type(f"{head}:" if head else "")
        group = groups.get((status, saga, step, kind))
        if group is None:
            groups[(status, saga, step, kind)] = InboxGroup(
                status, saga, step, kind, n, first or last, last, example or ""
            )
        else:
            group.count += n
            group.first_seen = min(group.first_seen, first or last)
            group.last_seen = max(group.last_seen, last)
    return sorted(groups.values(), key=lambda g: (-g.count, g.saga, g.step, g.error_type))


def error_type(message: str) -> str:
    """The exception class an engine error starts with (``"ValueError: ..."``)."""
    head = (message or "").split(":", 1)[0].strip()
    return head if head and " " not in head and len(head) <= 100 else "other"


# --- bulk operations ----------------------------------------------------------------------------

RECENT_BULK = 5


def recent_bulk_operations() -> list[BulkOperation]:
    """The latest bulk actions, so one left running (or stalled) is visible to everyone."""
    return list(
        BulkOperation.objects.defer("target_ids").order_by("-created_at", "-pk")[:RECENT_BULK]
    )


# --- reconciliation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingsSummary:
    """Open findings by kind (every kind, zeros included) and the latest run."""

    open_by_kind: list[tuple[str, int]]
    latest_run: ReconciliationRun | None

    @property
    def open_total(self) -> int:
        return sum(n for _, n in self.open_by_kind)


def findings_summary() -> FindingsSummary:
    """One GROUP BY over the open findings (the state index), and the latest run."""
    counted = dict(
        Finding.objects.filter(state=FindingState.OPEN)
        .values_list("kind")
        .annotate(n=Count("pk"))
        .order_by()
    )
    return FindingsSummary(
        [(kind, counted.get(kind, 0)) for kind in FindingKind.values],
        ReconciliationRun.objects.order_by("-started_at", "-pk").first(),
    )
