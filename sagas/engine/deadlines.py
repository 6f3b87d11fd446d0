"""Saga deadlines: a job scheduled for the moment a task's ``deadline_s`` passes cancels it
(as ``system``) if it is still being moved forward; the reaper enforces the same deadline
(``TaskInstance.deadline_at``) if Redis lost that job."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError

from sagas.engine import apply, requests
from sagas.engine.apply import Loaded
from sagas.engine.connection import queue
from sagas.models import TaskInstance

logger = logging.getLogger("sagas.engine")

ENFORCE = "sagas.engine.deadlines.enforce"


def schedule(task: TaskInstance, deadline_s: int) -> None:
    """After commit: a job that cancels the task if it is still active at its deadline."""
    at = timezone.now() + timedelta(seconds=deadline_s)

    def enqueue() -> None:
        try:
            queue().enqueue_at(
                at, ENFORCE, str(task.pk), job_id=f"deadline-{task.pk}", result_ttl=0
            )
        except RedisError as exc:
            logger.warning(
                "deadline of %s not scheduled (%s); the reaper enforces it", task.pk, exc
            )

    transaction.on_commit(enqueue)


def enforce(task_id: str) -> str:
    """Cancel by ``system`` a task still moving forward at its saga's deadline (never a
    parked one, nor one whose work is done and whose stopped branches wind down)."""

    def decide(loaded: Loaded) -> str:
        reason = "deadline passed"
        return requests.cancel(loaded.plan, None, reason, by=requests.BY_DEADLINE).outcome

    return apply.decide(task_id, decide)
