"""Engine tests: real redis-server (the suite's private one), real RQ workers."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from django.db import connection
from rq import Worker
from rq.scheduler import RQScheduler

from sagas.definitions import registry
from sagas.embedded import ManagedProcess
from sagas.engine.connection import queue, redis
from sagas.engine.worker import SagaSimpleWorker
from sagas.models import TaskInstance
from sagas.states import ACTIVE_TASK_STATUSES

TEST_SAGAS = "tests.engine.sagas_for_tests"
registry.load([TEST_SAGAS])
BASE_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """An in-process RQ worker installs its SIGINT/SIGTERM handlers for good: take them
    back, so no later test (or tool running the tests) inherits them."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def every_test_starts_with_an_empty_redis(empty_redis):
    """Every engine test runs against an emptied Redis (``empty_redis`` in tests/conftest)."""


# RQ's scheduler keeps whole seconds, so a 20 ms retry runs up to a second late. In the
# in-process tests a step's job runs as soon as its exact intended time (the step's
# next_attempt_at) has passed; the real-worker tests keep RQ's own timing.
IN_PROCESS_LOOKAHEAD_S = 1.0


def move_due_scheduled_jobs(ahead_s: float = 0.0) -> None:
    """What a worker's scheduler does every second (a burst worker does it only at start);
    with ``ahead_s``, also step jobs due within it whose intended time has passed."""
    scheduler = RQScheduler([queue()], connection=redis())
    scheduler.prepare_registries([queue().name])
    scheduler.enqueue_scheduled_jobs()
    if ahead_s:
        scheduled = queue().scheduled_job_registry
        for jid in redis().zrangebyscore(scheduled.key, 0, time.time() + ahead_s):
            job = queue().fetch_job(jid.decode() if isinstance(jid, bytes) else str(jid))
            if job is not None and intended_time_passed(job):
                scheduled.remove(job)
                queue().enqueue_job(job, at_front=job.should_enqueue_at_front())


def intended_time_passed(job) -> bool:
    from django.utils import timezone

    from sagas.models import StepRecord

    if not str(job.func_name).endswith("run_step"):
        return False
    task_id, step_name = job.args[:2]
    due = (
        StepRecord.objects.filter(task_id=task_id, name=step_name)
        .values_list("next_attempt_at", flat=True)
        .first()
    )
    return due is not None and due <= timezone.now()


def hold_reaper(seconds: float = 120) -> None:
    """Keep workers of this test from enqueueing reaper passes (as if one was just
    scheduled): for tests that count the jobs a worker runs."""
    from sagas.engine.reaper import CADENCE_KEY

    redis().set(CADENCE_KEY, "held by the test", px=int(seconds * 1000))


def reaper_watching(for_s: float = 3600) -> None:
    """As if reaper passes had watched the database, without a gap, for ``for_s``: attempts
    whose heartbeat expired may be declared lost at once."""
    from sagas.engine import reaper

    now = time.time()  # the test database runs on this machine: one clock
    state = {"last": now, **{f"since:{e}": now - for_s for e in reaper._expiries()}}
    redis().hset(reaper.WATCH_KEY, mapping=state)  # type: ignore[arg-type]


def next_scheduled_in() -> float | None:
    registry = queue().scheduled_job_registry
    upcoming = redis().zrange(registry.key, 0, 0, withscores=True)
    return max(0.0, float(upcoming[0][1]) - time.time()) if upcoming else None


def drain(timeout: float = 60) -> None:
    """Run queued and scheduled step jobs in this process until nothing is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        move_due_scheduled_jobs(IN_PROCESS_LOOKAHEAD_S)
        if queue().count:
            SagaSimpleWorker([queue()], connection=redis()).work(burst=True)
            continue
        wait = next_scheduled_in()
        if wait is None:
            return
        time.sleep(min(max(wait - IN_PROCESS_LOOKAHEAD_S, 0) + 0.05, 1.0))
    raise AssertionError(f"jobs still pending after {timeout} s")


def run_to_end(task: TaskInstance, timeout: float = 60) -> TaskInstance:
    drain(timeout)
    task.refresh_from_db()
    return task


def database_url() -> str:
    """The test database as a URL, for worker processes (they cannot share an in-memory DB)."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (work horses run in their own process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


@pytest.fixture
def workers(tmp_path):
    """Start real ``rqworker --with-scheduler`` processes against the test database."""
    started: list[ManagedProcess] = []

    def start_worker(name: str, **env: str) -> ManagedProcess:
        environment = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "SAGA_MODULES": ",".join(
                [
                    "sagas.examples.create_zip",
                    "sagas.examples.chaos",
                    "sagas.examples.flight_search",
                    TEST_SAGAS,
                ]
            ),
            "SAGAS_REAPER_INTERVAL": "1s",
            "SAGAS_REAPER_GRACE": "2s",
            **env,
        }
        argv = [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "rqworker",
            "--with-scheduler",
            "--name",
            f"{name}-{os.getpid()}-{time.monotonic_ns()}",
            "default",
        ]
        process = ManagedProcess(
            name, argv, env=environment, cwd=BASE_DIR, log_path=tmp_path / f"{name}.log"
        ).start()
        started.append(process)
        return process

    yield start_worker
    for process in started:
        kill_tree(process.pid)
        process.stop(timeout=1)


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message or f"condition not met within {timeout} s")


def workers_up(count: int, timeout: float = 30) -> None:
    """Wait until ``count`` workers have registered (they boot slowly on a loaded machine)."""
    wait_for(
        lambda: Worker.count(connection=redis()) >= count,
        timeout,
        message=f"{count} workers not up within {timeout} s",
    )


def terminal(task: TaskInstance) -> bool:
    task.refresh_from_db()
    return task.status not in ACTIVE_TASK_STATUSES


# ---- Fault injection: loopback proxies in front of Redis and Postgres -----------------------
# Worker processes are pointed at a proxy instead of the real server, so a test can cut and
# restore their connections without root (see tests/faults.py). Imports stay local so this
# block only appends to the module.


@pytest.fixture
def redis_proxy():
    """A started LoopbackProxy in front of the suite's private redis-server."""
    from urllib.parse import urlsplit

    from django.conf import settings

    from tests.faults import LoopbackProxy

    url = urlsplit(settings.REDIS_URL)
    with LoopbackProxy(url.hostname or "127.0.0.1", url.port or 6379, name="redis") as proxy:
        yield proxy


def redis_url_via(proxy) -> str:
    """``settings.REDIS_URL`` (same credentials and db number) through ``proxy``."""
    from urllib.parse import urlsplit

    from django.conf import settings

    url = urlsplit(settings.REDIS_URL)
    credentials = url.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return url._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl()


@pytest.fixture
def postgres_proxy():
    """A started LoopbackProxy in front of the test database's server (Postgres only)."""
    from tests.faults import LoopbackProxy

    if connection.vendor != "postgresql":
        pytest.skip("needs Postgres: the proxy forwards TCP to the database server")
    db = connection.settings_dict
    host, port = db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)
    if host.startswith("/"):
        pytest.skip("the test database is reached over a Unix socket, not TCP")
    with LoopbackProxy(host, port, name="postgres") as proxy:
        yield proxy


def database_url_via(proxy) -> str:
    """``database_url()`` with the proxy's address, for worker processes to connect through."""
    credentials, _, location = database_url().rpartition("@")
    name = location.partition("/")[2]
    return f"{credentials}@127.0.0.1:{proxy.port}/{name}"
