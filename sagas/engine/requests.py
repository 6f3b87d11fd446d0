"""Requests from outside the engine (a cancel, a deadline, an operator's action), decided
as pure functions of a task's rows, like everything else in ``decisions``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagas.engine import decisions, joins
from sagas.engine.plan import Plan, StepRow
from sagas.states import AttemptKind, AuditAction, CompensationReason, StepStatus, TaskStatus

CANCELLABLE = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.WAITING_RETRY,
    TaskStatus.DEAD_LETTERED,
)
ALREADY_CANCELLED = (TaskStatus.CANCELLING, TaskStatus.CANCELLED)
# What a deadline cancels: tasks the engine is still moving forward, never parked ones.
STILL_ACTIVE = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING_RETRY)
RESOLVABLE = (TaskStatus.COMPENSATION_FAILED, TaskStatus.FAILED, TaskStatus.DEAD_LETTERED)
BY_DEADLINE = "deadline"


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel request did; ``outcome`` and ``status`` are the API's JSON body."""

    outcome: str
    status: str
    http_status: int
    task: Any = None


class NotAllowed(Exception):
    """The operator's action does not apply to the task as it is now."""

    def __init__(self, operation: str, status: str, allowed: tuple[str, ...]) -> None:
        super().__init__(operation)
        self.operation = operation
        self.status = status
        self.allowed = allowed


def cancel(plan: Plan, actor: Any, reason: str, by: str = "operator") -> CancelOutcome:
    """Stop what runs, then undo what succeeded (``cancelling``), or end at once if nothing
    has succeeded or runs. A deadline never cancels a parked task or one whose work is done."""
    status = plan.task.status
    if status in ALREADY_CANCELLED:
        return CancelOutcome("already_cancelled", status, 200)
    if status == TaskStatus.COMPLETED:
        return CancelOutcome("already_completed", status, 409)
    if status not in CANCELLABLE:
        return CancelOutcome("already_finished", status, 409)
    if by == BY_DEADLINE and (status not in STILL_ACTIVE or decisions.work_done(plan)):
        # Parked tasks wait for their operator; a task whose work is done and whose stopped
        # branches wind down is not "still active at the deadline".
        return CancelOutcome("work_done" if status in STILL_ACTIVE else "parked", status, 409)
    details = {"reason": reason, "by": by, "from_status": status}
    plan.audit(AuditAction.CANCEL_REQUESTED, details=details, actor=actor)
    fields = {
        "cancel_requested_at": plan.now,
        "cancelled_by": actor,
        "cancel_reason": reason[:2000],
        "compensation_reason": CompensationReason.CANCEL,
        "undo_started_at": plan.now,
    }
    _cancel_waiting_steps(plan)
    busy = (StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
    if not any(s.status in busy for s in plan.work()):
        _cancel_at_once(plan, actor, fields)
        return CancelOutcome("cancelled", plan.task.status, 202)
    plan.move_task(TaskStatus.CANCELLING, AuditAction.TRANSITION, actor=actor, **fields)
    if any(s.status == StepStatus.RUNNING for s in plan.work()):
        plan.signal_task()
    decisions.compensate_next(plan)  # waits for a running step, if there is one
    return CancelOutcome("cancelled", plan.task.status, 202)


def _cancel_at_once(plan: Plan, actor: Any, fields: dict[str, Any]) -> None:
    """Nothing runs and nothing is to undo: the task ends cancelled now."""
    decisions.skip_unstarted(plan)
    decisions.close_groups(plan, undone=False)
    if plan.task.status == TaskStatus.RUNNING:
        # Running with only queued work (a redriven first step, a waiting branch):
        # "cancelled" is reached through "cancelling", never straight from "running".
        plan.move_task(TaskStatus.CANCELLING, AuditAction.TRANSITION, actor=actor, **fields)
    plan.move_task(
        TaskStatus.CANCELLED,
        AuditAction.CANCELLED,
        actor=actor,
        **fields,
        finished_at=plan.now,
        cancelled_at=plan.now,
    )


def _cancel_waiting_steps(plan: Plan) -> None:
    """A step waiting for a retry will not get one: its scheduled job finds it cancelled."""
    for step in plan.work():
        if step.status == StepStatus.WAITING_RETRY:
            plan.move_step(step, StepStatus.CANCELLED, next_attempt_at=None, finished_at=plan.now)


def resolve(plan: Plan, actor: Any, note: str) -> None:
    """Close a parked task by hand (after fixing things outside); the note is mandatory."""
    _require(plan, "resolve", RESOLVABLE)
    if any(s.running for s in plan.work()):
        # Resolved means nothing runs any more: let the running step end first.
        raise NotAllowed("resolve while a step still runs", plan.task.status, RESOLVABLE)
    decisions.skip_unstarted(plan)
    plan.move_task(
        TaskStatus.RESOLVED,
        AuditAction.RESOLVED,
        actor=actor,
        details={"note": note},
        resolved_by=actor,
        resolution_note=note,
        finished_at=plan.now,
    )


def retry_compensation(plan: Plan, actor: Any, reason: str) -> None:
    """Run the failed compensations again, each with a fresh retry budget."""
    _require(plan, "retry the compensation of", (TaskStatus.COMPENSATION_FAILED,))
    failed = [s for s in plan.work() if s.status == StepStatus.COMPENSATION_FAILED]
    for step in failed:
        plan.move_step(
            step,
            StepStatus.COMPENSATING,
            next_attempt_at=None,
            compensation_budget_base=step.compensation_attempt_count,
        )
    for group in (s for s in plan.steps if s.is_group):
        if group.status == StepStatus.COMPENSATION_FAILED:
            plan.move_step(group, StepStatus.COMPENSATING)  # settled again by the undo's end
    resume = (
        TaskStatus.CANCELLING
        if plan.task.compensation_reason == CompensationReason.CANCEL
        else TaskStatus.COMPENSATING
    )
    plan.move_task(
        resume,
        AuditAction.COMPENSATION_RETRIED,
        actor=actor,
        details={"reason": reason, "steps": [s.name for s in failed]},
        finished_at=None,
    )
    decisions.compensate_next(plan)


def redrive(plan: Plan, actor: Any, reason: str, parked_by: list[str] | None) -> None:
    """Retry exactly the work that keeps the dead-lettered task parked, each step with a
    fresh budget: the steps its ``dead_lettered`` entry names (``parked_by``), and any
    that failed while it was parked and would block it (a critical node, a branch its
    group cannot do without). Groups whose branches all settled meanwhile join now, and
    an operator's redrive takes the task past its saga's deadline."""
    _require(plan, "redrive", (TaskStatus.DEAD_LETTERED,))
    steps = _redrive_targets(plan, parked_by)
    if not steps:
        raise NotAllowed("redrive (no failed step)", plan.task.status, (TaskStatus.DEAD_LETTERED,))
    for step in steps:
        plan.move_step(
            step, StepStatus.PENDING, attempt_budget_base=step.attempt_count, finished_at=None
        )
        _reopen_group(plan, step)
    first = steps[0]
    plan.move_task(
        TaskStatus.RUNNING,
        AuditAction.REDRIVEN,
        actor=actor,
        step=first,
        details={
            "reason": reason,
            "step": first.name,
            "steps": [s.name for s in steps],
            "next_attempt": first.attempt_count + 1,
        },
        error_summary="",
    )
    for step in steps:  # branches too: advance starts only nodes
        suffix = f"rd{int(plan.now.timestamp())}"  # its earlier job may carry the same attempt
        plan.schedule(step, AttemptKind.ACTION, step.attempt_count + 1, suffix=suffix)
    if plan.task.deadline_at is not None:
        plan.update_task(deadline_at=None)
    _join_settled_groups(plan)
    decisions.advance(plan)


def _redrive_targets(plan: Plan, parked_by: list[str] | None) -> list[StepRow]:
    failed = [s for s in plan.work() if s.status == StepStatus.FAILED]
    return [s for s in failed if s.name in (parked_by or ()) or _blocks(plan, s)]


def _blocks(plan: Plan, step: StepRow) -> bool:
    """A failed step the task cannot go on without."""
    group = plan.group_of(step)
    if group is None:
        return step.critical
    if group.status != StepStatus.RUNNING:
        return False  # its group decided with it
    statuses = [b.status for b in plan.branches(group)]
    return joins.decide(group.group_mode, statuses, step.status) == joins.FAIL


def _reopen_group(plan: Plan, branch: StepRow) -> None:
    """A redriven branch gets fresh clocks: its group's timeout starts again when a branch
    next starts, and its schedule-to-close cap now (the time the task sat parked is not
    the group's)."""
    group = plan.group_of(branch)
    if group is None or group.status != StepStatus.RUNNING:
        return
    cap = group.group_schedule_to_close_s
    plan.update_step(group, deadline_at=None, schedule_deadline_at=plan.after(cap) if cap else None)


def _join_settled_groups(plan: Plan) -> None:
    """Groups whose branches all settled while the task was parked (joins wait then)."""
    for group in [s for s in plan.steps if s.is_group and s.status == StepStatus.RUNNING]:
        branches = plan.branches(group)
        if any(b.status not in joins.SETTLED for b in branches):
            continue
        last = max(branches, key=lambda b: (b.finished_at is not None, b.finished_at or plan.now))
        decisions.branch_settled(plan, last)


def _require(plan: Plan, operation: str, allowed: tuple[str, ...]) -> None:
    if plan.task.status not in allowed:
        raise NotAllowed(operation, plan.task.status, allowed)
