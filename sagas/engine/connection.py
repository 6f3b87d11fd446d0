"""The engine's Redis client and queue: one of each per process, rebuilt after a fork.

Building a client per call opened a TCP connection per call and repeated RQ's server
version check on every enqueue (RQ caches it on the client). A forked work horse must
not share its parent's sockets, so the cache is keyed by process id.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import django_rq
from django.conf import settings
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

QUEUE_NAME = "default"
KEY_PREFIX = "sagas:"
# An unreachable Redis must fail fast (the engine logs and leaves the work to the
# reaper), not hang a step's bookkeeping.
CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 10
HEALTH_CHECK_INTERVAL_S = 30
# Ride over a blip of a fraction of a second, but never make a step's ``ctx.cancelled``
# (called in loops) wait seconds for a Redis that is down: the engine copes without it.
RETRIES = 2
RETRY_BACKOFF = ExponentialBackoff(cap=0.2, base=0.05)

_lock = threading.Lock()
_cache: dict[tuple[int, str], tuple[Redis, Any]] = {}


def _url() -> str:
    return str(settings.RQ_QUEUES[QUEUE_NAME]["URL"])


def _client_and_queue() -> tuple[Redis, Any]:
    key = (os.getpid(), _url())
    cached = _cache.get(key)
    if cached is not None:
        return cached
    with _lock:
        if key not in _cache:
            for stale in [k for k in _cache if k[0] != key[0]]:
                del _cache[stale]  # the parent's, inherited through fork: never used here
            client = Redis.from_url(
                key[1],
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                retry=Retry(RETRY_BACKOFF, RETRIES),
            )
            _cache[key] = (client, django_rq.get_queue(QUEUE_NAME, connection=client))
        return _cache[key]


def redis() -> Redis:
    """This process's client for the engine's Redis (the one behind the ``default`` queue)."""
    return _client_and_queue()[0]


def queue() -> Any:
    """This process's RQ queue that carries step jobs."""
    return _client_and_queue()[1]


def key(*parts: object) -> str:
    """A namespaced Redis key: ``sagas:<part>:<part>...``."""
    return KEY_PREFIX + ":".join(str(p) for p in parts)
