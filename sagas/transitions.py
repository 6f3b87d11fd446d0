"""The one way a task's or a step's status changes: table check, fenced UPDATE, audit entry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from sagas import audit
from sagas.models import StepRecord, TaskInstance
from sagas.states import StepStatus, TaskStatus, can_transition_step, can_transition_task

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser


class IllegalTransition(ValueError):
    """The allowed-transitions table refuses this change: a programming error, not a race."""


def transition(
    task: TaskInstance,
    to: TaskStatus,
    *,
    action: str = audit.AuditAction.TRANSITION,
    actor: AbstractBaseUser | AnonymousUser | None = None,
    step: StepRecord | None = None,
    details: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
) -> bool:
    """Move ``task`` from the status and version it was read with to ``to``.

    Returns False when another writer changed the task first: re-read and decide again.
    ``fields`` are written in the same UPDATE. On success ``task`` is updated in memory.
    """
    if not can_transition_task(task.status, to):
        raise IllegalTransition(f"task {task.pk}: {task.status} -> {to} is not allowed")
    changes = {"updated_at": timezone.now(), **(fields or {})}
    with transaction.atomic():
        won = TaskInstance.objects.filter(
            pk=task.pk, status=task.status, version=task.version
        ).update(status=to, version=F("version") + 1, **changes)
        if not won:
            return False
        audit.record(
            task,
            action,
            actor=actor,
            step=step,
            details=details,
            from_status=task.status,
            to_status=to,
        )
    _apply(task, status=to, version=task.version + 1, **changes)
    return True


def transition_step(
    step: StepRecord,
    to: StepStatus,
    *,
    fields: dict[str, Any] | None = None,
) -> bool:
    """Fenced status change of one step; returns False if another writer got there first."""
    if not can_transition_step(step.status, to):
        raise IllegalTransition(
            f"step {step.pk} ({step.name}): {step.status} -> {to} is not allowed"
        )
    changes = dict(fields or {})
    won = StepRecord.objects.filter(pk=step.pk, status=step.status, version=step.version).update(
        status=to, version=F("version") + 1, **changes
    )
    if won:
        _apply(step, status=to, version=step.version + 1, **changes)
    return bool(won)


def _apply(obj: TaskInstance | StepRecord, **values: Any) -> None:
    for name, value in values.items():
        if not hasattr(value, "resolve_expression"):
            setattr(obj, name, value)
