from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sagas.definitions import RetryPolicy
from sagas.engine.retry import backoff_delay_ms, can_retry, scheduler_time, seconds_until


def delays(policy, count, rand=lambda: 0.5):
    return [backoff_delay_ms(policy, n, rand=rand) for n in range(1, count + 1)]


def test_exponential_follows_the_seed_figures():
    assert delays(RetryPolicy(max_retries=5, base_delay_ms=200), 5) == [200, 400, 800, 1600, 3200]


def test_linear_and_constant():
    assert delays(RetryPolicy(backoff="linear", base_delay_ms=200), 4) == [200, 400, 600, 800]
    assert delays(RetryPolicy(backoff="constant", base_delay_ms=1000), 3) == [1000] * 3
    assert delays(RetryPolicy(backoff="constant", base_delay_ms=0), 2) == [0, 0]


def test_cap_applies_after_growth():
    policy = RetryPolicy(base_delay_ms=200, max_delay_ms=1000)
    assert delays(policy, 5) == [200, 400, 800, 1000, 1000]


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 900), (0.5, 1000), (1.0, 1100)])
def test_jitter_is_a_symmetric_fraction(rand, expected):
    policy = RetryPolicy(backoff="constant", base_delay_ms=1000, jitter=0.1)
    assert backoff_delay_ms(policy, 1, rand=lambda: rand) == expected


def test_jitter_never_exceeds_the_cap():
    policy = RetryPolicy(backoff="constant", base_delay_ms=1000, jitter=0.5, max_delay_ms=1000)
    assert backoff_delay_ms(policy, 1, rand=lambda: 1.0) == 1000


def test_retry_numbers_start_at_one():
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_delay_ms(RetryPolicy(), 0)


def test_budget_counts_attempts_not_retries():
    policy = RetryPolicy(max_retries=2)
    assert [can_retry(policy, used) for used in range(5)] == [True, True, True, False, False]
    assert not can_retry(RetryPolicy(max_retries=0), 1)


def test_scheduler_time_rounds_up_to_the_next_second():
    exact = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    assert scheduler_time(exact) == exact
    assert scheduler_time(exact.replace(microsecond=1)) == exact.replace(second=6)
    assert scheduler_time(exact.replace(microsecond=999_999)) == exact.replace(second=6)


def test_seconds_until_rounds_up_and_never_goes_negative():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert seconds_until(now.replace(microsecond=200_000), now) == 1
    assert seconds_until(now.replace(second=3), now) == 3
    assert seconds_until(now.replace(hour=11), now) == 0
