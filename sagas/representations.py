"""Tasks, steps and attempts as the HTTP API shows them (shapes pinned in docs/design.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sagas.models import StepAttempt, StepRecord, TaskInstance


def task_summary(task: TaskInstance) -> dict[str, Any]:
    """A task in a list: everything but its input and steps."""
    return {
        "id": str(task.pk),
        "saga": task.saga,
        "status": task.status,
        "business_key": task.business_key,
        "correlation_id": task.correlation_id,
        "trace_id": task.trace_id,
        "current_step": task.current_step,
        "error_summary": task.error_summary,
        "compensation_reason": task.compensation_reason or None,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "cancel_requested_at": task.cancel_requested_at,
        "cancelled_at": task.cancelled_at,
    }


def task_detail(task: TaskInstance, steps: Iterable[StepRecord]) -> dict[str, Any]:
    """A task with its input, its steps and each step's attempts."""
    return {**task_summary(task), "input": task.input, "steps": [step_detail(s) for s in steps]}


def step_detail(step: StepRecord) -> dict[str, Any]:
    return {
        "name": step.name,
        "index": step.index,
        "status": step.status,
        "group": step.group or None,
        "critical": step.critical,
        "attempt_count": step.attempt_count,
        "compensation_attempt_count": step.compensation_attempt_count,
        "data": step.data,
        "error": step.error,
        "compensation_error": step.compensation_error,
        "progress": step.progress,
        "progress_message": step.progress_message,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "next_attempt_at": step.next_attempt_at,
        "attempts": [attempt_detail(a) for a in step.attempts.all()],
    }


def attempt_detail(attempt: StepAttempt) -> dict[str, Any]:
    return {
        "kind": attempt.kind,
        "number": attempt.number,
        "outcome": attempt.outcome,
        "worker": attempt.worker,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "error": attempt.error,
    }
