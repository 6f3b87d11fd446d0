"""The worker class (django-rq ``WORKER_CLASS``): fork hygiene, dead-horse bookkeeping, reaper.

The pinned command stays ``python manage.py rqworker --with-scheduler default``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.worker import SimpleWorker, Worker

from sagas.engine import cancellation
from sagas.engine.executor import Outcome, settle_dead_attempt
from sagas.engine.reaper import reap
from sagas.models import StepAttempt
from sagas.states import AttemptOutcome

logger = logging.getLogger("sagas.engine")

MONITOR_INTERVAL_S = 1


class ReaperMixin:
    """Runs the reaper from the worker's own loop every ``SAGAS_REAPER_INTERVAL``."""

    _last_reaped: float = 0.0

    @property
    def dequeue_timeout(self) -> int:
        # Wake up from the blocking dequeue often enough to reap on time.
        inherited: int = super().dequeue_timeout  # type: ignore[misc]
        return max(1, min(inherited, settings.SAGAS_REAPER_INTERVAL))

    def _reaper_due(self) -> bool:
        return time.monotonic() - self._last_reaped >= settings.SAGAS_REAPER_INTERVAL

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return bool(super().should_run_maintenance_tasks) or self._reaper_due()  # type: ignore[misc]

    def run_maintenance_tasks(self) -> None:
        if self._reaper_due():
            self._last_reaped = time.monotonic()
            run_reaper_safely()
        if super().should_run_maintenance_tasks:  # type: ignore[misc]
            super().run_maintenance_tasks()  # type: ignore[misc]


def run_reaper_safely() -> None:
    close_old_connections()
    try:
        reap()
    except Exception:  # the worker must keep working even if a reaper pass fails
        logger.exception("reaper pass failed")


class SagaWorker(ReaperMixin, Worker):
    """A forking worker: each step runs in a work horse with fresh database connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The parent looks at its running job this often (heartbeat, cancellation grace).
        kwargs.setdefault("job_monitoring_interval", MONITOR_INTERVAL_S)
        super().__init__(*args, **kwargs)

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        super().maintain_heartbeats(job, execution)
        address = attempt_address(job)
        if address is None or self._stopped_job_id == job.id:
            return
        try:
            overdue = cancellation.grace_expired(self.connection, address, time.time())
        except RedisError:
            return
        if overdue:
            # The step ignored its cancellation for the whole grace period.
            logger.warning("stopping job %s: cancellation grace period is over", job.id)
            try:
                send_stop_job_command(self.connection, job.id)
            except Exception:  # the worker must keep monitoring; the reaper tries again
                logger.exception("could not stop job %s", job.id)

    def fork_work_horse(self, job: Any, queue: Any) -> None:
        # A forked horse must never share the parent's database sockets.
        connections.close_all()
        super().fork_work_horse(job, queue)

    def handle_work_horse_killed(self, job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[no-untyped-call]
        settle_dead_job(job.id, AttemptOutcome.LOST, f"work horse died (wait status {ret_val})")

    def _handle_stopped_job(self, job: Any, queue: Any, execution: Any) -> None:
        # stop-job killed the horse outright: no finally ran there, so the parent records it.
        settle_dead_job(
            job.id, AttemptOutcome.CANCELLED, "step stopped: cancellation grace ran out"
        )
        super()._handle_stopped_job(job, queue, execution)


class SagaSimpleWorker(ReaperMixin, SimpleWorker):
    """Runs steps in the worker process itself (tests, debugging)."""


def attempt_address(job: Any) -> cancellation.AttemptAddress | None:
    """The attempt a step job runs, from its arguments (None for other jobs)."""
    if not str(getattr(job, "func_name", "")).endswith("executor.run_step"):
        return None
    task_id, step_name, kind, number = job.args[:4]
    return cancellation.AttemptAddress(str(task_id), step_name, kind, int(number))


def settle_dead_job(job_id: str, outcome: str, error: str) -> None:
    """Settle every still-running attempt of a job whose horse is gone, and free its lock.

    Runs in the worker's parent: any failure is logged and left to the reaper, because an
    exception here would make RQ's work loop quit.
    """
    try:
        _settle_dead_job(job_id, outcome, error)
    except Exception:
        logger.exception("could not record the end of job %s; the reaper will", job_id)


def _settle_dead_job(job_id: str, outcome: str, error: str) -> None:
    close_old_connections()
    running = StepAttempt.objects.filter(job_id=job_id, outcome=AttemptOutcome.RUNNING)
    for attempt in running.select_related("step"):
        settle_dead_attempt(attempt, Outcome(outcome, error=error))
