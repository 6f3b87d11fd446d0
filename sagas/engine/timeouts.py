"""Step timeouts enforced around the step body only, with SIGALRM in the job's main thread.

The timeout is a ``BaseException`` so ``except Exception`` in a step body cannot swallow it,
and it is raised again every second until the body gives up; a body that still returns
late is recorded as timed out all the same (``exceeded``). RQ's own job timeout, which is
larger, is suspended while the body runs and re-armed afterwards, so the engine's
bookkeeping is never cut off. A body blocked inside C code that never returns to Python
is stopped by the forking worker's parent once the RQ job timeout passes.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

REPEAT_S = 1.0


class StepTimedOut(BaseException):
    """The step body ran past its ``timeout_s``."""


@contextmanager
def step_deadline(seconds: float | None) -> Iterator[None]:
    """Raise ``StepTimedOut`` in the body once ``seconds`` have passed (no-op if None)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise StepTimedOut(f"step exceeded its timeout of {seconds:g} s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_S)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        _rearm(previous_delay, time.monotonic() - started)


def _rearm(previous_delay: float, elapsed: float) -> None:
    if previous_delay:
        signal.setitimer(signal.ITIMER_REAL, max(previous_delay - elapsed, 0.001))


def exceeded(seconds: float | None, elapsed: float) -> bool:
    """Whether a body that returned took longer than its timeout."""
    return bool(seconds) and elapsed > float(seconds or 0)
