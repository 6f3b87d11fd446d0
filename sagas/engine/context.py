"""``ctx``: what a step body sees of its task, and how it reports progress or cancellation."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, close_old_connections
from redis import Redis
from redis.exceptions import RedisError

from sagas.engine.stopping import AttemptAddress, signalled_at
from sagas.models import StepAttempt, StepRecord
from sagas.states import AttemptOutcome


class StepCancelled(Exception):
    """Raised by ``ctx.raise_if_cancelled()`` when the task or this attempt was cancelled."""


@dataclass
class StepContext:
    task_id: str
    step_name: str
    kind: str
    attempt: int
    attempt_id: int
    input: dict[str, Any]
    results: dict[str, Any]
    idempotency_key: str
    trace_id: str
    correlation_id: str
    data: Any = None
    logger: logging.LoggerAdapter[logging.Logger] | logging.Logger | None = None
    _redis: Redis | None = field(default=None, repr=False)
    # Set by this attempt's own heartbeat when the reaper declared it lost: no Redis needed.
    stop_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """Whether this attempt (or, for an action, its task) was asked to stop.

        At most one Redis round trip. A compensation ignores its task's cancellation: it is
        the undo that cancellation asked for.
        """
        if self.stop_requested.is_set():
            return True
        if self._redis is None:
            return False
        address = AttemptAddress(self.task_id, self.step_name, self.kind, self.attempt)
        try:
            return signalled_at(self._redis, address) is not None
        except RedisError:
            return False  # Redis down: keep working; the database still decides the outcome.

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise StepCancelled(f"task {self.task_id} was cancelled")

    def progress(self, percent: int, message: str = "") -> None:
        """Record progress (0-100) for the console; ignored once this attempt is superseded."""
        percent = max(0, min(100, int(percent)))
        # One statement: the step's row, only while this attempt is still the running one.
        current = StepAttempt.objects.filter(pk=self.attempt_id, outcome=AttemptOutcome.RUNNING)
        try:
            StepRecord.objects.filter(
                task__pk=self.task_id, name=self.step_name, pk__in=current.values("step_id")
            ).update(progress=percent, progress_message=message[:300])
        except DatabaseError:
            # Progress is for the console: a database blip must not fail the step's work.
            log = self.logger or logging.getLogger("sagas.engine")
            log.warning("progress not recorded (database unreachable)", exc_info=True)
            close_old_connections()  # a broken connection is reopened by the next query
