"""Handing step attempts to RQ (deterministic job ids, only after commit) and reading
back what Redis holds of them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError
from rq.defaults import RQ_KEY_PREFIX
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from sagas.engine.connection import queue, redis
from sagas.engine.plan import job_id
from sagas.engine.rescue import ALIVE, MISSING, STUCK_SCHEDULED
from sagas.engine.retry import scheduler_time
from sagas.models import StepRecord
from sagas.states import AttemptKind

logger = logging.getLogger("sagas.engine")

# The job RQ runs; named, not imported, so this module does not depend on the executor.
RUN_STEP = "sagas.engine.executor.run_step"
FAILED_JOB_TTL_S = 7 * 24 * 3600
WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED}

__all__ = ["enqueue", "job_id", "job_states", "promote", "schedule"]


def bookkeeping_margin_s() -> int:
    """Headroom the RQ job gets beyond the step's own timeout: the settle may retry for
    ``SAGAS_SETTLE_RETRY_FOR`` through a database failover, and must never be cut off."""
    return int(settings.SAGAS_SETTLE_RETRY_FOR) + 60


def job_timeout(step_timeout_s: float | None) -> int:
    if step_timeout_s:
        return int(step_timeout_s) + bookkeeping_margin_s()
    return int(settings.SAGAS_JOB_TIMEOUT) + bookkeeping_margin_s()


def schedule(
    step: StepRecord,
    kind: str,
    attempt: int,
    jid: str,
    *,
    at: datetime | None = None,
    step_timeout_s: float | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Record which job should run ``step`` next and enqueue it once this transaction commits."""
    StepRecord.objects.filter(pk=step.pk).update(job_id=jid)
    step.job_id = jid
    transaction.on_commit(
        partial(enqueue, str(step.task_id), step.name, kind, attempt, jid, at, step_timeout_s, meta)
    )


def enqueue(
    task_id: str,
    step_name: str,
    kind: str,
    attempt: int,
    jid: str,
    at: datetime | None = None,
    step_timeout_s: float | None = None,
    meta: dict[str, Any] | None = None,
) -> bool:
    """Put the job on the queue (or the scheduler); Redis trouble leaves it to the reaper."""
    options = {
        "job_id": jid,
        "unique": True,
        "result_ttl": 0,
        "failure_ttl": FAILED_JOB_TTL_S,
        "job_timeout": job_timeout(step_timeout_s),
        # Undo work first, so compensations finish even under a backlog.
        "at_front": kind == AttemptKind.COMPENSATION,
        "description": f"{step_name} {kind} #{attempt} of task {task_id}",
        "meta": meta or {},
    }
    args = (RUN_STEP, task_id, step_name, kind, attempt)
    try:
        if at is not None and at > timezone.now():
            queue().enqueue_at(scheduler_time(at), *args, **options)
        else:
            queue().enqueue(*args, **options)
    except DuplicateJobError:
        logger.debug("job %s is already queued", jid)
        return False
    except RedisError as exc:
        logger.warning("could not enqueue %s (%s); the reaper will retry", jid, exc)
        return False
    return True


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """ALIVE, STUCK_SCHEDULED (left in the scheduled registry) or MISSING for each job, in
    two pipelined round trips; no clock is compared here (the caller knows when a job was
    due, on the database's clock). A started job is alive while its worker is."""
    ids = list(dict.fromkeys(j for j in job_ids if j))
    if not ids:
        return {}
    with redis().pipeline(transaction=False) as pipe:
        for jid in ids:
            pipe.hmget(Job.key_for(jid), "status", "worker_name")
        rows = pipe.execute()
    states: dict[str, str] = {}
    started: dict[str, str] = {}
    for jid, (status, worker) in zip(ids, rows, strict=True):
        state = _state(status.decode() if status else "")
        if state == JobStatus.STARTED:
            started[jid] = worker.decode() if worker else ""
        else:
            states[jid] = state
    states.update(_started_states(started))
    return states


def _state(status: str) -> str:
    if status in WAITING:
        return ALIVE
    if status == JobStatus.SCHEDULED:
        return STUCK_SCHEDULED  # alive until the caller sees it is long overdue
    if status == JobStatus.STARTED:
        return JobStatus.STARTED
    return MISSING


def _started_states(started: dict[str, str]) -> dict[str, str]:
    if not started:
        return {}
    with redis().pipeline(transaction=False) as pipe:
        for worker in started.values():
            pipe.exists(f"{RQ_KEY_PREFIX}:worker:{worker}")
        alive = pipe.execute()
    return {jid: ALIVE if up else MISSING for jid, up in zip(started, alive, strict=True)}


def promote(jid: str) -> None:
    """Do a dead scheduler's work for one overdue job: move it onto the queue."""
    try:
        job = Job.fetch(jid, connection=redis())
        q = queue()
        q.scheduled_job_registry.remove(job)
        q.enqueue_job(job, at_front=job.should_enqueue_at_front())
    except NoSuchJobError:
        return  # the scheduler moved it (and a worker ran it) just now
    except RedisError as exc:
        logger.warning("could not promote overdue job %s: %s", jid, exc)
        return
    logger.warning("reaper moved overdue scheduled job %s onto the queue", jid)
