"""The Redis connection and queue the engine uses (django-rq's ``default`` queue)."""

from __future__ import annotations

from typing import Any

import django_rq
from redis import Redis

QUEUE_NAME = "default"
KEY_PREFIX = "sagas:"


def redis() -> Redis:
    """A client for the engine's Redis (the one behind the ``default`` queue)."""
    connection: Redis = django_rq.get_connection(QUEUE_NAME)
    return connection


def queue() -> Any:
    """The RQ queue that carries step jobs."""
    return django_rq.get_queue(QUEUE_NAME)


def key(*parts: object) -> str:
    """A namespaced Redis key: ``sagas:<part>:<part>...``."""
    return KEY_PREFIX + ":".join(str(p) for p in parts)
