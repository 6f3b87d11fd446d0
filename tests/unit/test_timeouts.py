from __future__ import annotations

import signal
import time

import pytest

from sagas.engine.timeouts import StepTimedOut, exceeded, step_deadline


def test_a_slow_body_is_interrupted():
    started = time.monotonic()
    with pytest.raises(StepTimedOut, match=r"timeout of 0\.2 s"), step_deadline(0.2):
        time.sleep(5)
    assert time.monotonic() - started < 2


def test_a_body_that_swallows_exceptions_cannot_swallow_the_timeout():
    def stubborn():
        while True:
            try:
                time.sleep(5)
            except Exception:  # the kind of code we must survive
                continue

    with pytest.raises(StepTimedOut), step_deadline(0.1):
        stubborn()


def test_a_body_that_swallows_even_the_timeout_is_interrupted_again():
    swallowed = 0
    with pytest.raises(StepTimedOut), step_deadline(0.1):
        while True:
            try:
                time.sleep(5)
            except BaseException:
                swallowed += 1
                if swallowed > 1:
                    raise
    assert swallowed == 2


def test_a_fast_body_is_untouched_and_the_outer_alarm_is_restored():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with step_deadline(5):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 0.5
        time.sleep(0.7)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_no_timeout_means_no_alarm():
    with step_deadline(None):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_exceeded():
    assert exceeded(1, 1.5)
    assert not exceeded(1, 0.5)
    assert not exceeded(None, 100)
