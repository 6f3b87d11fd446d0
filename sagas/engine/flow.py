"""What happens next after an attempt ends: advance, retry, exhaust, compensate, finish.

Every function here runs inside the caller's transaction with the task row locked
(``locked_task``), so its transitions win unless someone bypassed the lock; if one
still loses, ``ConcurrentChange`` rolls the whole decision back to be taken again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from sagas import audit
from sagas.audit import AuditAction
from sagas.definitions import RetryPolicy, Saga, StepDefinition
from sagas.engine import dispatch, notify
from sagas.engine.retry import backoff_delay_ms, can_retry
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import (
    AttemptKind,
    AttemptOutcome,
    CompensationReason,
    StepStatus,
    TaskStatus,
)
from sagas.transitions import transition, transition_step

logger = logging.getLogger("sagas.engine")

UNSTARTED = (StepStatus.PENDING, StepStatus.WAITING_RETRY)
FORWARD = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING_RETRY)
UNDOING = (TaskStatus.COMPENSATING, TaskStatus.CANCELLING)
TO_COMPENSATE = (StepStatus.SUCCEEDED, StepStatus.COMPENSATING)


class ConcurrentChange(Exception):
    """A fenced update lost although the task row was locked: take the decision again."""


def locked_task(task_id: UUID | str) -> TaskInstance:
    return TaskInstance.objects.select_for_update().get(pk=task_id)


def move(
    task: TaskInstance, to: TaskStatus, action: str = AuditAction.TRANSITION, **kw: Any
) -> None:
    if not transition(task, to, action=action, **kw):
        raise ConcurrentChange(f"task {task.pk} changed under its lock")


def move_step(step: StepRecord, to: StepStatus, **fields: Any) -> None:
    if not transition_step(step, to, fields=fields):
        raise ConcurrentChange(f"step {step.pk} changed under its task's lock")


def steps_of(task: TaskInstance) -> list[StepRecord]:
    return list(StepRecord.objects.filter(task=task).order_by("index"))


# --- actions -------------------------------------------------------------------------


def schedule_action(step: StepRecord, definition: StepDefinition | None, at: Any = None) -> None:
    timeout = definition.timeout_s if definition else None
    dispatch.schedule(
        step, AttemptKind.ACTION, step.attempt_count + 1, at=at, step_timeout_s=timeout
    )


def advance(task: TaskInstance, saga: Saga | None) -> None:
    """Something settled: start every node whose dependencies are done, or complete."""
    if task.status in UNDOING:
        compensate_next(task, saga)
        return
    if task.status not in FORWARD:
        return
    steps = steps_of(task)
    nodes = [s for s in steps if not s.group]
    if work_done(steps):
        if any(winding_down(s) for s in steps):
            sync_activity(task)  # the last straggler to settle completes the task
            return
        if task.status != TaskStatus.RUNNING:  # e.g. the last join came from a late branch
            move(task, TaskStatus.RUNNING)
        move(
            task,
            TaskStatus.COMPLETED,
            AuditAction.COMPLETED,
            fields={"finished_at": timezone.now(), "current_step": ""},
        )
        return
    finished = {s.name for s in nodes if done(s)}
    for node in nodes:
        if node.status == StepStatus.PENDING and set(node.after) <= finished:
            start_node(task, node, saga)
    sync_activity(task)


def work_done(steps: list[StepRecord]) -> bool:
    """Every step and group the task needs has finished (stopped branches may wind down)."""
    return all(done(s) for s in steps if not s.group)


def winding_down(step: StepRecord) -> bool:
    """A branch its group no longer needs that has not stopped yet, or whose late work is
    still being undone: the task is not ``completed`` while any part of it still runs."""
    return bool(step.group) and (
        step.status == StepStatus.RUNNING
        or (step.compensate_alone and step.status in TO_COMPENSATE)
    )


def done(step: StepRecord) -> bool:
    """Settled in a way that lets dependants go on (a non-critical failure does)."""
    return step.status == StepStatus.SUCCEEDED or (
        step.status == StepStatus.FAILED and not step.critical
    )


def settled(task: TaskInstance, step: StepRecord, saga: Saga | None) -> None:
    """A step reached its outcome (succeeded, or stopped by a cancel): what comes next."""
    if task.status in UNDOING or (step.status == StepStatus.CANCELLED and not step.group):
        compensate_next(task, saga)
    elif step.group:
        branch_settled(task, step, saga)
    else:
        advance(task, saga)


def branch_settled(task: TaskInstance, step: StepRecord, saga: Saga | None) -> None:
    from sagas.engine import groups

    groups.branch_settled(task, step, saga)


def start_node(task: TaskInstance, node: StepRecord, saga: Saga | None) -> None:
    if node.is_group:
        from sagas.engine import groups

        groups.start(task, node, saga)
    elif not node.job_id:  # not handed to a worker yet
        schedule_action(node, saga.get_step(node.name) if saga else None)


def sync_activity(task: TaskInstance) -> None:
    """``waiting_retry`` only when nothing runs or is queued and something waits for a retry."""
    work = [s for s in steps_of(task) if not s.is_group]
    busy = any(
        s.status == StepStatus.RUNNING or (s.status == StepStatus.PENDING and s.job_id)
        for s in work
    )
    waiting = any(s.status == StepStatus.WAITING_RETRY for s in work)
    if task.status == TaskStatus.RUNNING and waiting and not busy:
        move(task, TaskStatus.WAITING_RETRY)


def retry_later(task: TaskInstance, step: StepRecord, policy: RetryPolicy, error: str) -> None:
    """Schedule the next attempt of a failed action after its backoff."""
    delay_ms, at = backoff_until(policy, step.attempt_count - step.attempt_budget_base)
    move_step(step, StepStatus.WAITING_RETRY, next_attempt_at=at, error=error)
    sync_activity(task)
    schedule_retry(task, step, AttemptKind.ACTION, delay_ms, at, error)


def retry_compensation_later(
    task: TaskInstance, step: StepRecord, definition: StepDefinition, error: str
) -> None:
    """Schedule the next attempt of a failed compensation (the step stays compensating)."""
    used = step.compensation_attempt_count - step.compensation_budget_base
    delay_ms, at = backoff_until(definition.compensation_policy, used)
    StepRecord.objects.filter(pk=step.pk).update(next_attempt_at=at, compensation_error=error)
    schedule_retry(task, step, AttemptKind.COMPENSATION, delay_ms, at, error)


def backoff_until(policy: RetryPolicy, used: int) -> tuple[int, datetime]:
    delay_ms = backoff_delay_ms(policy, used)
    return delay_ms, timezone.now() + timedelta(milliseconds=delay_ms)


def schedule_retry(
    task: TaskInstance, step: StepRecord, kind: str, delay_ms: int, at: datetime, error: str
) -> None:
    """Audit the retry and hand its job to the scheduler once this transaction commits."""
    done = (
        step.compensation_attempt_count if kind == AttemptKind.COMPENSATION else step.attempt_count
    )
    audit.record(
        task,
        AuditAction.RETRY_SCHEDULED,
        step=step,
        details={
            "kind": kind,
            "next_attempt": done + 1,
            "delay_ms": delay_ms,
            "next_attempt_at": at.isoformat(),
            "error": error,
        },
    )
    definition = task_saga_step(task, step)
    dispatch.schedule(
        step, kind, done + 1, at=at, step_timeout_s=definition.timeout_s if definition else None
    )


def task_saga_step(task: TaskInstance, step: StepRecord) -> StepDefinition | None:
    from sagas.definitions import registry

    return registry.get(task.saga).get_step(step.name) if task.saga in registry else None


def action_failed(
    task: TaskInstance, step: StepRecord, saga: Saga, definition: StepDefinition, error: str
) -> None:
    """An action attempt failed (or was lost / timed out): retry or give up per policy."""
    policy = saga.action_policy(definition, task.input)
    if task.status in UNDOING:
        # The saga is being undone: no retry; the undo goes on once this step has stopped.
        give_up_step(step, error)
        compensate_next(task, saga)
    elif task.status not in FORWARD:
        give_up_step(step, error)  # the task already ended (failed, dead-lettered): record only
    elif can_retry(policy, step.attempt_count - step.attempt_budget_base) and fits_group(
        task, step, policy
    ):
        retry_later(task, step, policy, error)
    else:
        exhausted(task, step, saga, policy, error)


def fits_group(task: TaskInstance, step: StepRecord, policy: RetryPolicy) -> bool:
    """A branch is not retried past its group's deadline: it is timed out instead."""
    if not step.group:
        return True
    group = StepRecord.objects.get(task=task, name=step.group, is_group=True)
    if group.status != StepStatus.RUNNING:
        return False  # the group has decided without this branch: no point retrying it
    if group.deadline_at is None:
        return True
    delay = backoff_delay_ms(policy, step.attempt_count - step.attempt_budget_base, rand=lambda: 0)
    return timezone.now() + timedelta(milliseconds=delay) < group.deadline_at


def give_up_step(step: StepRecord, error: str) -> None:
    move_step(
        step, StepStatus.FAILED, error=error, finished_at=timezone.now(), next_attempt_at=None
    )


def exhausted(
    task: TaskInstance, step: StepRecord, saga: Saga, policy: RetryPolicy, error: str
) -> None:
    """Retries are used up: non-critical steps are let go; otherwise the policy decides."""
    give_up_step(step, error)
    audit.record(
        task,
        AuditAction.STEP_FAILED,
        step=step,
        details={
            "error": error,
            "attempt_count": step.attempt_count,
            "critical": step.critical,
            "on_exhausted": policy.exhausted_action,
        },
    )
    if step.group:
        branch_settled(task, step, saga)
    elif not step.critical:
        advance(task, saga)
    elif policy.exhausted_action == "fail":
        fail(task, f"{step.name}: {error}")
    elif policy.exhausted_action == "dead_letter":
        dead_letter(task, f"{step.name}: {error}")
    else:
        begin_compensation(task, saga, CompensationReason.FAILURE, f"{step.name}: {error}")


def fail(task: TaskInstance, summary: str) -> None:
    skip_unstarted(task)
    close_groups(task, undone=False)
    move(
        task,
        TaskStatus.FAILED,
        AuditAction.FAILED,
        fields={"finished_at": timezone.now(), "error_summary": summary[:2000]},
    )


def dead_letter(task: TaskInstance, summary: str) -> None:
    move(
        task,
        TaskStatus.DEAD_LETTERED,
        AuditAction.DEAD_LETTERED,
        fields={"error_summary": summary[:2000]},
        details={"error": summary},
    )


def close_groups(task: TaskInstance, *, undone: bool) -> None:
    """Group rows follow their branches: a running group stops; after an undo, a group
    that had succeeded shows whether all of its branches were undone."""
    steps = steps_of(task)
    for group in (s for s in steps if s.is_group):
        if group.status == StepStatus.RUNNING:
            move_step(group, StepStatus.FAILED, finished_at=timezone.now(), error="stopped")
        elif group.status == StepStatus.SUCCEEDED and undone:
            branches = [s.status for s in steps if s.group == group.name]
            failed = StepStatus.COMPENSATION_FAILED in branches
            move_step(group, StepStatus.COMPENSATING)
            move_step(group, StepStatus.COMPENSATION_FAILED if failed else StepStatus.COMPENSATED)


def skip_unstarted(task: TaskInstance) -> None:
    for step in steps_of(task):
        if step.status in UNSTARTED:
            move_step(step, StepStatus.SKIPPED, next_attempt_at=None)


# --- compensations -------------------------------------------------------------------


def begin_compensation(
    task: TaskInstance, saga: Saga | None, reason: str, summary: str = ""
) -> None:
    target = (
        TaskStatus.CANCELLING if reason == CompensationReason.CANCEL else TaskStatus.COMPENSATING
    )
    if any(s.status == StepStatus.RUNNING for s in steps_of(task)):
        from sagas.engine import cancellation

        # Steps still running beside the failed one are no longer needed: ask them to stop.
        transaction.on_commit(partial(cancellation.stop_running_attempts, task.pk))
    if task.status != target:
        move(
            task,
            target,
            AuditAction.COMPENSATION_STARTED,
            fields={"compensation_reason": reason, "error_summary": summary[:2000]},
        )
    compensate_next(task, saga)


def compensate_next(task: TaskInstance, saga: Saga | None) -> None:
    """Undo the highest level that still has succeeded steps (its steps in parallel),
    after every running step has stopped; finish when nothing is left to undo."""
    work = [s for s in steps_of(task) if not s.is_group]
    if any(s.status == StepStatus.RUNNING for s in work):
        return  # the running step's outcome will call back here
    pending = [s for s in work if s.status in TO_COMPENSATE]
    if not pending:
        finish_compensation(task)
        return
    top = max(s.level for s in pending)
    for step in pending:
        if step.level == top and needs_compensation_job(step):
            schedule_compensation(step, saga)


def needs_compensation_job(step: StepRecord) -> bool:
    """Not yet undone, or handed back by retry_compensation: neither running nor scheduled."""
    if step.status == StepStatus.SUCCEEDED:
        return True
    running = StepAttempt.objects.filter(
        step=step, kind=AttemptKind.COMPENSATION, outcome=AttemptOutcome.RUNNING
    )
    return step.next_attempt_at is None and not running.exists()


def schedule_compensation(step: StepRecord, saga: Saga | None) -> None:
    """Idempotent: the same attempt's job id is refused by RQ if it is already queued."""
    definition = saga.get_step(step.name) if saga else None
    dispatch.schedule(
        step,
        AttemptKind.COMPENSATION,
        step.compensation_attempt_count + 1,
        step_timeout_s=definition.timeout_s if definition else None,
    )


def compensation_failed_for_good(
    task: TaskInstance, step: StepRecord, error: str, stack_trace: str
) -> None:
    move_step(
        step,
        StepStatus.COMPENSATION_FAILED,
        compensation_error=error,
        finished_at=timezone.now(),
        next_attempt_at=None,
    )
    audit.record(
        task,
        AuditAction.COMPENSATION_FAILED,
        step=step,
        details={
            "step_name": step.name,
            "error": error,
            "trace_id": step.trace_id,
            "attempt_count": step.compensation_attempt_count,
            "stack_trace": stack_trace,
        },
    )


def finish_compensation(task: TaskInstance) -> None:
    skip_unstarted(task)
    close_groups(task, undone=True)
    steps = steps_of(task)
    failed = [s for s in steps if s.status == StepStatus.COMPENSATION_FAILED]
    now = timezone.now()
    if failed:
        move(task, TaskStatus.COMPENSATION_FAILED, fields={"finished_at": now})
        transaction.on_commit(lambda: notify.compensation_failed(task.pk))
    elif task.compensation_reason == CompensationReason.CANCEL:
        move(
            task,
            TaskStatus.CANCELLED,
            AuditAction.CANCELLED,
            fields={"finished_at": now, "cancelled_at": now},
        )
    else:
        move(task, TaskStatus.COMPENSATED, AuditAction.COMPENSATED, fields={"finished_at": now})
