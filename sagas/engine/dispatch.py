"""Handing step attempts to RQ: deterministic job ids, enqueued only after commit."""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import DuplicateJobError

from sagas.engine.connection import queue
from sagas.engine.retry import scheduler_time
from sagas.models import StepRecord
from sagas.states import AttemptKind

logger = logging.getLogger("sagas.engine")

# Headroom the RQ job gets beyond the step's own timeout, so bookkeeping is never cut off.
BOOKKEEPING_MARGIN_S = 120
FAILED_JOB_TTL_S = 7 * 24 * 3600


def job_id(task_id: object, step_name: str, kind: str, attempt: int, suffix: str = "") -> str:
    """``saga-<task>-<step>-a<n>`` (action) or ``-c<n>`` (compensation): [A-Za-z0-9_-] only."""
    letter = "c" if kind == AttemptKind.COMPENSATION else "a"
    base = f"saga-{task_id}-{step_name}-{letter}{attempt}"
    return f"{base}-{suffix}" if suffix else base


def job_timeout(step_timeout_s: float | None) -> int:
    if step_timeout_s:
        return int(step_timeout_s) + BOOKKEEPING_MARGIN_S
    return int(settings.SAGAS_JOB_TIMEOUT)


def schedule(
    step: StepRecord,
    kind: str,
    attempt: int,
    *,
    at: datetime | None = None,
    suffix: str = "",
    step_timeout_s: float | None = None,
) -> str:
    """Record which job should run ``step`` next and enqueue it once this transaction commits."""
    jid = job_id(step.task_id, step.name, kind, attempt, suffix)
    StepRecord.objects.filter(pk=step.pk).update(job_id=jid)
    step.job_id = jid
    transaction.on_commit(
        partial(enqueue, str(step.task_id), step.name, kind, attempt, jid, at, step_timeout_s)
    )
    return jid


def enqueue(
    task_id: str,
    step_name: str,
    kind: str,
    attempt: int,
    jid: str,
    at: datetime | None = None,
    step_timeout_s: float | None = None,
) -> bool:
    """Put the job on the queue (or the scheduler); Redis trouble leaves it to the reaper."""
    from sagas.engine.executor import run_step

    options = {
        "job_id": jid,
        "unique": True,
        "result_ttl": 0,
        "failure_ttl": FAILED_JOB_TTL_S,
        "job_timeout": job_timeout(step_timeout_s),
        # Undo work first, so compensations finish even under a backlog.
        "at_front": kind == AttemptKind.COMPENSATION,
        "description": f"{step_name} {kind} #{attempt} of task {task_id}",
    }
    args = (run_step, task_id, step_name, kind, attempt)
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
