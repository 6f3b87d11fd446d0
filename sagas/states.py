"""Statuses and the allowed-transitions tables: pure, importable without configured settings."""

from __future__ import annotations

from collections.abc import Mapping

from django.db.models import TextChoices


class TaskStatus(TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_RETRY = "waiting_retry"
    COMPENSATING = "compensating"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"
    COMPENSATION_FAILED = "compensation_failed"
    DEAD_LETTERED = "dead_lettered"
    RESOLVED = "resolved"


class StepStatus(TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_RETRY = "waiting_retry"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


class AttemptKind(TextChoices):
    ACTION = "action"
    COMPENSATION = "compensation"


class AttemptOutcome(TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"


class CompensationReason(TextChoices):
    FAILURE = "failure"
    CANCEL = "cancel"


_T = TaskStatus
TASK_TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    # pending -> waiting_retry: the first step met an open breaker before any attempt.
    # pending -> compensating / failed: a first group timed out before any branch ran.
    _T.PENDING: frozenset(
        {
            _T.RUNNING,
            _T.WAITING_RETRY,
            _T.COMPENSATING,
            _T.FAILED,
            _T.CANCELLED,
            _T.CANCELLING,
            _T.DEAD_LETTERED,
        }
    ),
    _T.RUNNING: frozenset(
        {
            _T.WAITING_RETRY,
            _T.COMPLETED,
            _T.COMPENSATING,
            _T.FAILED,
            _T.DEAD_LETTERED,
            _T.CANCELLING,
        }
    ),
    _T.WAITING_RETRY: frozenset(
        {
            _T.RUNNING,
            _T.COMPENSATING,
            _T.FAILED,
            _T.DEAD_LETTERED,
            _T.CANCELLING,
            _T.CANCELLED,
        }
    ),
    _T.COMPENSATING: frozenset({_T.COMPENSATED, _T.COMPENSATION_FAILED}),
    # Nothing left to stop or undo (e.g. no step had succeeded) ends straight in cancelled.
    _T.CANCELLING: frozenset({_T.CANCELLED, _T.COMPENSATION_FAILED}),
    # retry_compensation resumes the undo it was doing: compensating or cancelling.
    _T.COMPENSATION_FAILED: frozenset({_T.COMPENSATING, _T.CANCELLING, _T.RESOLVED}),
    # redrive retries the failed step; cancel compensates; resolve closes it by hand.
    _T.DEAD_LETTERED: frozenset({_T.RUNNING, _T.CANCELLING, _T.CANCELLED, _T.RESOLVED}),
    _T.FAILED: frozenset({_T.RESOLVED}),
    _T.COMPLETED: frozenset(),
    _T.COMPENSATED: frozenset(),
    _T.CANCELLED: frozenset(),
    _T.RESOLVED: frozenset(),
}

_S = StepStatus
STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    # pending -> waiting_retry: an open breaker deferred the first attempt.
    _S.PENDING: frozenset({_S.RUNNING, _S.WAITING_RETRY, _S.SKIPPED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.WAITING_RETRY, _S.CANCELLED}),
    _S.WAITING_RETRY: frozenset({_S.RUNNING, _S.FAILED, _S.SKIPPED, _S.CANCELLED}),
    _S.SUCCEEDED: frozenset({_S.COMPENSATING}),
    # failed -> pending: a redrive gives the step a fresh retry budget.
    _S.FAILED: frozenset({_S.PENDING}),
    _S.COMPENSATING: frozenset({_S.COMPENSATED, _S.COMPENSATION_FAILED}),
    _S.COMPENSATION_FAILED: frozenset({_S.COMPENSATING}),
    _S.SKIPPED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.COMPENSATED: frozenset(),
}

TERMINAL_TASK_STATUSES = frozenset(s for s, targets in TASK_TRANSITIONS.items() if not targets)
# Statuses in which the engine still has work to do for a task.
ACTIVE_TASK_STATUSES = frozenset(
    {_T.PENDING, _T.RUNNING, _T.WAITING_RETRY, _T.COMPENSATING, _T.CANCELLING}
)
# Statuses that wait for an operator.
PARKED_TASK_STATUSES = frozenset({_T.COMPENSATION_FAILED, _T.DEAD_LETTERED, _T.FAILED})


def can_transition_task(current: str, target: str) -> bool:
    """Whether the task table allows ``current -> target``."""
    return TaskStatus(target) in TASK_TRANSITIONS[TaskStatus(current)]


def can_transition_step(current: str, target: str) -> bool:
    """Whether the step table allows ``current -> target``."""
    return StepStatus(target) in STEP_TRANSITIONS[StepStatus(current)]


class AuditAction(TextChoices):
    """What an audit entry records (``AuditEntry.action``)."""

    STARTED = "started"
    TRANSITION = "transition"
    STEP_STARTED = "step_started"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_FAILED = "step_failed"
    RETRY_SCHEDULED = "retry_scheduled"
    BREAKER_OPEN = "breaker_open"
    DUPLICATE_DELIVERY = "duplicate_delivery"
    LOCK_BUSY = "lock_busy"
    CODE_MISSING = "code_missing"
    ATTEMPT_LOST = "attempt_lost"
    COMPENSATION_STARTED = "compensation_started"
    STEP_COMPENSATED = "step_compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    DEAD_LETTERED = "dead_lettered"
    RESOLVED = "resolved"
    REDRIVEN = "redriven"
    COMPENSATION_RETRIED = "compensation_retried"
    ORPHAN_DELETED = "orphan_deleted"
    ORPHAN_ARCHIVED = "orphan_archived"
    FINDING_IGNORED = "finding_ignored"
    FINDING_RESOLVED = "finding_resolved"
    FINDING_REOPENED = "finding_reopened"
    BREAKER_RESET = "breaker_reset"
    LOCK_RELEASED = "lock_released"
    TASK_REQUEUED = "task_requeued"
