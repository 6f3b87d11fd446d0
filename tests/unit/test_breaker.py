"""Circuit breakers: the pure admission rule, and the shared state in a real Redis."""

from __future__ import annotations

import pytest

from sagas.definitions import CircuitBreakerPolicy
from sagas.engine.breaker import CLOSED, HALF_OPEN, OPEN, Admission, BreakerState, admit

POLICY = CircuitBreakerPolicy("payments", failure_threshold=3, open_seconds=30)


def test_a_breaker_is_closed_open_until_its_time_then_half_open():
    assert BreakerState().status(100.0) == CLOSED
    assert BreakerState(failures=2).status(100.0) == CLOSED
    assert BreakerState(open_until=130.0).status(129.9) == OPEN
    assert BreakerState(open_until=130.0).status(130.0) == HALF_OPEN
    assert BreakerState(open_until=130.0).status(500.0) == HALF_OPEN


def test_closed_admits_open_defers_to_its_end_half_open_admits_one_trial():
    assert admit(BreakerState(), 100.0, False, POLICY) == Admission(True)
    assert admit(BreakerState(open_until=130.0), 100.0, False, POLICY) == Admission(
        False, retry_at=130.0
    )
    assert admit(BreakerState(open_until=90.0), 100.0, True, POLICY) == Admission(True, trial=True)
    # Someone else's trial is in flight: come back when it must have been decided.
    assert admit(BreakerState(open_until=90.0), 100.0, False, POLICY) == Admission(
        False, retry_at=130.0
    )


@pytest.mark.django_db
def test_failures_open_the_breaker_for_every_worker_and_a_failed_trial_reopens_it():
    from sagas.engine.breaker import CircuitBreaker
    from sagas.engine.connection import redis

    redis().flushdb()
    one, other = CircuitBreaker(redis(), POLICY), CircuitBreaker(redis(), POLICY)
    assert one.record_failure(trial=False, now=1000.0) is False
    assert one.record_failure(trial=False, now=1001.0) is False
    assert other.state() == BreakerState(failures=2)
    assert other.record_failure(trial=False, now=1002.0) is True  # the third opens it
    assert one.state() == BreakerState(failures=0, open_until=1032.0)
    assert other.admit(now=1010.0) == Admission(False, retry_at=1032.0)
    trial = one.admit(now=1040.0)
    assert trial == Admission(True, trial=True)
    assert other.admit(now=1040.0) == Admission(False, retry_at=1070.0)  # one trial only
    assert one.record_failure(trial=True, now=1041.0) is True  # a failed trial reopens it
    assert other.state().status(1050.0) == OPEN
    one.record_success()
    assert other.state() == BreakerState()
    other.record_failure(trial=False, now=1100.0)
    other.reset()
    assert one.state() == BreakerState()
    redis().flushdb()
