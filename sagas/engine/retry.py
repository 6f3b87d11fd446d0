"""Backoff maths: pure functions of the policy and the retry number, no I/O."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from sagas.definitions import RetryPolicy


def backoff_delay_ms(
    policy: RetryPolicy, retry_number: int, *, rand: Callable[[], float] = random.random
) -> int:
    """Delay before retry ``retry_number`` (1 = the first retry, after attempt 1 failed)."""
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    delay = float(_raw_delay_ms(policy, retry_number))
    if policy.jitter:
        delay *= 1 + policy.jitter * (2 * rand() - 1)
    if policy.max_delay_ms is not None:
        delay = min(delay, policy.max_delay_ms)
    return max(0, round(delay))


def _raw_delay_ms(policy: RetryPolicy, n: int) -> int:
    if policy.backoff == "exponential":
        return int(policy.base_delay_ms * 2 ** (n - 1))
    if policy.backoff == "linear":
        return policy.base_delay_ms * n
    return policy.base_delay_ms


def can_retry(policy: RetryPolicy, attempts_used: int) -> bool:
    """Whether another attempt fits the budget (``max_retries=N`` allows N+1 attempts)."""
    return attempts_used < policy.max_attempts


def scheduler_time(intended: datetime) -> datetime:
    """RQ's scheduler has 1 s resolution: round up to the next whole second, never early."""
    if intended.microsecond == 0:
        return intended
    return intended.replace(microsecond=0) + timedelta(seconds=1)


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment`` rounded up (0 if it is already due)."""
    return max(0, math.ceil((moment - now).total_seconds()))
