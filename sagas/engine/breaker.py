"""Circuit breakers shared by every worker: counters and open-until in Redis, by name.

closed -> open after ``failure_threshold`` consecutive failures -> after ``open_seconds``
one trial is let through (half-open) -> closed on its success, open again on its failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis

from sagas.definitions import CircuitBreakerPolicy
from sagas.engine.connection import key

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerState:
    failures: int = 0
    open_until: float = 0.0

    def status(self, now: float) -> str:
        if not self.open_until:
            return CLOSED
        return OPEN if now < self.open_until else HALF_OPEN


@dataclass(frozen=True)
class Admission:
    """Whether a step may be attempted now; if not, when to come back."""

    allowed: bool
    trial: bool = False
    retry_at: float = 0.0


def admit(
    state: BreakerState, now: float, trial_won: bool, policy: CircuitBreakerPolicy
) -> Admission:
    """Pure decision: closed admits, open defers to its end, half-open admits one trial."""
    status = state.status(now)
    if status == CLOSED:
        return Admission(True)
    if status == OPEN:
        return Admission(False, retry_at=state.open_until)
    if trial_won:
        return Admission(True, trial=True)
    # Someone else's trial is in flight: come back when it must have been decided.
    return Admission(False, retry_at=now + policy.open_seconds)


_RECORD_FAILURE = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if ARGV[1] == '1' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[3], 'failures', 0)
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


def _parse(raw: Mapping[Any, Any]) -> BreakerState:
    return BreakerState(int(raw.get(b"failures", 0)), float(raw.get(b"open_until", 0)))


def all_states(connection: Redis, declared: Iterable[str] = ()) -> dict[str, BreakerState]:
    """The state of every breaker: those ``declared`` and any found in Redis (a removed
    step's), in one SCAN and one pipelined read."""
    prefix = key("breaker", "")
    names = set(declared)
    for found in connection.scan_iter(match=prefix + "*", _type="HASH", count=200):
        names.add(found.decode()[len(prefix) :])
    ordered = sorted(names)
    pipe = connection.pipeline(transaction=False)
    for name in ordered:
        pipe.hgetall(key("breaker", name))
    return {name: _parse(raw) for name, raw in zip(ordered, pipe.execute(), strict=True)}


class CircuitBreaker:
    """Redis I/O around the pure decisions above."""

    def __init__(self, connection: Redis, policy: CircuitBreakerPolicy) -> None:
        self.connection = connection
        self.policy = policy
        self.key = key("breaker", policy.name)
        self.trial_key = key("breaker", policy.name, "trial")

    def state(self) -> BreakerState:
        return _parse(self.connection.hgetall(self.key))

    def admit(self, now: float | None = None) -> Admission:
        now = time.time() if now is None else now
        state = self.state()
        trial_won = state.status(now) == HALF_OPEN and self._take_trial()
        return admit(state, now, trial_won, self.policy)

    def _take_trial(self) -> bool:
        ttl_ms = self.policy.open_seconds * 1000
        return bool(self.connection.set(self.trial_key, "1", nx=True, px=ttl_ms))

    def record_success(self) -> None:
        self.connection.delete(self.key, self.trial_key)

    def record_failure(self, trial: bool, now: float | None = None) -> bool:
        """Count a failure; True if this failure opened the breaker."""
        now = time.time() if now is None else now
        opened = self.connection.eval(
            _RECORD_FAILURE,
            2,
            self.key,
            self.trial_key,
            "1" if trial else "0",
            self.policy.failure_threshold,
            now + self.policy.open_seconds,
        )
        return bool(opened)

    def reset(self) -> None:
        """Close the breaker by hand (operators)."""
        self.connection.delete(self.key, self.trial_key)
