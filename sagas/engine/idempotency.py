"""Per-attempt claims: the first delivery of an attempt wins, duplicates are recognised."""

from __future__ import annotations

from django.conf import settings
from redis import Redis

from sagas.engine.connection import key
from sagas.states import AttemptKind


def idempotency_key(task_id: object, step_name: str, kind: str) -> str:
    """The stable key a step hands to the outside world (differs for the compensation)."""
    base = f"{task_id}:{step_name}"
    return f"{base}:compensate" if kind == AttemptKind.COMPENSATION else base


def claim_name(task_id: object, step_name: str, kind: str, attempt: int) -> str:
    """``{task_id}:{step}:{attempt}`` for actions, with ``:compensate`` for compensations."""
    return f"{idempotency_key(task_id, step_name, kind)}:{attempt}"


def claim(
    connection: Redis, name: str, owner: str, ttl_s: int | None = None, *, force: bool = False
) -> bool:
    """SET NX with a TTL: True for the first claimant of this attempt only.

    ``force`` takes over a claim the database shows to be orphaned.
    """
    ttl = ttl_s if ttl_s is not None else settings.SAGAS_IDEMPOTENCY_TTL
    return bool(connection.set(key("claim", name), owner, nx=not force, ex=ttl))
