"""Per-task locks in Redis: SET NX PX with a random token, compare-and-delete release.

A lock has a scope: the whole task for sequential steps, or one branch step when a
group's branches run concurrently, so branches never serialise on the task lock. The
database, not the lock, decides whose result counts (attempt id + token fence writes).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator

from redis import Redis

from sagas.engine.connection import key

logger = logging.getLogger("sagas.engine")

# Delete or extend only if the caller still holds the lock.
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)


def lock_key(task_id: object, scope: str = "") -> str:
    return key("lock", task_id, scope) if scope else key("lock", task_id)


LOCK_PREFIX = lock_key("")


def task_of_lock(name: str) -> str:
    """The task id a lock key names (a branch lock's scope follows it after a colon)."""
    return name[len(LOCK_PREFIX) :].split(":", 1)[0]


def lock_names(connection: Redis, batch: int = 500) -> Iterator[str]:
    """Every task lock's key, by SCAN (never KEYS), ``batch`` keys per round trip."""
    for found in connection.scan_iter(match=LOCK_PREFIX + "*", _type="STRING", count=batch):
        yield found.decode() if isinstance(found, bytes) else found


class Lease:
    """A Redis key one holder owns until it expires or is released: SET NX PX with a random
    token; renew and release only while the token is still ours."""

    def __init__(self, connection: Redis, key_name: str, expiry_s: float, token: str = "") -> None:
        self.connection = connection
        self.key = key_name
        self.expiry_ms = max(1, int(expiry_s * 1000))
        self.token = token or secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self.connection.set(self.key, self.token, nx=True, px=self.expiry_ms))

    def renew(self) -> bool:
        """Extend the expiry; False means the lease was lost (expired or taken over)."""
        return bool(self.connection.eval(_RENEW, 1, self.key, self.token, self.expiry_ms))

    def release(self) -> bool:
        return bool(self.connection.eval(_RELEASE, 1, self.key, self.token))

    def holder(self) -> str | None:
        value = self.connection.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


class TaskLock(Lease):
    """One holder at a time for a task (or one branch of it); expires unless renewed."""

    def __init__(
        self, connection: Redis, task_id: object, expiry_s: float, scope: str = ""
    ) -> None:
        super().__init__(connection, lock_key(task_id, scope), expiry_s)


def release_if_held_by(connection: Redis, lock_key_name: str, token: str) -> bool:
    """Release a lock on behalf of a dead holder whose token we know (the reaper)."""
    return bool(connection.eval(_RELEASE, 1, lock_key_name, token))


class Heartbeat:
    """Calls ``beat`` every ``interval_s`` on a daemon thread until stopped, then ``on_exit``."""

    def __init__(
        self, interval_s: float, beat: Callable[[], None], on_exit: Callable[[], None] | None = None
    ) -> None:
        self.interval_s = interval_s
        self.beat = beat
        self.on_exit = on_exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saga-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.beat()
                except Exception:  # one bad beat must not end the heartbeat for good
                    logger.exception("heartbeat failed; trying again at the next beat")
        finally:
            if self.on_exit is not None:
                self.on_exit()
