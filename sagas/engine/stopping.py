"""Asking running attempts to stop, and stopping those that do not listen.

A stop request is a Redis key that ``ctx.cancelled`` reads in one round trip; it can
address a whole task (a cancel, an undo) or one attempt (a branch its group no longer
needs, an attempt the reaper declared lost). A step that ignores it past the grace period
is stopped with RQ's ``stop-job`` command, published straight to the worker that runs it:
that needs no job hash, so it still works after Redis lost its data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError
from rq.command import send_command

from sagas.engine.connection import key, redis
from sagas.states import AttemptKind

logger = logging.getLogger("sagas.engine")

SIGNAL_TTL_S = 7 * 24 * 3600


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


# The value is when the stop was asked, on Redis's clock: the worker that checks the grace
# period compares it with that same clock, never with the asking machine's.
_SIGNAL = """
local now = redis.call('TIME')
redis.call('SET', KEYS[1], now[1] .. '.' .. string.format('%06d', now[2]), 'EX', ARGV[1])
"""


def signal_task(connection: Redis, task_id: object) -> None:
    """Ask every running action attempt of a task to stop."""
    connection.eval(_SIGNAL, 1, task_signal_key(task_id), SIGNAL_TTL_S)


def signal_attempt(connection: Redis, attempt: AttemptAddress) -> None:
    """Ask one attempt to stop."""
    connection.eval(_SIGNAL, 1, attempt_signal_key(attempt), SIGNAL_TTL_S)


def signal_task_safely(task_id: object) -> None:
    """After commit: if Redis is down the steps run on, and the reaper asks again."""
    try:
        signal_task(redis(), task_id)
    except RedisError as exc:
        logger.warning("could not ask the steps of %s to stop (%s); the reaper will", task_id, exc)


def signal_attempt_safely(attempt: AttemptAddress) -> None:
    try:
        signal_attempt(redis(), attempt)
    except RedisError as exc:
        logger.warning("could not ask attempt %s to stop (%s); the reaper will", attempt, exc)


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


def grace_expired(connection: Redis, attempt: AttemptAddress) -> bool:
    """Whether the attempt was asked to stop longer than the grace period ago (by Redis's
    clock, which also stamped the request)."""
    asked = signalled_at(connection, attempt)
    if asked is None:
        return False
    seconds, micros = connection.time()
    return seconds + micros / 1e6 - asked >= settings.SAGAS_CANCEL_GRACE


def stop_job(worker_name: str, job_id: str) -> bool:
    """Tell ``worker_name`` to stop ``job_id`` now (RQ's stop-job, without fetching the job:
    the job hash may be gone). Its parent defers the stop while the horse settles."""
    if not worker_name or not job_id:
        return False
    try:
        send_command(redis(), worker_name, "stop-job", job_id=job_id)
    except RedisError as exc:
        logger.warning("could not stop job %s on %s: %s", job_id, worker_name, exc)
        return False
    logger.warning(
        "asked %s to stop job %s: it ignored its stop past the grace", worker_name, job_id
    )
    return True
