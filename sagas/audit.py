"""Writing the append-only audit trail, and the one deliberate way to rewrite it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction

from sagas.states import AuditAction

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
    from django.db.backends.base.base import BaseDatabaseWrapper

    from sagas.models import AuditEntry, StepRecord, TaskInstance

__all__ = ["AuditAction", "actor_name", "record", "rewrite_allowed"]

SYSTEM_ACTOR = "system"
# Postgres session setting the append-only trigger checks (see migration 0002).
REWRITE_SETTING = "sagas.allow_audit_rewrite"


def actor_name(actor: AbstractBaseUser | AnonymousUser | None) -> str:
    """The name recorded for an actor: the username, or ``system`` for the engine."""
    if actor is None:
        return SYSTEM_ACTOR
    if not getattr(actor, "is_authenticated", False):
        raise ValueError("an anonymous user cannot act on a task; pass actor=None for the system")
    return str(actor.get_username())


def record(
    task: TaskInstance | None,
    action: str,
    *,
    actor: AbstractBaseUser | AnonymousUser | None = None,
    step: StepRecord | None = None,
    details: dict[str, Any] | None = None,
    from_status: str = "",
    to_status: str = "",
) -> AuditEntry:
    """Append one audit entry (call it inside the transaction that makes the change)."""
    from sagas.models import AuditEntry

    name = actor_name(actor)
    user: Any = actor
    return AuditEntry.objects.create(
        task=task,
        step=step,
        actor=user,
        actor_name=name,
        action=action,
        details=details or {},
        from_status=from_status,
        to_status=to_status,
    )


@contextmanager
def rewrite_allowed(using: str = "default") -> Iterator[None]:
    """Lift the append-only guard for one transaction: retention and test teardown only."""
    connection = connections[using]
    with transaction.atomic(using=using):
        _set_rewrite(connection, "on")
        yield
        # Inside an outer transaction the setting would outlive this block: switch it off.
        _set_rewrite(connection, "")


def _set_rewrite(connection: BaseDatabaseWrapper, value: str) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config(%s, %s, true)", [REWRITE_SETTING, value])
