"""Who may stop a work horse, and when: a stop never cuts a settle in half.

RQ's stop-job (and a cold shutdown, and its own job timeout) kill the work horse
outright. Killed while it records how its step ended, a horse would lose a result whose
side effect already happened. So the horse says, in memory it shares with its parent
(created before the fork), when its body has returned and it is settling; the parent
defers a stop until the settle is done. The check and the switch happen under one lock,
so either the stop wins (and the body's late return is dropped, as if it had been
stopped a moment earlier) or the settle does (and the stop waits for it).
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

RUNNING, SETTLING, SETTLED, STOPPING = 0, 1, 2, 3
LOCK_TIMEOUT_S = 1.0


class StopGuard:
    """One byte of shared state and its lock, inherited by the forked horse."""

    def __init__(self) -> None:
        self._phase: Any = multiprocessing.Value("b", RUNNING)

    def reset(self) -> None:
        """Parent, before each fork: a new body is about to run."""
        with self._phase.get_lock():
            self._phase.value = RUNNING

    def begin_settle(self) -> bool:
        """Horse, once the body has returned: False if the parent already decided to stop it."""
        if not self._phase.get_lock().acquire(timeout=LOCK_TIMEOUT_S):
            return True  # the parent died holding it: nobody is going to stop us
        try:
            if self._phase.value == STOPPING:
                return False
            self._phase.value = SETTLING
            return True
        finally:
            self._phase.get_lock().release()

    def end_settle(self) -> None:
        """Horse: the outcome is in the database; a stop is harmless from here on."""
        with self._phase.get_lock():
            self._phase.value = SETTLED

    def settled(self) -> bool:
        """Parent: the horse has recorded its outcome (a deferred stop is moot)."""
        return bool(self._phase.value == SETTLED)

    def may_stop(self) -> bool:
        """Parent, about to kill the horse: False while it settles (try again later)."""
        if not self._phase.get_lock().acquire(timeout=LOCK_TIMEOUT_S):
            return False  # the horse holds it for a moment: try again at the next tick
        try:
            if self._phase.value == SETTLING:
                return False
            if self._phase.value == RUNNING:
                self._phase.value = STOPPING
            return True
        finally:
            self._phase.get_lock().release()


class _NoGuard:
    """In-process workers (SimpleWorker, tests) have no parent that could kill them."""

    def begin_settle(self) -> bool:
        return True

    def end_settle(self) -> None:
        return None


_current: StopGuard | _NoGuard = _NoGuard()


def install(guard: StopGuard) -> None:
    """Parent, before forking: the horse inherits this guard."""
    global _current
    _current = guard


def current() -> StopGuard | _NoGuard:
    return _current


def wait_to_be_stopped(longest_s: float = 30) -> None:
    """Horse: the parent is stopping us; its kill arrives in a moment (the parent, not
    the horse, records the stopped attempt)."""
    time.sleep(longest_s)
