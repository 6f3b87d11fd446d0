"""The worker class (django-rq ``WORKER_CLASS``): fork hygiene, stops that never cut a
settle in half, bookkeeping for horses that died or were stopped, and the reaper's cadence.

The pinned command stays ``python manage.py rqworker --with-scheduler default``.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections
from redis.exceptions import RedisError
from rq.worker import SimpleWorker, Worker

from sagas.engine import horse, reaper, stopping
from sagas.engine.decisions import Outcome
from sagas.engine.executor import settle_dead_attempt
from sagas.models import StepAttempt
from sagas.states import AttemptOutcome

logger = logging.getLogger("sagas.engine")

MONITOR_INTERVAL_S = 1
REDIS_WAIT_MAX_S = 30
STOPPED = "step stopped by RQ's stop-job"


class ReaperMixin:
    """Enqueues a reaper pass from the worker's loop, at most once per interval fleet-wide."""

    _last_reaper_check: float = 0.0

    @property
    def dequeue_timeout(self) -> int:
        # Wake up from the blocking dequeue often enough to keep the reaper's cadence.
        inherited: int = super().dequeue_timeout  # type: ignore[misc]
        return max(1, min(inherited, settings.SAGAS_REAPER_INTERVAL))

    def _reaper_due(self) -> bool:
        return time.monotonic() - self._last_reaper_check >= settings.SAGAS_REAPER_INTERVAL

    @property
    def should_run_maintenance_tasks(self) -> bool:
        return bool(super().should_run_maintenance_tasks) or self._reaper_due()  # type: ignore[misc]

    def run_maintenance_tasks(self) -> None:
        if self._reaper_due():
            self._last_reaper_check = time.monotonic()
            try:
                reaper.schedule_pass()
                reaper.schedule_reconciliation()
                self._revive_scheduler()
            except RedisError as exc:  # the dequeue loop reports Redis trouble on its own
                logger.warning("could not schedule a reaper pass: %s", exc)
        if super().should_run_maintenance_tasks:  # type: ignore[misc]
            try:
                super().run_maintenance_tasks()  # type: ignore[misc]
            except RedisError as exc:  # a Redis blip must not end the worker: try next time
                logger.warning("RQ maintenance skipped: %s", exc)

    def _revive_scheduler(self) -> None:
        """RQ restarts a scheduler process that died (it does on a Redis outage) only every
        ten minutes; every scheduled retry would wait that long. Restart it now."""
        scheduler = getattr(self, "scheduler", None)
        process = getattr(scheduler, "_process", None)
        if scheduler is not None and process is not None and not process.is_alive():
            logger.warning("the RQ scheduler process had died; restarting it")
            scheduler.acquire_locks(auto_start=True)


class SagaWorker(ReaperMixin, Worker):
    """A forking worker: each step runs in a work horse with fresh database connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The parent looks at its running job this often (heartbeat, cancellation grace).
        kwargs.setdefault("job_monitoring_interval", MONITOR_INTERVAL_S)
        super().__init__(*args, **kwargs)
        self._guard = horse.StopGuard()
        self._deferred_stop: signal.Signals | None = None

    # --- forking and stopping ---------------------------------------------------------------

    def fork_work_horse(self, job: Any, queue: Any) -> None:
        # A forked horse must never share the parent's database sockets.
        connections.close_all()
        self._guard.reset()
        horse.install(self._guard)
        super().fork_work_horse(job, queue)

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Every stop (stop-job, cold shutdown, RQ's job timeout) waits while the horse
        records its outcome: a body that returned is settled as what it returned."""
        if self.horse_pid and not self._guard.may_stop():
            if self._deferred_stop is None:
                logger.warning("stop of horse %s deferred: it is settling its step", self.horse_pid)
            self._deferred_stop = sig
            return
        self._deferred_stop = None
        super().kill_horse(sig)

    def execute_job(self, job: Any, queue: Any) -> None:
        self._stopped_job_id = None
        self._deferred_stop = None
        try:
            super().execute_job(job, queue)
        except RedisError as exc:
            # Redis went away around the horse's end: the database still gets its outcome.
            logger.warning("Redis unreachable while job %s ended: %s", job.id, exc)
            if self.horse_pid:
                self.wait_for_horse()
                self._horse_pid = 0
            settle_dead_job(
                self.name,
                job.id,
                AttemptOutcome.LOST,
                f"work horse ended while Redis was down ({exc})",
            )

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        try:
            super().maintain_heartbeats(job, execution)
        except RedisError as exc:  # a Redis blip must not end the worker mid-step
            logger.warning("worker heartbeat not written: %s", exc)
        if self._deferred_stop is not None:
            if self._guard.settled():
                self._deferred_stop = None  # its outcome is recorded: nothing left to stop
            else:
                self.kill_horse(self._deferred_stop)
        elif self._grace_expired(job):
            # The step ignored its stop for the whole grace period: stop it ourselves, with
            # no round trip through the job hash (Redis may have lost it).
            logger.warning("stopping job %s: it ignored its stop past the grace period", job.id)
            self._stopped_job_id = job.id
            self.kill_horse()

    def _grace_expired(self, job: Any) -> bool:
        address = attempt_address(job)
        if address is None or self._stopped_job_id == job.id:
            return False
        try:
            return stopping.grace_expired(self.connection, address)
        except RedisError:
            return False

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> Any:
        """RQ retries a lost Redis inside its dequeue, but not the bookkeeping around it:
        wait for Redis with backoff instead of ending the worker."""
        wait = 1.0
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except RedisError as exc:
                logger.warning("Redis unreachable (%s); trying again in %.0f s", exc, wait)
                time.sleep(wait)
                wait = min(wait * 2, REDIS_WAIT_MAX_S)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except RedisError as exc:  # the dequeue that follows waits for Redis with backoff
            logger.warning("could not check for suspension: %s", exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        try:
            super().heartbeat(timeout)
        except RedisError as exc:  # the dequeue loop retries Redis with backoff on its own
            logger.warning("worker heartbeat not written: %s", exc)

    # --- horses that did not settle themselves ----------------------------------------------

    def handle_work_horse_killed(self, job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[no-untyped-call]
        settle_dead_job(self.name, job.id, AttemptOutcome.LOST, f"work horse died ({ret_val})")

    def monitor_work_horse(self, job: Any, queue: Any, execution: Any) -> None:
        super().monitor_work_horse(job, queue, execution)
        if self._stopped_job_id == job.id:
            # RQ skips its stopped-job handling when the job hash is gone (a flushed
            # Redis): record the stop anyway (nothing happens if it was recorded).
            settle_dead_job(self.name, job.id, AttemptOutcome.CANCELLED, STOPPED)

    def _handle_stopped_job(self, job: Any, queue: Any, execution: Any) -> None:
        # stop-job killed the horse outright: no finally ran there, so the parent records
        # it. Stopped by a cancel it counts as cancelled; stopped by anyone else, as a
        # failed attempt that follows the retry policy (decisions.classify).
        settle_dead_job(self.name, job.id, AttemptOutcome.CANCELLED, STOPPED)
        super()._handle_stopped_job(job, queue, execution)


class SagaSimpleWorker(ReaperMixin, SimpleWorker):
    """Runs steps in the worker process itself (tests, debugging)."""


def attempt_address(job: Any) -> stopping.AttemptAddress | None:
    """The attempt a step job runs, from its arguments (None for other jobs)."""
    if not str(getattr(job, "func_name", "")).endswith("executor.run_step"):
        return None
    task_id, step_name, kind, number = job.args[:4]
    return stopping.AttemptAddress(str(task_id), step_name, kind, int(number))


def settle_dead_job(worker: str, job_id: str, outcome: str, error: str) -> None:
    """Settle every still-running attempt of a job whose horse is gone, and free its lock.

    Runs in the worker's parent: any failure is logged and left to the reaper, because an
    exception here would make RQ's work loop quit.
    """
    try:
        close_old_connections()
        running = StepAttempt.objects.filter(
            job_id=job_id, worker=worker[:200], outcome=AttemptOutcome.RUNNING
        )
        for attempt in running.select_related("step"):
            settle_dead_attempt(attempt, Outcome(outcome, error=error))
    except Exception:
        logger.exception("could not record the end of job %s; the reaper will", job_id)
