"""``manage.py bench engine``: what the engine costs per step beyond bare RQ.

One run, on the same worker class (``rqworker --with-scheduler default`` processes), the
same private Redis and the same database: N no-op jobs drained by bare RQ and N/3
three-step no-op sagas (``sagas.examples.bench_noop``) drained through the engine, first
on one worker, then on K; the start-to-completed latency of single sagas against three
chained bare jobs; SQL statements and Redis commands per step, counted in this process
with an in-process worker; the workers' resident memory before and after.

Nothing touches the configured database or Redis: the run migrates a scratch database of
its own (a new Postgres database beside the configured one, or a temporary SQLite file)
and starts a private redis-server; both are removed at the end, also on error, Ctrl-C or
SIGTERM, and every worker it started is stopped. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlencode

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.models import Max
from django.test.utils import CaptureQueriesContext
from redis import Redis
from redis.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError
from rq import Queue
from rq.job import JobStatus
from rq.worker import Worker

from sagas import services
from sagas.bench import database_pointed_at, drop_database
from sagas.definitions import registry
from sagas.embedded import EmbeddedRedis, EmbeddedServiceError, ManagedProcess
from sagas.engine import dispatch, reaper
from sagas.engine.apply import database_now
from sagas.engine.connection import QUEUE_NAME, queue, redis
from sagas.engine.worker import SagaSimpleWorker
from sagas.examples import bench_noop
from sagas.models import TaskInstance
from sagas.states import ACTIVE_TASK_STATUSES, TaskStatus

DEFAULT_JOBS = 600
DEFAULT_WORKERS = 2
MAX_WORKERS = 16
STEPS_PER_SAGA = len(bench_noop.STEPS)
LATENCY_SAMPLES = 20  # of each kind (fewer when there are fewer sagas)
COST_SAGAS = 5  # sagas run in this process to count statements and commands per step
WARM_UP_SAGAS = 2  # per worker, untimed, before the memory is first read
BARE_POLL_S = 0.02  # Redis: cheap to ask often
ENGINE_POLL_S = 0.2  # the database
STALL_S = 90.0  # no progress for this long: the run has failed
WORKER_STARTUP_S = 90.0
CHAIN_RESULT_TTL_S = 600  # chained bare jobs keep their result: the last one's end time is read
MIB = 1024 * 1024
# In the command line of every process a run starts (worker names, the server's directory).
PROCESS_MARK = "bench-engine-"
GOALS = {
    "ratio": 0.6,  # engine steps/s >= 0.6 x bare jobs/s
    "speedup": 0.9,  # engine's 1 -> K speed-up >= 0.9 x bare RQ's
    "latency": 1.5,  # 3-step saga p50 <= 1.5 x 3 chained bare jobs p50
    "rss_growth_mib": 20.0,  # per worker, over 10,000 sagas
}
RSS_GOAL_SAGAS = 10_000

# (phase, done, total): see PHASES
Progress = Callable[[str, int, int], None]
PHASES = {
    "database": "migrating a scratch database",
    "workers": "starting workers",
    "warm-up": "warming up",
    "bare": "bare RQ jobs drained",
    "start": "starting sagas",
    "engine": "sagas completed",
    "latency": "latency samples",
    "costs": "counting statements and commands (in-process)",
    "cleanup": "stopping workers and removing the scratch database",
}

logger = logging.getLogger(__name__)


class BenchError(Exception):
    """The benchmark could not run; the message is one line (a worker's log may follow)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM during the run: unwinds like Ctrl-C, so everything started is stopped."""


# --- figures ------------------------------------------------------------------------------


@dataclass
class Run:
    """Throughput with ``workers`` worker processes, and their memory."""

    workers: int
    jobs: int
    bare_s: float
    sagas: int
    engine_s: float
    rss_before_mib: list[float] = field(default_factory=list)
    rss_after_mib: list[float] = field(default_factory=list)
    # Share of the machine's CPU time that was busy (every process, Postgres too).
    cpu_bare: float | None = None
    cpu_engine: float | None = None

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.bare_s if self.bare_s > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.sagas * STEPS_PER_SAGA / self.engine_s if self.engine_s > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.steps_per_s / self.jobs_per_s if self.jobs_per_s > 0 else 0.0

    @property
    def rss_growth_mib(self) -> float:
        growth = [a - b for b, a in zip(self.rss_before_mib, self.rss_after_mib, strict=False)]
        return max(growth, default=0.0)


@dataclass
class Latency:
    """Start-to-completed times in milliseconds: single sagas, and three chained bare jobs."""

    workers: int
    saga_ms: list[float] = field(default_factory=list)
    chain_ms: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        saga, chain = _percentiles(self.saga_ms), _percentiles(self.chain_ms)
        return {
            "workers": self.workers,
            "samples": len(self.saga_ms),
            "saga_p50": round(saga[0], 1),
            "saga_p95": round(saga[1], 1),
            "chain_p50": round(chain[0], 1),
            "chain_p95": round(chain[1], 1),
            "ratio_p50": _ratio(saga[0], chain[0]),
            "ratio_p95": _ratio(saga[1], chain[1]),
        }


@dataclass
class Cost:
    """What a stretch of work cost: SQL statements, and Redis commands as the server
    counted them (every client) and as each client sent them."""

    sql: int = 0
    commands: int = 0
    engine_commands: int = 0
    rq_commands: int = 0
    round_trips: int = 0

    def minus(self, other: Cost) -> Cost:
        return Cost(
            self.sql - other.sql,
            self.commands - other.commands,
            self.engine_commands - other.engine_commands,
            self.rq_commands - other.rq_commands,
            self.round_trips - other.round_trips,
        )

    def per(self, count: int) -> dict[str, float]:
        return {
            "sql_queries": round(self.sql / count, 1),
            "redis_commands": round(self.commands / count, 1),
            "redis_commands_engine": round(self.engine_commands / count, 1),
            "redis_commands_rq": round(self.rq_commands / count, 1),
            "redis_round_trips": round(self.round_trips / count, 1),
        }


@dataclass
class Costs:
    step: Cost
    steps: int
    bare_job: Cost
    bare_jobs: int
    start: Cost
    starts: int


@dataclass
class EngineFigures:
    jobs: int
    sagas: int
    workers: int
    database: str
    runs: list[Run]
    latency: Latency
    costs: Costs
    seconds: float = 0.0
    load_average: float | None = None  # 1-minute, as the run began

    @property
    def headline(self) -> Run:
        return self.runs[-1]

    @property
    def ratio(self) -> float:
        """Engine steps/s ÷ bare RQ jobs/s with K workers."""
        return self.headline.ratio

    def speedups(self) -> dict[str, float] | None:
        """1 -> K workers: bare RQ's speed-up, the engine's, and the engine's share of bare's."""
        if len(self.runs) < 2:
            return None
        one, many = self.runs[0], self.runs[-1]
        bare = _ratio(many.jobs_per_s, one.jobs_per_s)
        engine = _ratio(many.steps_per_s, one.steps_per_s)
        return {"bare": bare, "engine": engine, "engine_vs_bare": _ratio(engine, bare)}

    @property
    def rss_growth_mib(self) -> float:
        return max(run.rss_growth_mib for run in self.runs)

    def goals(self) -> dict[str, dict[str, Any]]:
        speedups = self.speedups()
        latency = self.latency.as_json()
        return {
            "ratio": _goal(">=", GOALS["ratio"], round(self.ratio, 3)),
            "speedup": _goal(
                ">=", GOALS["speedup"], speedups["engine_vs_bare"] if speedups else None
            ),
            "latency": _goal("<=", GOALS["latency"], latency["ratio_p50"]),
            "rss_growth_mib": {
                **_goal("<", GOALS["rss_growth_mib"], round(self.rss_growth_mib, 1)),
                "sagas": self.sagas,
                "over_sagas": RSS_GOAL_SAGAS,
            },
        }

    def as_json(self) -> dict[str, Any]:
        def by_workers(value: Callable[[Run], Any]) -> dict[str, Any]:
            return {str(run.workers): value(run) for run in self.runs}

        return {
            "jobs": self.jobs,
            "sagas": self.sagas,
            "steps": self.sagas * STEPS_PER_SAGA,
            "workers": self.workers,
            "database": self.database,
            "jobs_per_s": by_workers(lambda r: round(r.jobs_per_s, 2)),
            "steps_per_s": by_workers(lambda r: round(r.steps_per_s, 2)),
            "ratio": round(self.ratio, 4),
            "ratio_by_workers": by_workers(lambda r: round(r.ratio, 4)),
            "speedup": self.speedups(),
            "latency_ms": self.latency.as_json(),
            "per_step": self.costs.step.per(self.costs.steps),
            "per_bare_job": self.costs.bare_job.per(self.costs.bare_jobs),
            "per_start": self.costs.start.per(self.costs.starts),
            "rss_mib": by_workers(lambda r: {"before": r.rss_before_mib, "after": r.rss_after_mib}),
            "rss_growth_mib": round(self.rss_growth_mib, 1),
            "cpu_busy": by_workers(lambda r: {"bare": r.cpu_bare, "engine": r.cpu_engine}),
            "cpus": os.cpu_count(),
            "load_average": self.load_average,
            "goals": self.goals(),
            "seconds": round(self.seconds, 1),
        }


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator > 0 else 0.0


def _goal(relation: str, goal: float, value: float | None) -> dict[str, Any]:
    met = None
    if value is not None:
        met = {"<": value < goal, "<=": value <= goal, ">=": value >= goal}[relation]
    return {"goal": f"{relation} {goal:g}", "value": value, "met": met}


def _percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95), interpolated between the nearest samples."""
    if not samples:
        return 0.0, 0.0
    if len(samples) == 1:
        return samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=20, method="inclusive")
    return cuts[9], cuts[18]


# --- the run ------------------------------------------------------------------------------


def engine_bench(
    jobs: int = DEFAULT_JOBS, workers: int = DEFAULT_WORKERS, progress: Progress | None = None
) -> EngineFigures:
    """Run the engine benchmark; ``BenchError`` when the database, Redis or a worker fails."""
    if jobs < STEPS_PER_SAGA:
        raise ValueError(f"jobs must be at least {STEPS_PER_SAGA}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
    report = progress or (lambda phase, done, total: None)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    began = time.monotonic()
    try:
        figures = _bench(jobs, workers, report)
    except EmbeddedServiceError as exc:
        raise BenchError(_one_line(exc)) from exc
    except DatabaseError as exc:
        raise BenchError(f"database error: {_one_line(exc)}") from exc
    except RedisError as exc:
        raise BenchError(f"Redis error: {_one_line(exc)}") from exc
    figures.seconds = time.monotonic() - began
    figures.load_average = load
    return figures


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _bench(jobs: int, workers: int, report: Progress) -> EngineFigures:
    sagas = jobs // STEPS_PER_SAGA
    counts = [1] if workers == 1 else [1, workers]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_signals())
        prefix = f"{PROCESS_MARK}{os.getpid()}-"  # the workers' names start so too
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        report("database", 0, 0)
        database_url = stack.enter_context(_scratch_database(scratch))
        server = stack.enter_context(EmbeddedRedis(scratch / "redis"))
        stack.enter_context(_private_settings(server.url))
        stack.enter_context(_registered())
        fleet = Fleet(_worker_env(database_url, server.url), scratch / "logs")
        stack.callback(fleet.stop_all)  # whatever a failed run left running
        stack.callback(report, "cleanup", 0, 0)
        stack.callback(_shield)  # registered last, so it runs first
        costs = _measure_costs(server.url, report)
        runs, latency = [], Latency(workers)
        for count in counts:
            with fleet.running(count, report):
                runs.append(_run(fleet, count, jobs, sagas, report))
                if count == counts[-1]:
                    latency = _latency(fleet, min(LATENCY_SAMPLES, sagas), report)
                    fleet.read_memory(runs[-1].rss_after_mib)
        vendor = connections[DEFAULT_DB_ALIAS].vendor
        return EngineFigures(jobs, sagas, workers, vendor, runs, latency, costs)


def _run(fleet: Fleet, count: int, jobs: int, sagas: int, report: Progress) -> Run:
    _warm_up(fleet, count, report)
    run = Run(count, jobs, 0.0, sagas, 0.0)
    fleet.read_memory(run.rss_before_mib)
    cpu = _cpu_times()
    run.bare_s = _drain_bare(fleet, jobs, report)
    run.cpu_bare, cpu = _busy_since(cpu), _cpu_times()
    run.engine_s = _drain_engine(fleet, sagas, report)
    run.cpu_engine = _busy_since(cpu)
    fleet.read_memory(run.rss_after_mib)
    return run


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine so far (Linux's /proc/stat), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return sum(ticks) - idle, sum(ticks)
    return None


def _busy_since(before: tuple[float, float] | None) -> float | None:
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


# --- scratch database, private Redis, settings --------------------------------------------


@contextlib.contextmanager
def _scratch_database(scratch: Path) -> Iterator[str]:
    """Point this process at a new, migrated database (dropped at the end) and yield its URL
    for the workers. Postgres: a database beside the configured one; SQLite: a temp file."""
    conn = connections[DEFAULT_DB_ALIAS]
    original = conn.settings_dict["NAME"]
    if conn.vendor == "postgresql":
        name = f"{str(original)[:40]}_bench_{uuid.uuid4().hex[:8]}"
        _postgres(f"CREATE DATABASE {conn.ops.quote_name(name)}")
    elif conn.vendor == "sqlite" and not getattr(conn, "is_in_memory_db", lambda: True)():
        name = str(scratch / "bench.sqlite3")
    else:
        raise BenchError(f"bench engine needs Postgres or a SQLite file, not {conn.vendor}")
    try:
        with database_pointed_at(name):
            call_command(
                "migrate", interactive=False, verbosity=0, skip_checks=True, stdout=io.StringIO()
            )
            ContentType.objects.clear_cache()
            yield _database_url(conn.settings_dict)
    finally:
        if conn.vendor == "postgresql":
            drop_database(name)


def _postgres(statement: str) -> None:
    """A statement outside any database (CREATE/DROP DATABASE)."""
    with connections[DEFAULT_DB_ALIAS]._nodb_cursor() as cursor:
        cursor.execute(statement)


def _database_url(db: dict[str, Any]) -> str:
    """The scratch database as a ``DATABASE_URL`` for the worker processes."""
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    auth = quote(str(db.get("USER") or ""), safe="")
    if db.get("PASSWORD"):
        auth += ":" + quote(str(db["PASSWORD"]), safe="")
    host = quote(str(db.get("HOST") or ""), safe="")  # a socket directory is percent-encoded
    port = f":{db['PORT']}" if db.get("PORT") else ""
    options = {k: v for k, v in (db.get("OPTIONS") or {}).items() if isinstance(v, str | int)}
    query = f"?{urlencode(options)}" if options else ""
    at = f"{auth}@" if auth else ""
    return f"postgres://{at}{host}{port}/{quote(str(db['NAME']), safe='')}{query}"


@contextlib.contextmanager
def _private_settings(redis_url: str) -> Iterator[None]:
    """This process's engine talks to the private Redis; no query log, no reconciliation."""
    rq_queue = settings.RQ_QUEUES[QUEUE_NAME]
    before = (
        rq_queue["URL"],
        settings.REDIS_URL,
        settings.DEBUG,
        settings.SAGAS_RECONCILE_INTERVAL,
    )
    rq_queue["URL"], settings.REDIS_URL = redis_url, redis_url
    settings.DEBUG, settings.SAGAS_RECONCILE_INTERVAL = False, 0
    try:
        yield
    finally:
        with contextlib.suppress(RedisError):
            redis().close()  # the private server is about to stop
        rq_queue["URL"], settings.REDIS_URL, settings.DEBUG = before[:3]
        settings.SAGAS_RECONCILE_INTERVAL = before[3]


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    """``bench-noop`` is known in this process while the bench runs (it starts the sagas)."""
    known = bench_noop.NAME in registry.names()
    registry.register(bench_noop.bench_noop, origin=bench_noop.__name__)
    try:
        yield
    finally:
        if not known:
            registry.unregister(bench_noop.NAME)


# --- signals ------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM (and Ctrl-C, unless ignored) unwind the run; the handlers are restored at the
    very end. The event remembers an interrupt that RQ's work loop swallowed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _interrupted.clear()
    signal.signal(signal.SIGTERM, _interrupt)
    if saved[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_interrupted = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise Interrupted(f"signal {signum}")


def _shield() -> None:
    """While cleaning up, a second Ctrl-C or SIGTERM must not leave servers or a database."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


# --- worker processes ---------------------------------------------------------------------


def _worker_env(database_url: str, redis_url: str) -> dict[str, str]:
    """Production settings (no DEBUG), the scratch database and the private Redis."""
    modules = list(dict.fromkeys([*settings.SAGA_MODULES, bench_noop.__name__]))
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SAGA_MODULES": ",".join(modules),
        "SAGAS_RECONCILE_INTERVAL": "0s",  # reconciliation is bench reconcile's business
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": os.environ.get("DJANGO_ALLOWED_HOSTS") or "localhost",
    }


@dataclass
class BenchWorker:
    name: str
    process: ManagedProcess

    @property
    def key(self) -> str:
        return f"{Worker.redis_worker_namespace_prefix}{self.name}"

    def rss_mib(self) -> float:
        """VmRSS of the worker's main process (0 where there is no /proc)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            line = next(row for row in status.splitlines() if row.startswith("VmRSS:"))
            return round(int(line.split()[1]) * 1024 / MIB, 1)
        return 0.0


class Fleet:
    """The worker processes of the current run; every one is stopped, also on error."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.workers: list[BenchWorker] = []
        self.started: list[ManagedProcess] = []

    @contextlib.contextmanager
    def running(self, count: int, report: Progress) -> Iterator[None]:
        report("workers", 0, count)
        try:
            self.workers = [self._start(count, number) for number in range(1, count + 1)]
            self._wait_until_idle(report)
            yield
        finally:
            self.stop_all()
            self.workers = []

    def _start(self, count: int, number: int) -> BenchWorker:
        name = f"{PROCESS_MARK}{os.getpid()}-{count}-{number}"
        argv = [
            sys.executable,
            str(Path(settings.BASE_DIR) / "manage.py"),
            "rqworker",
            "--with-scheduler",
            "--name",
            name,
            QUEUE_NAME,
        ]
        process = ManagedProcess(
            name,
            argv,
            env=self.env,
            cwd=Path(settings.BASE_DIR),
            log_path=self.logs / f"{name}.log",
        ).start()
        self.started.append(process)
        return BenchWorker(name, process)

    def _wait_until_idle(self, report: Progress) -> None:
        deadline = time.monotonic() + WORKER_STARTUP_S
        while time.monotonic() < deadline:
            self.check_alive()
            states = self.states()
            report("workers", sum(s == "idle" for s in states), len(self.workers))
            if all(s == "idle" for s in states):
                return
            time.sleep(0.1)
        raise BenchError(f"workers not up within {WORKER_STARTUP_S:.0f} s{self._log_tail()}")

    def states(self) -> list[str]:
        with redis().pipeline(transaction=False) as pipe:
            for worker in self.workers:
                pipe.hget(worker.key, "state")
            return [_text(state) for state in pipe.execute()]

    def job_counts(self) -> int:
        """Jobs the workers finished successfully (RQ's own count in each worker's hash)."""
        with redis().pipeline(transaction=False) as pipe:
            for worker in self.workers:
                pipe.hget(worker.key, "successful_job_count")
            return sum(int(_text(count) or 0) for count in pipe.execute())

    def check_alive(self) -> None:
        for worker in self.workers:
            if worker.process.exit_code is not None:
                raise BenchError(
                    f"worker {worker.name} exited with code {worker.process.exit_code}"
                    f"{self._log_tail(worker)}"
                )

    def read_memory(self, into: list[float]) -> None:
        into[:] = [worker.rss_mib() for worker in self.workers]

    def stop_all(self) -> None:
        """Stop every worker started (each warm: it finishes its job), all at once."""
        running = [p for p in self.started if p.exit_code is None]
        if running:
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                list(pool.map(ManagedProcess.stop, running))
        for process in self.started:
            process.stop(timeout=0)  # reaps it; kills what is left of its session
        self.started = []

    def _log_tail(self, worker: BenchWorker | None = None) -> str:
        chosen = worker or (self.workers[0] if self.workers else None)
        tail = chosen.process.log_tail(1500) if chosen else ""
        return f"; the end of {chosen.name}'s log:\n{tail}" if chosen and tail else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


# --- throughput ---------------------------------------------------------------------------


def _bare_job_data(count: int, result_ttl: int = 0) -> list[Any]:
    """Bare no-op jobs with the options step jobs get (dispatch.enqueue)."""
    return [
        Queue.prepare_data(
            bench_noop.NOOP_JOB,
            result_ttl=result_ttl,
            failure_ttl=dispatch.FAILED_JOB_TTL_S,
            timeout=dispatch.job_timeout(None),
            description=f"bare no-op job {number} of the engine bench",
        )
        for number in range(count)
    ]


def _warm_up(fleet: Fleet, count: int, report: Progress) -> None:
    """A few sagas and bare jobs per worker, untimed: first forks, first connections."""
    report("warm-up", 0, 0)
    _drain_bare(fleet, 2 * WARM_UP_SAGAS * count, lambda *a: None)
    _drain_engine(fleet, WARM_UP_SAGAS * count, lambda *a: None)


def _drain_bare(fleet: Fleet, jobs: int, report: Progress) -> float:
    """Seconds from the moment ``jobs`` bare jobs appear on the queue (one transaction) to
    the moment the workers have finished them all and are idle again."""
    q = queue()
    before = fleet.job_counts()
    with redis().pipeline() as pipe:
        q.enqueue_many(_bare_job_data(jobs), pipeline=pipe)
        began = time.time()
        pipe.execute()
    last, progressed = 0, time.monotonic()
    while True:
        done = fleet.job_counts() - before
        if done >= jobs and _queue_empty(q) and all(s == "idle" for s in fleet.states()):
            ended = time.time()
            report("bare", jobs, jobs)
            return ended - began
        if done != last:
            last, progressed = done, time.monotonic()
            report("bare", done, jobs)
        _check_progress(fleet, progressed, "bare jobs")
        time.sleep(BARE_POLL_S)


def _queue_empty(q: Any) -> bool:
    with redis().pipeline(transaction=False) as pipe:
        pipe.llen(q.key)
        pipe.llen(q.intermediate_queue_key)
        return not any(pipe.execute())


def _check_progress(fleet: Fleet, progressed: float, what: str) -> None:
    fleet.check_alive()
    if time.monotonic() - progressed > STALL_S:
        raise BenchError(f"no progress with the {what} for {STALL_S:.0f} s{fleet._log_tail()}")


def _drain_engine(fleet: Fleet, sagas: int, report: Progress) -> float:
    """Seconds from the commit that enqueues the first steps of ``sagas`` sagas (started
    in one transaction) to the last one's completion (its ``finished_at``)."""
    marks: dict[str, float] = {}
    done_before = _completed()
    with transaction.atomic():
        # Runs first among the commit's callbacks, before the steps are enqueued.
        transaction.on_commit(lambda: marks.setdefault("began", time.time()))
        for number in range(sagas):
            services.start(bench_noop.NAME, {})
            if number % 50 == 0:
                report("start", number, sagas)
    # Progress is steps run: with every saga started at once, the first completes only
    # when most first and second steps are done.
    last, progressed = fleet.job_counts(), time.monotonic()
    while (done := _completed() - done_before) < sagas:
        report("engine", done, sagas)
        if (jobs := fleet.job_counts()) != last:
            last, progressed = jobs, time.monotonic()
        _check_failed()
        _check_progress(fleet, progressed, "sagas")
        time.sleep(ENGINE_POLL_S)
    report("engine", sagas, sagas)
    return _last_finished() - marks["began"]


def _completed() -> int:
    return TaskInstance.objects.filter(saga=bench_noop.NAME, status=TaskStatus.COMPLETED).count()


def _check_failed() -> None:
    ended = (
        TaskInstance.objects.filter(saga=bench_noop.NAME)
        .exclude(status__in=[*ACTIVE_TASK_STATUSES, TaskStatus.COMPLETED])
        .first()
    )
    if ended is not None:
        raise BenchError(f"a bench saga ended {ended.status}: {ended.pk}")


def _last_finished(task: TaskInstance | None = None) -> float:
    """When the last bench saga (or ``task``) finished, on this machine's clock (read as
    an age on the database's clock, which may be another machine's)."""
    tasks = TaskInstance.objects.filter(saga=bench_noop.NAME)
    if task is not None:
        tasks = tasks.filter(pk=task.pk)
    last = tasks.aggregate(last=Max("finished_at"))["last"]
    if last is None:
        raise BenchError("a completed bench saga has no finished_at")
    age = float((database_now() - last).total_seconds())
    return time.time() - age


# --- latency ------------------------------------------------------------------------------


def _latency(fleet: Fleet, samples: int, report: Progress) -> Latency:
    """Sequential single sagas and chains of three bare jobs, alternating, so both see the
    same machine; each timed from just before its start to its last step's end."""
    latency = Latency(len(fleet.workers))
    for number in range(samples):
        report("latency", number, samples)
        latency.saga_ms.append(_one_saga(fleet) * 1000)
        latency.chain_ms.append(_one_chain(fleet) * 1000)
    report("latency", samples, samples)
    return latency


def _one_saga(fleet: Fleet) -> float:
    began = time.time()
    task, _ = services.start(bench_noop.NAME, {})
    progressed = time.monotonic()
    while TaskInstance.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).count() == 0:
        _check_failed()
        _check_progress(fleet, progressed, "latency sagas")
        time.sleep(ENGINE_POLL_S)
    return _last_finished(task) - began


def _one_chain(fleet: Fleet) -> float:
    """Three bare jobs, each ``depends_on`` the one before (RQ enqueues it when that ends)."""
    q = queue()
    first, second, third = _bare_job_data(3, result_ttl=CHAIN_RESULT_TTL_S)
    began = time.time()
    job = q.enqueue_call(func=first.func, **_options(first))
    job = q.enqueue_call(func=second.func, depends_on=job, **_options(second))
    job = q.enqueue_call(func=third.func, depends_on=job, **_options(third))
    progressed = time.monotonic()
    while True:
        job.refresh()
        if job.get_status(refresh=False) == JobStatus.FINISHED and job.ended_at is not None:
            return float(job.ended_at.timestamp()) - began
        if job.get_status(refresh=False) == JobStatus.FAILED:
            raise BenchError(f"a chained bare job failed: {job.id}")
        _check_progress(fleet, progressed, "chained bare jobs")
        time.sleep(BARE_POLL_S)


def _options(data: Any) -> dict[str, Any]:
    return {
        "result_ttl": data.result_ttl,
        "failure_ttl": data.failure_ttl,
        "timeout": data.timeout,
        "description": data.description,
    }


# --- statements and commands per step (in this process) -----------------------------------


def _measure_costs(redis_url: str, report: Progress) -> Costs:
    """Run sagas' steps and bare jobs with an in-process worker (its own Redis client, so
    the engine's commands and RQ's can be told apart) and count what each costs, less the
    fixed cost of a burst worker's start and end (a burst with nothing to do)."""
    report("costs", 0, 0)
    rq_client = Redis.from_url(redis_url)
    rq_queue = Queue(QUEUE_NAME, connection=rq_client)
    # No reaper pass in the counted bursts (a worker enqueues one when it starts).
    redis().set(reaper.CADENCE_KEY, "held by bench engine", px=3_600_000)
    meter = Meter({"engine": redis().connection_pool, "rq": rq_client.connection_pool})
    steps = COST_SAGAS * STEPS_PER_SAGA

    def burst() -> None:
        _burst(rq_queue, rq_client)

    def starts() -> None:
        for _ in range(COST_SAGAS):
            services.start(bench_noop.NAME, {})

    try:
        # Untimed first: scripts loaded, connections made, RQ's group maintenance done.
        services.start(bench_noop.NAME, {})
        queue().enqueue_many(_bare_job_data(STEPS_PER_SAGA))
        burst()
        idle = meter.measure(burst)
        start = meter.measure(starts)
        step = meter.measure(burst).minus(idle)
        if _completed() < COST_SAGAS + 1:
            raise BenchError("the in-process worker did not complete the bench sagas")
        queue().enqueue_many(_bare_job_data(steps))
        bare = meter.measure(burst).minus(idle)
    finally:
        redis().delete(reaper.CADENCE_KEY)
        rq_client.close()
    return Costs(step, steps, bare, steps, start, COST_SAGAS)


def _burst(rq_queue: Queue, rq_client: Redis) -> None:
    """A burst worker until the queue is empty, with the bench's own signal handling (RQ's
    would turn Ctrl-C into a quiet stop) and the engine's INFO log lines held back."""
    engine_log = logging.getLogger("sagas.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    worker = SagaSimpleWorker([rq_queue], connection=rq_client)
    worker._install_signal_handlers = lambda: None  # type: ignore[method-assign]
    try:
        worker.work(burst=True, logging_level="WARNING")
    finally:
        engine_log.setLevel(level)
    if _interrupted.is_set():  # RQ's loop catches every exception, KeyboardInterrupt too
        raise Interrupted("interrupted while the in-process worker ran")


class Meter:
    """Counts SQL statements on the default connection, Redis commands as the server counts
    them (``INFO commandstats``, every client) and, client side, the commands and round
    trips of each named connection pool (a pipeline is one round trip)."""

    def __init__(self, pools: dict[str, ConnectionPool]) -> None:
        self.pools = pools
        self.commands: dict[str, int] = {}
        self.round_trips = 0

    def measure(self, work: Callable[[], Any]) -> Cost:
        self.commands = dict.fromkeys(self.pools, 0)
        self.round_trips = 0
        server_before = _server_commands()
        with CaptureQueriesContext(connections[DEFAULT_DB_ALIAS]) as queries, self._counting():
            work()
        return Cost(
            sql=len(queries),
            commands=_server_commands() - server_before,
            engine_commands=self.commands.get("engine", 0),
            rq_commands=self.commands.get("rq", 0),
            round_trips=self.round_trips,
        )

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        """Tag the connections the pools hand out; count what tagged connections send."""
        meter = self
        originals = {
            name: getattr(AbstractConnection, name)
            for name in ("send_command", "pack_commands", "send_packed_command")
        }

        def owner(conn: Any) -> str | None:
            return getattr(conn, OWNER, None)

        def send_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if (name := owner(conn)) is not None:
                meter.commands[name] += 1
            return originals["send_command"](conn, *args, **kwargs)

        def pack_commands(conn: Any, commands: Any) -> Any:
            commands = list(commands)
            if (name := owner(conn)) is not None:
                meter.commands[name] += len(commands)
            return originals["pack_commands"](conn, commands)

        def send_packed_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if owner(conn) is not None:
                meter.round_trips += 1
            return originals["send_packed_command"](conn, *args, **kwargs)

        patched = {
            "send_command": send_command,
            "pack_commands": pack_commands,
            "send_packed_command": send_packed_command,
        }
        for pool_name, pool in self.pools.items():
            pool.get_connection = _tagging(pool, pool_name)  # type: ignore[method-assign]
        for name, replacement in patched.items():
            setattr(AbstractConnection, name, replacement)
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(AbstractConnection, name, original)
            for pool in self.pools.values():
                with contextlib.suppress(AttributeError):
                    del pool.get_connection


OWNER = "_bench_engine_owner"


def _tagging(pool: ConnectionPool, name: str) -> Callable[..., Any]:
    handed_out = type(pool).get_connection

    def get_connection(*args: Any, **kwargs: Any) -> Any:
        conn = handed_out(pool, *args, **kwargs)
        setattr(conn, OWNER, name)  # our own attribute on redis-py's connection
        return conn

    return get_connection


def _server_commands() -> int:
    """Commands the private Redis has run so far, its own INFO calls left out."""
    stats = redis().info("commandstats")
    return sum(int(row["calls"]) for name, row in stats.items() if name != "cmdstat_info")


# --- the command (manage.py bench engine) -------------------------------------------------


def add_parser(benchmarks: Any) -> None:
    """The ``engine`` subcommand of ``manage.py bench``."""
    engine = benchmarks.add_parser(
        "engine",
        help="What the engine costs per step beyond bare RQ, on real workers.",
        description=(
            "Drain N no-op jobs with bare RQ and N/3 three-step no-op sagas through the "
            "engine, on 1 then K workers (rqworker processes), against a private redis-server "
            "and a scratch database that are removed at the end; then latency, statements "
            "and Redis commands per step, and the workers' memory."
        ),
    )
    engine.add_argument(
        "--sagas",
        metavar="N",
        default=str(DEFAULT_JOBS),
        help=(f"Work size: N bare jobs, and N/3 sagas of 3 steps (default {DEFAULT_JOBS})."),
    )
    engine.add_argument(
        "--workers",
        metavar="K",
        default=str(DEFAULT_WORKERS),
        help=f"Worker processes of the second run; the first has 1 (default {DEFAULT_WORKERS}).",
    )
    engine.add_argument("--json", action="store_true", help="Print one JSON object.")


def run_command(command: BaseCommand, options: dict[str, Any]) -> None:
    """``bench engine``: exit 2 on bad arguments, 1 when the run fails or is interrupted."""
    jobs = _whole_number("--sagas", options["sagas"], STEPS_PER_SAGA, None)
    workers = _whole_number("--workers", options["workers"], 1, MAX_WORKERS)
    as_json = options["json"]
    progress = None if as_json or not command.stderr.isatty() else _progress(command)
    try:
        figures = engine_bench(jobs, workers, progress)
    except BenchError as exc:
        raise CommandError(str(exc), returncode=1) from exc
    except KeyboardInterrupt:
        message = "bench engine interrupted; everything it started was stopped and removed"
        raise CommandError(message, returncode=1) from None
    finally:
        if progress is not None:
            command.stderr.write("\r\033[K", style_func=lambda text: text, ending="")
    if as_json:
        command.stdout.write(json.dumps(figures.as_json(), sort_keys=True))
    else:
        command.stdout.write(table(figures))


def _whole_number(option: str, value: Any, least: int, most: int | None) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        number = least - 1
    if number < least or (most is not None and number > most):
        upto = f" and at most {most}" if most is not None else ""
        raise CommandError(
            f"{option} must be a whole number of at least {least}{upto}, not {value!r}",
            returncode=2,
        )
    return number


def _progress(command: BaseCommand) -> Progress:
    def report(phase: str, done: int, total: int) -> None:
        of = f": {done:,}/{total:,}" if total else ""
        line = f"\r\033[K{PHASES.get(phase, phase)}{of}"
        command.stderr.write(line, style_func=lambda text: text, ending="")
        command.stderr.flush()

    return report


def table(f: EngineFigures) -> str:
    """The human output: throughput per worker count, then latency, costs, memory, goals."""
    data = f.as_json()
    rows = [
        f"bench engine: {f.jobs:,} bare no-op jobs and {f.sagas:,} three-step no-op sagas "
        f"({f.sagas * STEPS_PER_SAGA:,} steps) per run, {f.database}, private redis-server; "
        f"{os.cpu_count()} CPUs, load average {f.load_average} as it began",
        f"{'workers':<9}{'bare jobs/s':>13}{'(CPU busy)':>12}{'engine steps/s':>16}"
        f"{'(CPU busy)':>12}{'ratio':>8}",
        *[
            f"{r.workers:<9}{r.jobs_per_s:>13.1f}{_share(r.cpu_bare):>12}{r.steps_per_s:>16.1f}"
            f"{_share(r.cpu_engine):>12}{r.ratio:>8.3f}"
            for r in f.runs
        ],
    ]
    if speedups := f.speedups():
        rows.append(
            f"speed-up 1 -> {f.workers} workers: bare RQ {speedups['bare']:.2f}x, engine "
            f"{speedups['engine']:.2f}x ({speedups['engine_vs_bare']:.2f} of bare RQ's)"
        )
    lat = data["latency_ms"]
    rows += [
        f"latency, start to completed ({lat['samples']} each, {lat['workers']} workers): "
        f"3-step saga p50 {lat['saga_p50']:.0f} ms, p95 {lat['saga_p95']:.0f} ms; "
        f"3 chained bare jobs p50 {lat['chain_p50']:.0f} ms, p95 {lat['chain_p95']:.0f} ms "
        f"(ratio p50 {lat['ratio_p50']:.2f}, p95 {lat['ratio_p95']:.2f})",
        "in-process, per step: " + _costs_line(data["per_step"]),
        "per bare job: " + _costs_line(data["per_bare_job"]),
        "per start (services.start): " + _costs_line(data["per_start"]),
        "worker RSS (MiB), before -> after each run: "
        + "; ".join(
            f"{r.workers} worker{'s' if r.workers > 1 else ''}: "
            + ", ".join(
                f"{b} -> {a}" for b, a in zip(r.rss_before_mib, r.rss_after_mib, strict=False)
            )
            for r in f.runs
        ),
        "goals:",
    ]
    rows += [_goal_line(name, goal) for name, goal in data["goals"].items()]
    rows.append(f"({f.seconds:.0f} s in all; CPU busy: the whole machine's, Postgres included)")
    return "\n".join(rows)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _costs_line(cost: dict[str, float]) -> str:
    return (
        f"{cost['sql_queries']:g} SQL statements, {cost['redis_commands']:g} Redis commands "
        f"(engine client {cost['redis_commands_engine']:g}, RQ's {cost['redis_commands_rq']:g}) "
        f"in {cost['redis_round_trips']:g} round trips"
    )


GOAL_NAMES = {
    "ratio": "engine steps/s ÷ bare RQ jobs/s",
    "speedup": "engine speed-up ÷ bare RQ speed-up",
    "latency": "saga p50 ÷ 3 chained bare jobs p50",
    "rss_growth_mib": "worker RSS growth (MiB)",
}


def _goal_line(name: str, goal: dict[str, Any]) -> str:
    met = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
    value = "-" if goal["value"] is None else f"{goal['value']:g}"
    extra = ""
    if name == "rss_growth_mib" and goal["sagas"] < goal["over_sagas"]:
        extra = f" (the goal is over {goal['over_sagas']:,} sagas; this run had {goal['sagas']:,})"
    return f"  {GOAL_NAMES.get(name, name)}: {value} (goal {goal['goal']}): {met}{extra}"
