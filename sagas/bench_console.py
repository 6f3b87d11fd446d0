"""``manage.py bench console``: the console's pages on a million tasks.

The audit table is append-only, so the bench never writes to the configured database: it
creates a scratch database beside it on the same server (``<configured name>_bench_console``),
points Django's default connection at it for the duration (as Django's test runner does
for a test database: every ORM query, raw cursor, session and login of the pages then reads
the scratch database, which a second connection alias would not give, since the console
also uses ``django.db.connection`` directly), migrates it, and fills it with COPY:

- every secondary index, unique constraint and foreign key of the four large tables (tasks,
  steps, attempts, audit entries) is dropped first and rebuilt afterwards from the
  definitions read from the catalogue (checked identical at the end), so the load appends
  rows and the indexes are each built once, sorted;
- one Python generator makes each task with its steps, attempts and audit entries, written
  to four COPY streams on four connections at once (the server parses them in parallel
  while Python generates); nothing is held in memory but the current task;
- then the sequences are moved past the ids written, and ``VACUUM (ANALYZE)`` gives the
  planner its statistics and the tables the visibility map a long-lived table has.

Then it measures each page through Django's test client, logged in as a superuser of the
scratch database, and drops the database (also on error or Ctrl-C) unless ``--keep``.
See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import math
import os
import random
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import reverse

from sagas import overview
from sagas.bench import BenchError, database_pointed_at, drop_database
from sagas.models import (
    AuditEntry,
    Finding,
    FindingKind,
    FindingState,
    ReconciliationRun,
    RunStatus,
    RunTrigger,
    StepAttempt,
    StepRecord,
    TaskInstance,
)
from sagas.states import (
    ACTIVE_TASK_STATUSES,
    AttemptKind,
    AttemptOutcome,
    AuditAction,
    CompensationReason,
    StepStatus,
    TaskStatus,
)

DEFAULT_TASKS = 1_000_000
MIN_TASKS = 100
DEFAULT_REPEAT = 20
WARMUPS = 2
GOAL_MS = 150.0
SCRATCH_SUFFIX = "_bench_console"
USERNAME = "bench-console"
SEED = 20261201
SPAN = timedelta(days=30)  # tasks are created evenly over the last 30 days
NEWEST_SHARE = 0.01  # the active tasks are among the newest 1% ...
ACTIVE_SHARE = 0.4  # ... 40% of them
FINDINGS_EVERY = 250  # one finding per 250 tasks (4,000 at a million)
RUNS = 10
REPORT_EVERY = 10_000
LARGE_TABLES = tuple(m._meta.db_table for m in (TaskInstance, StepRecord, StepAttempt, AuditEntry))
MAINTENANCE_WORK_MEM = "512MB"

# (phase, done, total); phases are shown as they are named here.
Progress = Callable[[str, int, int], None]


class ConsoleBenchError(BenchError):
    """The console benchmark could not run; the message is one line."""


# --- what the tasks look like -----------------------------------------------------------

A, C = AttemptKind.ACTION.value, AttemptKind.COMPENSATION.value
OK, FAIL = AttemptOutcome.SUCCEEDED.value, AttemptOutcome.FAILED.value
FINISHED_STEP_STATUSES = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
        StepStatus.CANCELLED,
    }
)


@dataclass(frozen=True)
class StepShape:
    status: str
    attempts: tuple[tuple[str, int, str], ...] = ()  # (kind, number, outcome)
    error: bool = False  # the action's error is recorded on the step
    compensation_error: bool = False
    retry_scheduled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", str(self.status))  # the value, not the enum

    @functools.cached_property
    def action_attempts(self) -> int:
        return sum(1 for kind, _, _ in self.attempts if kind == A)

    @functools.cached_property
    def compensation_attempts(self) -> int:
        return len(self.attempts) - self.action_attempts


def _attempts(*spec: tuple[str, str]) -> tuple[tuple[str, int, str], ...]:
    numbers: dict[str, int] = {}
    out = []
    for kind, outcome in spec:
        numbers[kind] = numbers.get(kind, 0) + 1
        out.append((str(kind), numbers[kind], str(outcome)))
    return tuple(out)


SUCCEEDED = StepShape(StepStatus.SUCCEEDED, _attempts((A, OK)))
RETRIED = StepShape(StepStatus.SUCCEEDED, _attempts((A, FAIL), (A, OK)))
FAILED = StepShape(StepStatus.FAILED, _attempts((A, FAIL), (A, FAIL), (A, FAIL)), error=True)
SKIPPED = StepShape(StepStatus.SKIPPED)
PENDING = StepShape(StepStatus.PENDING)
RUNNING = StepShape(StepStatus.RUNNING, _attempts((A, AttemptOutcome.RUNNING)))
WAITING = StepShape(
    StepStatus.WAITING_RETRY, _attempts((A, FAIL)), error=True, retry_scheduled=True
)
UNDONE = StepShape(StepStatus.COMPENSATED, _attempts((A, OK), (C, OK)))
UNDOING = StepShape(StepStatus.COMPENSATING, _attempts((A, OK), (C, AttemptOutcome.RUNNING)))
UNDO_FAILED = StepShape(
    StepStatus.COMPENSATION_FAILED,
    _attempts((A, OK), (C, FAIL), (C, FAIL), (C, FAIL)),
    compensation_error=True,
)
STOPPED = StepShape(StepStatus.CANCELLED, _attempts((A, AttemptOutcome.CANCELLED)))
# The task page's case: 47 failed attempts of one step before it succeeded; 50 in all.
MANY = StepShape(StepStatus.SUCCEEDED, _attempts(*[(A, FAIL)] * 47, (A, OK)))

# Audit entries: (action, step index or None, from status, to status, by the operator)
Entry = tuple[str, int | None, str, str, bool]
T, S = TaskStatus, AuditAction


def _entry(action: str, step: int | None = None, before: str = "", after: str = "") -> Entry:
    return (str(action), step, str(before), str(after), False)


def _by_operator(action: str, before: str = "", after: str = "") -> Entry:
    return (str(action), None, str(before), str(after), True)


STARTED = _entry(S.STARTED, None, "", T.PENDING)


def _ok(i: int) -> Entry:
    return _entry(S.STEP_SUCCEEDED, i)


def _failed(i: int) -> Entry:
    return _entry(S.STEP_FAILED, i)


def _retry(i: int) -> Entry:
    return _entry(S.RETRY_SCHEDULED, i)


@dataclass(frozen=True)
class TaskShape:
    status: str
    steps: tuple[StepShape, StepShape, StepShape]
    audit: tuple[Entry, ...]
    current: int | None = None  # the step the task is at (or stopped at)
    reason: str = ""  # compensation_reason
    failure: bool = False  # an error summary
    cancelled: bool = False
    resolved: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", str(self.status))

    @functools.cached_property
    def finished(self) -> bool:
        return self.status not in ACTIVE_TASK_STATUSES

    @functools.cached_property
    def undo_failed(self) -> bool:
        """Its error summary is a compensation's error."""
        return any(step.compensation_error for step in self.steps)


UNDO = CompensationReason.FAILURE.value
CANCEL = CompensationReason.CANCEL.value
SHAPES: dict[str, TaskShape] = {
    "completed": TaskShape(
        T.COMPLETED,
        (SUCCEEDED, SUCCEEDED, SUCCEEDED),
        (STARTED, _ok(0), _ok(1), _ok(2), _entry(S.COMPLETED, None, T.RUNNING, T.COMPLETED)),
    ),
    "completed after a retry": TaskShape(
        T.COMPLETED,
        (SUCCEEDED, RETRIED, SUCCEEDED),
        (
            STARTED,
            _ok(0),
            _failed(1),
            _retry(1),
            _ok(1),
            _ok(2),
            _entry(S.COMPLETED, None, T.RUNNING, T.COMPLETED),
        ),
    ),
    "compensated": TaskShape(
        T.COMPENSATED,
        (UNDONE, FAILED, SKIPPED),
        (
            STARTED,
            _ok(0),
            _failed(1),
            _entry(S.COMPENSATION_STARTED, 0),
            _entry(S.STEP_COMPENSATED, 0),
            _entry(S.COMPENSATED, None, T.COMPENSATING, T.COMPENSATED),
        ),
        current=1,
        reason=UNDO,
        failure=True,
    ),
    "failed": TaskShape(
        T.FAILED,
        (SUCCEEDED, FAILED, SKIPPED),
        (STARTED, _ok(0), _failed(1), _entry(S.FAILED, None, T.RUNNING, T.FAILED)),
        current=1,
        failure=True,
    ),
    "cancelled": TaskShape(
        T.CANCELLED,
        (UNDONE, STOPPED, SKIPPED),
        (
            STARTED,
            _ok(0),
            _by_operator(S.CANCEL_REQUESTED, T.RUNNING, T.CANCELLING),
            _entry(S.STEP_COMPENSATED, 0),
            _entry(S.CANCELLED, None, T.CANCELLING, T.CANCELLED),
        ),
        current=1,
        reason=CANCEL,
        cancelled=True,
    ),
    "resolved": TaskShape(
        T.RESOLVED,
        (UNDO_FAILED, FAILED, SKIPPED),
        (
            STARTED,
            _ok(0),
            _failed(1),
            _entry(S.COMPENSATION_FAILED, 0, T.COMPENSATING, T.COMPENSATION_FAILED),
            _by_operator(S.RESOLVED, T.COMPENSATION_FAILED, T.RESOLVED),
        ),
        current=0,
        reason=UNDO,
        failure=True,
        resolved=True,
    ),
    "compensation_failed": TaskShape(
        T.COMPENSATION_FAILED,
        (UNDO_FAILED, FAILED, SKIPPED),
        (
            STARTED,
            _ok(0),
            _failed(1),
            _entry(S.COMPENSATION_STARTED, 0),
            _entry(S.COMPENSATION_FAILED, 0, T.COMPENSATING, T.COMPENSATION_FAILED),
        ),
        current=0,
        reason=UNDO,
        failure=True,
    ),
    "dead_lettered": TaskShape(
        T.DEAD_LETTERED,
        (SUCCEEDED, FAILED, PENDING),
        (
            STARTED,
            _ok(0),
            _failed(1),
            _retry(1),
            _entry(S.DEAD_LETTERED, None, T.RUNNING, T.DEAD_LETTERED),
        ),
        current=1,
        failure=True,
    ),
    "running": TaskShape(
        T.RUNNING,
        (SUCCEEDED, RUNNING, PENDING),
        (STARTED, _ok(0), _entry(S.STEP_STARTED, 1)),
        current=1,
    ),
    "pending": TaskShape(T.PENDING, (PENDING, PENDING, PENDING), (STARTED,)),
    "waiting_retry": TaskShape(
        T.WAITING_RETRY,
        (SUCCEEDED, WAITING, PENDING),
        (STARTED, _ok(0), _failed(1), _retry(1)),
        current=1,
    ),
    "compensating": TaskShape(
        T.COMPENSATING,
        (UNDOING, FAILED, SKIPPED),
        (STARTED, _ok(0), _failed(1), _entry(S.COMPENSATION_STARTED, 0)),
        current=0,
        reason=UNDO,
        failure=True,
    ),
    "cancelling": TaskShape(
        T.CANCELLING,
        (SUCCEEDED, RUNNING, PENDING),
        (STARTED, _ok(0), _by_operator(S.CANCEL_REQUESTED, T.RUNNING, T.CANCELLING)),
        current=1,
        reason=CANCEL,
        cancelled=True,
    ),
}
DETAIL_SHAPE = TaskShape(
    T.COMPLETED,
    (SUCCEEDED, MANY, SUCCEEDED),
    (
        STARTED,
        _ok(0),
        *[entry for _ in range(47) for entry in (_failed(1), _retry(1))],
        _ok(1),
        _ok(2),
        _entry(S.COMPLETED, None, T.RUNNING, T.COMPLETED),
    ),
)
# Per 100,000 of the older tasks (all finished) ...
OLDER_MIX = {
    "completed": 77_000,
    "completed after a retry": 9_000,
    "compensated": 5_000,
    "failed": 2_000,
    "cancelled": 3_000,
    "resolved": 700,
    "compensation_failed": 300,
    "dead_lettered": 200,
}
# ... and among the newest, the active ones.
ACTIVE_MIX = {
    "running": 30,
    "pending": 20,
    "waiting_retry": 30,
    "compensating": 10,
    "cancelling": 10,
}


@dataclass(frozen=True)
class SagaShape:
    name: str
    steps: tuple[str, str, str]
    keyed: bool  # its tasks have business keys
    weight: int

    @functools.cached_property
    def after(self) -> tuple[str, str, str]:
        """Each step waits for the one before it (JSON, as the engine records it)."""
        a, b, _ = self.steps
        return ("[]", json.dumps([a]), json.dumps([b]))


# "chaos" is one of the shipped sagas (its task page knows its steps); the two others
# are not registered, like the sagas of a deploy that removed them.
SAGA_SHAPES = (
    SagaShape("chaos", ("reserve", "charge", "ship"), True, 60),
    SagaShape("billing", ("authorize", "capture", "receipt"), False, 25),
    SagaShape("shipping", ("pick", "pack", "dispatch"), False, 15),
)
ACTION_ERRORS = (
    "TimeoutError: the payment gateway did not answer within 30 s",
    "ConnectionError: connection reset by peer",
    "ValueError: the amount must be positive",
)
COMPENSATION_ERRORS = (
    "RefundError: the gateway refused the refund",
    "TimeoutError: the refund service did not answer within 30 s",
    "PermissionError: the refund window has closed",
)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/sagas/engine/executor.py", line 212, in run_step\n'
    "    result = definition.action(ctx)\n"
    '  File "/app/sagas/examples/chaos.py", line 88, in charge\n'
    "    raise ChaosFailure(message)\n"
)
WORKERS = tuple(f"worker-{i}@ops-{i % 2}" for i in range(8))


def _cumulative(weights: Sequence[int]) -> list[int]:
    total, cumulative = 0, []
    for weight in weights:
        total += weight
        cumulative.append(total)
    return cumulative


# --- the command -------------------------------------------------------------------------


def add_parser(benchmarks: Any) -> None:
    """``bench console``'s subparser (``benchmarks`` is ``bench``'s subparsers action)."""
    parser = benchmarks.add_parser(
        "console",
        help="Time the console's pages on a scratch database of a million tasks (Postgres).",
        description=(
            "Create a scratch Postgres database beside the configured one, fill it with COPY "
            "(tasks, steps, attempts, audit entries, findings), time the console's pages "
            "through Django's test client and count their queries; drop the database."
        ),
    )
    parser.add_argument(
        "--tasks",
        default=str(DEFAULT_TASKS),
        help=f"How many tasks to make (default {DEFAULT_TASKS}, at least {MIN_TASKS}).",
    )
    parser.add_argument(
        "--repeat",
        default=str(DEFAULT_REPEAT),
        help=f"Timed requests per page, after {WARMUPS} warm-ups (default {DEFAULT_REPEAT}).",
    )
    parser.add_argument(
        "--keep", action="store_true", help="Keep the scratch database (drop it yourself)."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")


def handle(command: BaseCommand, options: dict[str, Any]) -> None:
    """``bench console``: exit 2 on bad options or without Postgres, 1 when it fails."""
    tasks = _whole(options["tasks"], "--tasks", MIN_TASKS)
    repeat = _whole(options["repeat"], "--repeat", 1)
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "postgresql":
        raise CommandError(
            f"bench console needs Postgres (set DATABASE_URL to a postgres:// URL); the "
            f"configured database is {connection.vendor}",
            returncode=2,
        )
    as_json = options["json"]
    progress = None if as_json or not command.stderr.isatty() else _progress_line(command.stderr)
    try:
        figures = console_bench(tasks, repeat=repeat, keep=options["keep"], progress=progress)
    except BenchError as exc:
        raise CommandError(str(exc), returncode=1) from exc
    finally:
        if progress is not None:
            command.stderr.write("\r\033[K", style_func=lambda text: text, ending="")
    if as_json:
        command.stdout.write(json.dumps(figures.as_json(), sort_keys=True))
    else:
        command.stdout.write(table(figures))


def _whole(value: Any, option: str, least: int) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        number = least - 1
    if number < least:
        raise CommandError(
            f"{option} must be a whole number of at least {least}, not {value!r}", returncode=2
        )
    return number


def _progress_line(stream: Any) -> Progress:
    def show(phase: str, done: int, total: int) -> None:
        of = f"/{total:,}" if total else ""
        count = f": {done:,}{of}" if done or total else ""
        stream.write(f"\r\033[K{phase}{count}", style_func=lambda text: text, ending="")
        stream.flush()

    return show


# --- figures -----------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below
    it (p95 of 20 samples is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class PageFigures:
    url: str
    times_ms: list[float] = field(default_factory=list)
    sql_ms: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    slowest_ms: float = 0.0
    slowest_sql: str = ""

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p95_ms(self) -> float:
        return percentile(self.times_ms, 0.95)

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "p50_ms": round(self.p50_ms, 1),
            "p95_ms": round(self.p95_ms, 1),
            "max_ms": round(max(self.times_ms), 1),
            "sql_p50_ms": round(statistics.median(self.sql_ms), 1),
            "queries": max(self.queries),
            "queries_min": min(self.queries),
            "slowest_query": {"ms": round(self.slowest_ms, 1), "sql": self.slowest_sql[:300]},
        }


@dataclass
class CountQuery:
    """A COUNT over one of the large tables that no LIMIT caps, as one page ran it."""

    page: str
    sql: str
    ms: float
    rows_read: int | None = None  # the most rows one scan of its plan read (EXPLAIN ANALYZE)

    def as_json(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "sql": self.sql,  # whole: where its COUNT sits depends on the query
            "ms": round(self.ms, 1),
            "rows_read": self.rows_read,
        }


@dataclass
class ConsoleFigures:
    tasks: int
    rows: dict[str, int]
    statuses: dict[str, int]
    seconds: dict[str, float]
    repeat: int
    pages: dict[str, PageFigures]
    counts: list[CountQuery]
    redis: bool
    database: str
    kept: bool
    postgres: str
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after measuring

    @property
    def worst_page(self) -> str:
        return max(self.pages, key=lambda name: self.pages[name].p95_ms)

    @property
    def ratio(self) -> float:
        """The slowest page's p95 over the 150 ms goal: below 1.0 every page meets it."""
        return self.pages[self.worst_page].p95_ms / GOAL_MS

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "rows": dict(self.rows),
            "statuses": dict(self.statuses),
            "seconds": {name: round(value, 1) for name, value in self.seconds.items()},
            "repeat": self.repeat,
            "goal_ms": GOAL_MS,
            "pages": {name: page.as_json() for name, page in self.pages.items()},
            "worst_page": self.worst_page,
            "ratio": round(self.ratio, 4),
            "uncapped_counts": [count.as_json() for count in self.counts],
            "redis": self.redis,
            "database": self.database,
            "kept": self.kept,
            "postgres": self.postgres,
            "load_average": [round(n, 2) for n in self.load],
            "cpus": os.cpu_count(),
        }


def table(f: ConsoleFigures) -> str:
    r = f.rows
    fate = "kept" if f.kept else "dropped"
    s = f.seconds
    rows = [
        f"bench console: {f.tasks:,} tasks, {r['steps']:,} steps, {r['attempts']:,} attempts, "
        f"{r['audit_entries']:,} audit entries, {r['findings']:,} findings "
        f"(scratch database {f.database}, {fate}; Postgres {f.postgres})",
        f"filled in {s['fill']:.0f} s: migrate {s['migrate']:.0f} s, COPY {s['copy']:.0f} s, "
        f"indexes and keys {s['indexes']:.0f} s, VACUUM ANALYZE {s['vacuum_analyze']:.0f} s",
        f"{'page':<18}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'SQL ms':>9}{'queries':>9}",
    ]
    for name, page in f.pages.items():
        queries = max(page.queries)
        spread = "" if min(page.queries) == queries else f" (min {min(page.queries)})"
        rows.append(
            f"{name:<18}{page.p50_ms:>9.1f}{page.p95_ms:>9.1f}{max(page.times_ms):>9.1f}"
            f"{statistics.median(page.sql_ms):>9.1f}{queries:>9}{spread}"
        )
    worst = f.pages[f.worst_page]
    rows.append(
        f"{f.repeat} timed requests a page (p50 median, p95 nearest rank); worst: "
        f"{f.worst_page} p95 {worst.p95_ms:.1f} ms; ratio (worst p95 / {GOAL_MS:.0f} ms): "
        f"{f.ratio:.3f}"
    )
    rows.append(
        f"1-minute load average {f.load[0]:.2f} before measuring, {f.load[1]:.2f} after "
        f"({os.cpu_count()} CPUs)"
    )
    if not f.redis:
        rows.append(
            "(Redis unreachable: the dashboard's queue, worker and breaker panels were off)"
        )
    for count in f.counts:
        read = "?" if count.rows_read is None else f"{count.rows_read:,}"
        rows.append(
            f"uncapped COUNT on {count.page}: {count.ms:.1f} ms, at most {read} rows read by "
            f"a scan: {count.sql[:160]}"
        )
    return "\n".join(rows)


# --- the run -----------------------------------------------------------------------------


def scratch_name(configured: str) -> str:
    """The scratch database's name (Postgres keeps 63 bytes of a name)."""
    return configured[: 63 - len(SCRATCH_SUFFIX)] + SCRATCH_SUFFIX


def console_bench(
    tasks: int = DEFAULT_TASKS,
    repeat: int = DEFAULT_REPEAT,
    keep: bool = False,
    progress: Progress | None = None,
) -> ConsoleFigures:
    """Fill a scratch database with ``tasks`` tasks and measure the console's pages on it;
    ``ConsoleBenchError`` when Postgres refuses (the scratch database exists already, no
    right to create one) or fails."""
    if tasks < MIN_TASKS or repeat < 1:
        raise ValueError(f"tasks must be at least {MIN_TASKS} and repeat at least 1")
    report = progress or (lambda phase, done, total: None)
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "postgresql":
        raise ConsoleBenchError(f"bench console needs Postgres, not {connection.vendor}")
    if connection.in_atomic_block:
        raise ConsoleBenchError("bench console cannot run inside a transaction")
    configured = str(connection.settings_dict["NAME"])
    scratch = scratch_name(configured)
    if scratch == configured:
        raise ConsoleBenchError(f"the configured database {configured!r} looks like a scratch one")
    report(f"creating database {scratch}", 0, 0)
    _create_database(connection, scratch)
    try:
        with database_pointed_at(scratch):
            figures = _fill_and_measure(connection, tasks, repeat, report)
    except BaseException:
        if not keep:
            with contextlib.suppress(ConsoleBenchError):  # never hide the first error
                _drop_database(scratch)
        raise
    if not keep:
        report(f"dropping database {scratch}", 0, 0)
        _drop_database(scratch)
    figures.database, figures.kept = scratch, keep
    return figures


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _create_database(connection: BaseDatabaseWrapper, name: str) -> None:
    quoted = connection.ops.quote_name(name)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if cursor.fetchone():
                raise ConsoleBenchError(
                    f"the scratch database {name} exists already (kept by --keep, or left by "
                    f"a run that was killed): drop it (dropdb {name}) and run again"
                )
            cursor.execute(f"CREATE DATABASE {quoted}")
    except DatabaseError as exc:
        raise ConsoleBenchError(f"could not create {name}: {_one_line(exc)}") from exc


def _drop_database(name: str) -> None:
    """Drop the scratch database (never the configured one: the name is checked apart)."""
    try:
        drop_database(name)
    except DatabaseError as exc:
        raise ConsoleBenchError(
            f"could not drop the scratch database {name}: {_one_line(exc)}"
        ) from exc


def _fill_and_measure(
    connection: BaseDatabaseWrapper, tasks: int, repeat: int, report: Progress
) -> ConsoleFigures:
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    try:
        report("migrating the scratch database", 0, 0)
        call_command("migrate", database=DEFAULT_DB_ALIAS, verbosity=0, interactive=False)
        seconds["migrate"] = time.perf_counter() - began
        user = get_user_model().objects.create_superuser(USERNAME, email="", password=None)
        runs = _runs()
        with connection.cursor() as cursor:
            postgres = _scalar(cursor, "SHOW server_version").split()[0]
            catalogue = _catalogue(cursor)
            _drop_secondary(cursor, catalogue)

        mark = time.perf_counter()
        loaded = _load(connection, tasks, (user.pk, user.get_username()), runs, report)
        seconds["copy"] = time.perf_counter() - mark

        mark = time.perf_counter()
        with connection.cursor() as cursor:
            _rebuild_secondary(cursor, catalogue, report)
            _check_rebuilt(catalogue, _catalogue(cursor))
        seconds["indexes"] = time.perf_counter() - mark

        mark = time.perf_counter()
        report("VACUUM (ANALYZE)", 0, 0)
        with connection.cursor() as cursor:
            for statement in connection.ops.sequence_reset_sql(
                no_style(), [StepRecord, StepAttempt, AuditEntry]
            ):
                cursor.execute(statement)
            cursor.execute("VACUUM (ANALYZE)")
        seconds["vacuum_analyze"] = time.perf_counter() - mark
        seconds["fill"] = time.perf_counter() - began

        load_before = os.getloadavg()[0]
        pages = _measure(connection, _pages(loaded), repeat, user, report)
        load = (load_before, os.getloadavg()[0])
        counts = _uncapped_counts(connection, pages)
    except DatabaseError as exc:
        raise ConsoleBenchError(f"database error: {_one_line(exc)}") from exc
    return ConsoleFigures(
        tasks=tasks,
        rows=loaded.rows,
        statuses=loaded.statuses,
        seconds=seconds,
        repeat=repeat,
        pages={name: page for name, (page, _) in pages.items()},
        counts=counts,
        redis=overview.queue_summary() is not None,
        database="",
        kept=False,
        postgres=postgres,
        load=load,
    )


def _scalar(cursor: Any, sql: str) -> str:
    cursor.execute(sql)
    return str(cursor.fetchone()[0])


def _runs() -> list[int]:
    """Finished reconciliation runs for the findings to name."""
    now = datetime.now(UTC)
    runs = []
    for i in range(RUNS):
        run = ReconciliationRun.objects.create(
            trigger=RunTrigger.SCHEDULE,
            status=RunStatus.SUCCEEDED,
            finished_at=now - timedelta(hours=6 * (RUNS - i)) + timedelta(seconds=40),
            counts={"listed": 1000 + i, "orphan_object": 3},
        )
        runs.append(run.pk)
    return runs


# --- secondary indexes and keys ------------------------------------------------------------

Catalogue = tuple[tuple[tuple[str, str, str, str], ...], tuple[tuple[str, str, str], ...]]

CONSTRAINTS_SQL = """
    SELECT t.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
    FROM pg_constraint k
    JOIN pg_class t ON t.oid = k.conrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE n.nspname = current_schema() AND t.relname = ANY(%s) AND k.contype IN ('u', 'f')
    ORDER BY 1, 2
"""
# Indexes of their own (not a primary key's or a unique constraint's), partial unique ones
# included: the definitions are those of pg_indexes.
INDEXES_SQL = """
    SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid)
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE n.nspname = current_schema() AND t.relname = ANY(%s) AND NOT x.indisprimary
      AND NOT EXISTS (
          SELECT 1 FROM pg_constraint k
          WHERE k.conindid = x.indexrelid AND k.conrelid = x.indrelid
            AND k.contype IN ('p', 'u', 'x')
      )
    ORDER BY 1, 2
"""


def _catalogue(cursor: Any) -> Catalogue:
    cursor.execute(CONSTRAINTS_SQL, [list(LARGE_TABLES)])
    constraints = tuple(tuple(row) for row in cursor.fetchall())
    cursor.execute(INDEXES_SQL, [list(LARGE_TABLES)])
    indexes = tuple(tuple(row) for row in cursor.fetchall())
    return constraints, indexes


def _check_rebuilt(before: Catalogue, after: Catalogue) -> None:
    """Every key and index is back: keys with the same definition, indexes by name (Postgres
    prints a rebuilt partial index's predicate with other casts, the same condition)."""

    def items(catalogue: Catalogue) -> set[tuple[str, ...]]:
        constraints, indexes = catalogue
        return {*constraints, *((table, name) for table, name, _ in indexes)}

    lost, new = sorted(items(before) - items(after)), sorted(items(after) - items(before))
    if lost or new:
        which = f"{lost[0][1]} is missing" if lost else f"{new[0][1]} is new"
        raise ConsoleBenchError(
            f"the rebuilt indexes and keys differ from the migrated ones: {which}"
        )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _drop_secondary(cursor: Any, catalogue: Catalogue) -> None:
    """Foreign keys first, then unique constraints, then the other indexes: what is left is
    the primary keys and check constraints, so COPY appends rows and checks nothing else."""
    constraints, indexes = catalogue
    for kind in ("f", "u"):
        for table, name, contype, _ in constraints:
            if contype == kind:
                cursor.execute(f"ALTER TABLE {_quote(table)} DROP CONSTRAINT {_quote(name)}")
    for _, name, _ in indexes:
        cursor.execute(f"DROP INDEX {_quote(name)}")


def _rebuild_secondary(cursor: Any, catalogue: Catalogue, report: Progress) -> None:
    """The same definitions back: unique constraints and indexes (each built once, sorted,
    uniqueness checked), then foreign keys (each checked by one join)."""
    constraints, indexes = catalogue
    statements = [
        f"ALTER TABLE {_quote(table)} ADD CONSTRAINT {_quote(name)} {definition}"
        for table, name, contype, definition in constraints
        if contype == "u"
    ]
    statements += [definition for _, _, definition in indexes]
    statements += [
        f"ALTER TABLE {_quote(table)} ADD CONSTRAINT {_quote(name)} {definition}"
        for table, name, contype, definition in constraints
        if contype == "f"
    ]
    cursor.execute(f"SET maintenance_work_mem = '{MAINTENANCE_WORK_MEM}'")
    for done, statement in enumerate(statements):
        report("building indexes and keys", done, len(statements))
        cursor.execute(statement)
    cursor.execute("RESET maintenance_work_mem")


# --- loading ------------------------------------------------------------------------------


@dataclass
class Loaded:
    rows: dict[str, int]
    statuses: dict[str, int]
    detail_task: uuid.UUID
    searched_correlation_id: str


@dataclass(frozen=True)
class Stream:
    """One table's COPY: the columns the generator writes, then constants for the rest
    (each field's default), so a field added later needs no change here."""

    model: type[models.Model]
    written: tuple[str, ...]
    columns: tuple[str, ...]
    constants: tuple[Any, ...]

    @classmethod
    def of(
        cls, model: type[models.Model], written: Sequence[str], auto: Sequence[str] = ()
    ) -> Stream:
        fields = {str(f.column): f for f in model._meta.concrete_fields}
        unknown = [column for column in written if column not in fields]
        if unknown:
            raise ConsoleBenchError(f"{model.__name__} has no column {unknown[0]!r}")
        rest = [c for c in fields if c not in written and c not in auto]
        constants = tuple(_constant(model, fields[column]) for column in rest)
        return cls(model, tuple(written), (*written, *rest), constants)

    def sql(self) -> str:
        columns = ", ".join(_quote(column) for column in self.columns)
        return f"COPY {_quote(self.model._meta.db_table)} ({columns}) FROM STDIN"


def _constant(model: type[models.Model], f: models.Field[Any, Any]) -> Any:
    value = f.get_default()
    if value is None:
        if not f.null:
            raise ConsoleBenchError(
                f"{model.__name__}.{f.name} has no default: sagas/bench_console.py must write it"
            )
        return None
    if isinstance(f, models.JSONField):
        return json.dumps(value)
    return f.get_db_prep_save(value, connections[DEFAULT_DB_ALIAS])


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The columns each COPY writes; the others get their field's default (``Stream``).
TASK_COLUMNS = _names(
    "id saga status input business_key correlation_id trace_id version "
    "compensation_reason current_step error_summary created_at updated_at started_at "
    "finished_at cancel_requested_at cancelled_at cancelled_by_id cancel_reason wake_at "
    "resolved_by_id resolution_note"
)
STEP_COLUMNS = _names(
    "id task_id index name status level after version attempt_count "
    "compensation_attempt_count data error compensation_error trace_id progress "
    "started_at finished_at next_attempt_at job_id"
)
ATTEMPT_COLUMNS = _names(
    "id step_id kind number outcome worker job_id lock_token lock_key started_at "
    "heartbeat_at heartbeat_expires_at finished_at error traceback"
)
AUDIT_COLUMNS = _names(
    "id task_id step_id actor_id actor_name action from_status to_status details created_at"
)
FINDING_COLUMNS = _names(
    "run_id kind saga key task_id state details first_seen last_seen acted_by_id "
    "acted_by_name acted_at"
)


@contextlib.contextmanager
def _copying(
    connection: BaseDatabaseWrapper, streams: Sequence[Stream]
) -> Iterator[list[Callable[[Sequence[Any]], None]]]:
    """One COPY per stream, each on a connection of its own, all open at once; each
    commits when it ends (autocommit), and an error aborts every one still open."""
    with contextlib.ExitStack() as stack:
        writers: list[Callable[[Sequence[Any]], None]] = []
        for i, stream in enumerate(streams):
            other = connection.copy(alias=f"bench_console_copy_{i}")
            stack.callback(other.close)
            other.ensure_connection()
            cursor = stack.enter_context(other.connection.cursor())
            cursor.execute("SET synchronous_commit = off")
            copy = stack.enter_context(cursor.copy(stream.sql()))
            writers.append(_row_writer(copy, stream.constants))
        yield writers


def _row_writer(copy: Any, constants: tuple[Any, ...]) -> Callable[[Sequence[Any]], None]:
    write_row = copy.write_row

    def write(row: Sequence[Any]) -> None:
        write_row((*row, *constants))

    return write


def _load(
    connection: BaseDatabaseWrapper,
    tasks: int,
    operator: tuple[int, str],
    runs: list[int],
    report: Progress,
) -> Loaded:
    streams = [
        Stream.of(TaskInstance, TASK_COLUMNS),
        Stream.of(StepRecord, STEP_COLUMNS),
        Stream.of(StepAttempt, ATTEMPT_COLUMNS),
        Stream.of(AuditEntry, AUDIT_COLUMNS),
    ]
    targets: list[tuple[uuid.UUID, str]] = []
    with _copying(connection, streams) as writers:
        loaded = _generate(tasks, writers, operator, targets, report)
    with _copying(connection, [Stream.of(Finding, FINDING_COLUMNS, auto=("id",))]) as (write,):
        loaded.rows["findings"] = _findings(write, targets, runs, operator)
    return loaded


def _generate(
    tasks: int,
    writers: list[Callable[[Sequence[Any]], None]],
    operator: tuple[int, str],
    targets: list[tuple[uuid.UUID, str]],
    report: Progress,
) -> Loaded:
    """Every task with its steps, attempts and audit entries, oldest first, a row at a time.
    ``targets`` receives every ``FINDINGS_EVERY``-th task (for findings to name)."""
    write_task, write_step, write_attempt, write_audit = writers
    rng = random.Random(SEED)  # noqa: S311 - made-up data, not secrets
    now = datetime.now(UTC)
    first = now - SPAN
    gap = SPAN / tasks
    second = [timedelta(seconds=s) for s in range(400)]
    older, older_cumulative = [SHAPES[s] for s in OLDER_MIX], _cumulative([*OLDER_MIX.values()])
    active, active_cumulative = [SHAPES[s] for s in ACTIVE_MIX], _cumulative([*ACTIVE_MIX.values()])
    sagas_cumulative = _cumulative([s.weight for s in SAGA_SHAPES])
    newest = tasks - max(math.ceil(tasks * NEWEST_SHARE), 2 * len(SHAPES))
    unseen = list(SHAPES.values())  # the newest tasks start with one of each shape
    detail_n, searched_n = tasks // 2, tasks // 3
    detail_task, searched = uuid.UUID(int=0), ""
    operator_id, operator_name = operator
    statuses: dict[str, int] = dict.fromkeys(TaskStatus.values, 0)
    step_id = attempt_id = audit_id = 0
    retry_at = now + timedelta(minutes=10)
    heartbeat, heartbeat_expires = now - timedelta(seconds=2), now + timedelta(seconds=58)

    for n in range(tasks):
        if n == detail_n:
            shape = DETAIL_SHAPE
        elif n >= newest:
            if unseen:
                shape = unseen.pop()
            elif rng.random() < ACTIVE_SHARE:
                shape = active[
                    bisect.bisect(active_cumulative, rng.random() * active_cumulative[-1])
                ]
            else:
                shape = older[bisect.bisect(older_cumulative, rng.random() * older_cumulative[-1])]
        else:
            shape = older[bisect.bisect(older_cumulative, rng.random() * older_cumulative[-1])]
        saga = SAGA_SHAPES[bisect.bisect(sagas_cumulative, rng.random() * sagas_cumulative[-1])]
        statuses[shape.status] += 1
        task_id = uuid.uuid4()
        task = str(task_id)
        created = first + gap * n
        trace = f"{rng.getrandbits(128):032x}"
        correlation_id = f"req-{n:08x}"
        if n == detail_n:
            detail_task = task_id
        if n == searched_n:
            searched = correlation_id
        if n % FINDINGS_EVERY == 0:
            targets.append((task_id, saga.name))
        action_error = f"{ACTION_ERRORS[n % 3]} (order {n})"
        compensation_error = f"{COMPENSATION_ERRORS[n % 3]} (order {n})"

        # Steps and their attempts: a clock of one second per attempt.
        clock = created + second[1]
        step_base = step_id + 1
        for index, step in enumerate(shape.steps):
            step_id += 1
            name = saga.steps[index]
            started = clock if step.attempts else None
            for kind, number, outcome in step.attempts:
                attempt_id += 1
                running = outcome == AttemptOutcome.RUNNING
                failed = outcome == FAIL
                error = (action_error if kind == A else compensation_error) if failed else ""
                suffix = "a" if kind == A else "c"
                write_attempt(
                    (
                        attempt_id,
                        step_id,
                        kind,
                        number,
                        outcome,
                        WORKERS[n % 8],
                        f"saga-{task}-{name}-{suffix}{number}",
                        task[:8] if running else "",
                        f"sagas:lock:{task}" if running else "",
                        clock,
                        heartbeat if running else clock + second[1],
                        heartbeat_expires if running else None,
                        None if running else clock + second[1],
                        error,
                        TRACEBACK + error if failed else "",
                    )
                )
                clock += second[2]
            status = step.status
            done = status in FINISHED_STEP_STATUSES
            succeeded = status in (StepStatus.SUCCEEDED, StepStatus.COMPENSATED)
            write_step(
                (
                    step_id,
                    task_id,
                    index,
                    name,
                    status,
                    index,
                    saga.after[index],
                    len(step.attempts) + 1,
                    step.action_attempts,
                    step.compensation_attempts,
                    f'{{"ref": "{name}-{n}"}}' if succeeded else None,
                    action_error if step.error else "",
                    compensation_error if step.compensation_error else "",
                    trace,
                    100 if succeeded else (40 if status == StepStatus.RUNNING else 0),
                    started,
                    clock if done else None,
                    retry_at if step.retry_scheduled else None,
                    f"saga-{task}-{name}-a{step.action_attempts}" if step.attempts else "",
                )
            )

        # The audit trail: an entry a second.
        for k, (action, step_index, before, after, by_operator) in enumerate(shape.audit):
            audit_id += 1
            write_audit(
                (
                    audit_id,
                    task_id,
                    None if step_index is None else step_base + step_index,
                    operator_id if by_operator else None,
                    operator_name if by_operator else "system",
                    action,
                    before,
                    after,
                    _details(action, saga, step_index, action_error, compensation_error, trace),
                    created + second[k],
                )
            )

        finished = clock if shape.finished else None
        updated = finished or now - timedelta(seconds=rng.random() * 1800)
        cancel_requested = created + second[3] if shape.cancelled else None
        write_task(
            (
                task_id,
                saga.name,
                shape.status,
                f'{{"order": {n}, "amount_cents": {n % 9973 * 7}}}',
                f"order-{n}" if saga.keyed else None,
                correlation_id,
                trace,
                len(shape.audit),
                shape.reason,
                "" if shape.current is None else saga.steps[shape.current],
                (compensation_error if shape.undo_failed else action_error)
                if shape.failure
                else "",
                created,
                updated,
                None if shape.status == T.PENDING else created + second[1],
                finished,
                cancel_requested,
                finished if shape.cancelled and shape.finished else None,
                operator_id if shape.cancelled else None,
                "customer asked to cancel" if shape.cancelled else "",
                retry_at + second[10] if shape.status == T.WAITING_RETRY else None,
                operator_id if shape.resolved else None,
                "refunded by hand in the gateway console" if shape.resolved else "",
            )
        )
        if n % REPORT_EVERY == 0:
            report("copying tasks, steps, attempts and audit entries", n, tasks)

    report("copying tasks, steps, attempts and audit entries", tasks, tasks)
    rows = {"tasks": tasks, "steps": step_id, "attempts": attempt_id, "audit_entries": audit_id}
    return Loaded(rows, statuses, detail_task, searched)


def _details(
    action: str,
    saga: SagaShape,
    step_index: int | None,
    action_error: str,
    compensation_error: str,
    trace: str,
) -> str:
    """An entry's details (f-strings where the text is ours and needs no escaping: most of
    the five million entries)."""
    step = saga.steps[step_index] if step_index is not None else ""
    if action == S.STARTED:
        return '{"input_keys": ["order", "amount_cents"]}'
    if action in (S.STEP_FAILED, S.RETRY_SCHEDULED):
        return f'{{"step": "{step}", "error": "{action_error}"}}'
    if action == S.COMPENSATION_FAILED:
        return json.dumps(
            {
                "step_name": step,
                "error": compensation_error,
                "trace_id": trace,
                "attempt_count": 3,
                "stack_trace": TRACEBACK + compensation_error,
            }
        )
    if step:
        return f'{{"step": "{step}"}}'
    return "{}"


def _findings(
    write: Callable[[Sequence[Any]], None],
    targets: list[tuple[uuid.UUID, str]],
    runs: list[int],
    operator: tuple[int, str],
) -> int:
    """One finding per target task: orphans and missing objects of ``create-zip``, stuck
    tasks and stale locks of the task's saga; about half still open."""
    kinds = [
        FindingKind.ORPHAN_OBJECT,
        FindingKind.ORPHAN_OBJECT,
        FindingKind.RECENT_ORPHAN,
        FindingKind.MISSING_OBJECT,
        FindingKind.STUCK_TASK,
        FindingKind.STALE_LOCK,
    ]
    states = [
        FindingState.OPEN,
        FindingState.OPEN,
        FindingState.OPEN,
        FindingState.DELETED,
        FindingState.IGNORED,
        FindingState.ARCHIVED,
        FindingState.RESOLVED,
    ]
    now = datetime.now(UTC)
    operator_id, operator_name = operator
    for i, (task_id, saga) in enumerate(targets):
        kind, state = str(kinds[i % len(kinds)]), str(states[i % len(states)])
        seen = now - timedelta(minutes=i % (60 * 24 * 30))
        modified = (seen - timedelta(days=3)).isoformat()
        task: uuid.UUID | None = task_id
        if kind in (FindingKind.ORPHAN_OBJECT, FindingKind.RECENT_ORPHAN):
            key, saga, task = f"create-zip/{uuid.uuid4()}.zip", "create-zip", None
            details: dict[str, Any] = {"size": 1000 + i, "last_modified": modified}
        elif kind == FindingKind.MISSING_OBJECT:
            key, saga = f"create-zip/{task_id}.zip", "create-zip"
            details = {"step": "upload"}
        elif kind == FindingKind.STUCK_TASK:
            key = str(task_id)
            details = {"status": "running", "updated_at": modified}
        else:
            key = f"sagas:lock:{task_id}"
            details = {"reason": "its holder is gone"}
        acted = state not in (FindingState.OPEN, FindingState.RESOLVED)
        write(
            (
                runs[i % len(runs)],
                kind,
                saga,
                key,
                task,
                state,
                json.dumps(details),
                seen - timedelta(hours=6),
                seen,
                operator_id if acted else None,
                operator_name if acted else "",
                seen if acted else None,
            )
        )
    return len(targets)


# --- measuring ----------------------------------------------------------------------------


def _pages(loaded: Loaded) -> list[tuple[str, str]]:
    tasks = reverse("admin:sagas_taskinstance_changelist")
    return [
        ("dashboard", reverse("sagas-dashboard")),
        ("task list", tasks),
        ("tasks by status", f"{tasks}?{urlencode({'status__exact': TaskStatus.COMPENSATED})}"),
        ("tasks by saga", f"{tasks}?{urlencode({'saga': 'chaos'})}"),
        ("task search", f"{tasks}?{urlencode({'q': loaded.searched_correlation_id})}"),
        ("task page", reverse("admin:sagas_taskinstance_change", args=[loaded.detail_task])),
        ("inbox", reverse("sagas-inbox")),
        ("findings", reverse("admin:sagas_finding_changelist")),
    ]


def _measure(
    connection: BaseDatabaseWrapper,
    pages: list[tuple[str, str]],
    repeat: int,
    user: Any,
    report: Progress,
) -> dict[str, tuple[PageFigures, list[tuple[str, float]]]]:
    """Each page ``WARMUPS`` times untimed, then ``repeat`` times timed, page after page in
    rounds (so a slow moment of the machine is spread over every page). DEBUG is off, as in
    production; the test client's host is allowed for the duration."""
    figures: dict[str, tuple[PageFigures, list[tuple[str, float]]]] = {
        name: (PageFigures(url), []) for name, url in pages
    }
    hosts = [*settings.ALLOWED_HOSTS, "testserver"]
    total = (WARMUPS + repeat) * len(pages)
    sql_ms: list[float] = []

    def timer(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        """Each statement's time, to the microsecond (the query log rounds to the ms)."""
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            sql_ms.append((time.perf_counter() - began) * 1000)

    with override_settings(DEBUG=False, ALLOWED_HOSTS=hosts):
        client = Client(secure=True)
        client.force_login(user)
        for round_ in range(WARMUPS + repeat):
            for i, (name, url) in enumerate(pages):
                report("measuring pages", round_ * len(pages) + i, total)
                sql_ms.clear()
                with connection.execute_wrapper(timer), CaptureQueriesContext(connection) as seen:
                    began = time.perf_counter()
                    response = client.get(url)
                    elapsed = time.perf_counter() - began
                if response.status_code != 200:
                    raise ConsoleBenchError(f"{name} ({url}) answered {response.status_code}")
                if round_ < WARMUPS:
                    continue
                page, queries = figures[name]
                captured = seen.captured_queries
                if len(captured) != len(sql_ms):  # never seen; Django's rounded times then
                    sql_ms[:] = [float(q["time"]) * 1000 for q in captured]
                timed = [(q["sql"], ms) for q, ms in zip(captured, sql_ms, strict=True)]
                page.times_ms.append(elapsed * 1000)
                page.sql_ms.append(sum(ms for _, ms in timed))
                page.queries.append(len(timed))
                for sql, ms in timed:
                    if ms > page.slowest_ms:
                        page.slowest_ms, page.slowest_sql = ms, sql
                queries[:] = timed
    return figures


COUNT = re.compile(r"\bCOUNT\(", re.IGNORECASE)
CAPPED = re.compile(r"\bLIMIT\s+\d+\s*\)", re.IGNORECASE)  # a LIMIT closing a subquery
SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Bitmap Index Scan")


def uncapped_count(sql: str) -> bool:
    """A COUNT over tasks, steps, attempts or audit entries with no LIMIT in a subquery
    (the console's capped paginator counts ``(SELECT ... LIMIT 10001)``)."""
    if not COUNT.search(sql) or CAPPED.search(sql):
        return False
    return any(f'"{table}"' in sql for table in LARGE_TABLES)


def _uncapped_counts(
    connection: BaseDatabaseWrapper, pages: dict[str, tuple[PageFigures, list[tuple[str, float]]]]
) -> list[CountQuery]:
    """Each page's uncapped counts, with the most rows any scan of its plan read (EXPLAIN
    ANALYZE, run once more): what says whether the count is bounded or grows with the table."""
    found = []
    for name, (_, queries) in pages.items():
        for sql, ms in queries:
            if uncapped_count(sql):
                found.append(CountQuery(name, sql, ms, _rows_read(connection, sql)))
    return found


def _rows_read(connection: BaseDatabaseWrapper, sql: str) -> int | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
            plan = cursor.fetchone()[0]
    except DatabaseError:
        return None
    if isinstance(plan, str):
        plan = json.loads(plan)
    return max((rows for rows in _scanned(plan[0]["Plan"])), default=0)


def _scanned(node: dict[str, Any]) -> Iterator[int]:
    if node.get("Node Type") in SCANS:
        loops = int(node.get("Actual Loops", 1))
        yield int(node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    for child in node.get("Plans", ()):
        yield from _scanned(child)
