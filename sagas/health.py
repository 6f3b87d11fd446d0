"""Is the console able to work: database and Redis probes, and the operators' detail view.

Every probe is cheap (``SELECT 1``, ``PING``, O(1) Redis counters, one GROUP BY) so a load
balancer can call it every few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, connection
from django.db.models import Count
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from sagas.engine.breaker import OPEN, all_states
from sagas.engine.connection import queue, redis
from sagas.models import TaskInstance
from sagas.states import TaskStatus

PROBE_TIMEOUT_S = 2.0
# Jobs at the head of the queue inspected for the oldest wait (compensations jump the line).
OLDEST_JOB_SAMPLE = 50


def database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def redis_answers() -> None:
    probe_client().ping()


CHECKS: dict[str, Callable[[], None]] = {"database": database_answers, "redis": redis_answers}


def failing_checks() -> list[str]:
    """Names of the dependencies that do not answer, in a stable order."""
    return [name for name, probe in CHECKS.items() if not _passes(probe)]


def _passes(probe: Callable[[], None]) -> bool:
    try:
        probe()
    except (DatabaseError, RedisError, OSError):
        return False
    return True


def probe_client() -> Redis:
    """The engine's Redis with short timeouts, so a dead server cannot hang the health check.

    django-rq builds a new client per call, so the timeouts apply to this probe only.
    """
    client = redis()
    client.connection_pool.connection_kwargs.update(
        socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
    )
    return client


def detail(failing: list[str]) -> dict[str, Any]:
    """What operators look at: queue depths, workers, open breakers, tasks by status."""
    redis_up = "redis" not in failing
    return {
        "tasks_by_status": tasks_by_status() if "database" not in failing else None,
        "queues": queue_depths() if redis_up else None,
        "open_breakers": open_breakers() if redis_up else None,
    }


def tasks_by_status() -> dict[str, int]:
    """One GROUP BY over the task table; every status is present, zero included."""
    counts = {status.value: 0 for status in TaskStatus}
    rows = TaskInstance.objects.order_by().values_list("status").annotate(n=Count("pk"))
    counts.update(dict(rows))
    return counts


def queue_depths() -> dict[str, dict[str, Any]]:
    step_queue = queue()
    return {
        step_queue.name: {
            "queued": step_queue.count,
            "scheduled": step_queue.scheduled_job_registry.get_job_count(cleanup=False),
            "started": step_queue.started_job_registry.get_job_count(cleanup=False),
            "failed": step_queue.failed_job_registry.get_job_count(cleanup=False),
            "workers": Worker.count(queue=step_queue),
            "oldest_queued_age_s": oldest_queued_age_s(step_queue),
        }
    }


def oldest_queued_age_s(step_queue: Any) -> float | None:
    """Seconds the longest-waiting job among the first few in the queue has waited."""
    enqueued = [
        job.enqueued_at
        for job in step_queue.get_jobs(0, OLDEST_JOB_SAMPLE)
        if job is not None and job.enqueued_at is not None
    ]
    if not enqueued:
        return None
    oldest = min(_as_utc(t) for t in enqueued)
    return round((datetime.now(UTC) - oldest).total_seconds(), 3)


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def open_breakers() -> list[dict[str, Any]]:
    """Breakers whose ``open_until`` is still ahead (half-open ones let a trial through)."""
    now = time.time()
    return [
        {"name": name, "open_until": datetime.fromtimestamp(state.open_until, UTC)}
        for name, state in all_states(redis()).items()
        if state.status(now) == OPEN
    ]
