"""Asking running attempts to stop, and stopping those that do not listen.

A stop request is a Redis key that ``ctx.cancelled`` reads in one round trip; it can
address a whole task (a cancel, an undo) or one attempt (a branch its group no longer
needs, an attempt the reaper declared lost). A step that ignores it past the grace period
is stopped with RQ's ``stop-job`` command, published straight to the worker that runs it:
that needs no job hash, so it still works after Redis lost its data.
"""

from __future__ import annotations

import logging
import time
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


def signal_task(connection: Redis, task_id: object) -> None:
    """Ask every running action attempt of a task to stop (the value is when it was asked)."""
    connection.set(task_signal_key(task_id), str(time.time()), ex=SIGNAL_TTL_S)


def signal_attempt(connection: Redis, attempt: AttemptAddress) -> None:
    """Ask one attempt to stop."""
    connection.set(attempt_signal_key(attempt), str(time.time()), ex=SIGNAL_TTL_S)


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


def grace_expired(connection: Redis, attempt: AttemptAddress, now: float) -> bool:
    """Whether the attempt was asked to stop longer than the grace period ago."""
    asked = signalled_at(connection, attempt)
    return asked is not None and now - asked >= settings.SAGAS_CANCEL_GRACE


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
