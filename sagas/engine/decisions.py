"""What happens next for a task: pure functions that read a ``Plan`` and add effects to it.

The forward path (start what is ready, retry, exhaust), parallel groups' joins and the
undo path (compensate level by level, finish) call each other, so they live together
here. Nothing in this module touches the database, Redis or the clock: times come from
``plan.now``, randomness from ``plan.rand``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sagas.definitions import RetryPolicy, StepDefinition
from sagas.engine import joins
from sagas.engine.plan import FORWARD, UNDOING, Plan, StepRow
from sagas.engine.retry import backoff_delay_ms, can_retry
from sagas.states import (
    AttemptKind,
    AttemptOutcome,
    AuditAction,
    CompensationReason,
    StepStatus,
    TaskStatus,
)

UNSTARTED = (StepStatus.PENDING, StepStatus.WAITING_RETRY)
TO_COMPENSATE = (StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
ACTION_TASK_STATUSES = FORWARD
ACTION_STEP_STATUSES = UNSTARTED
COMPENSATION_STEP_STATUSES = TO_COMPENSATE
STOPPED_FROM_OUTSIDE = "stopped without a cancel (RQ's stop-job or a signal from outside)"


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as its executor (or the reaper, or a worker's parent) saw it."""

    status: str
    data: Any = None
    error: str = ""
    traceback: str = ""


def missing_message(saga_name: str, step_name: str) -> str:
    return (
        f"step {step_name!r} of saga {saga_name!r} no longer exists in the deployed code; "
        "redeploy it, or resolve or cancel the task"
    )


# --- the forward path ----------------------------------------------------------------------


def advance(plan: Plan) -> None:
    """Something settled: start every node whose dependencies are done, or complete."""
    if plan.task.status in UNDOING:
        compensate_next(plan)
        return
    if plan.task.status not in FORWARD:
        return
    if work_done(plan):
        if any(winding_down(s) for s in plan.steps):
            sync_activity(plan)  # the last straggler to settle completes the task
        else:
            complete(plan)
        return
    finished = {n.name for n in plan.nodes() if done(n)}
    for node in plan.nodes():
        if node.status == StepStatus.PENDING and set(node.after) <= finished:
            start_node(plan, node)
    sync_activity(plan)


def complete(plan: Plan) -> None:
    if plan.task.status != TaskStatus.RUNNING:  # e.g. the last join came from a late branch
        plan.move_task(TaskStatus.RUNNING, AuditAction.TRANSITION)
    plan.move_task(
        TaskStatus.COMPLETED, AuditAction.COMPLETED, finished_at=plan.now, current_step=""
    )


def work_done(plan: Plan) -> bool:
    """Every step and group the task needs has finished (stopped branches may wind down)."""
    return all(done(s) for s in plan.nodes())


def done(step: StepRow) -> bool:
    """Settled in a way that lets dependants go on (a non-critical failure does)."""
    return step.status == StepStatus.SUCCEEDED or (
        step.status == StepStatus.FAILED and not step.critical
    )


def winding_down(step: StepRow) -> bool:
    """A branch its group no longer needs that has not stopped yet, or whose late work is
    still being undone: the task is not ``completed`` while any part of it still runs."""
    return bool(step.group) and (
        step.status == StepStatus.RUNNING
        or (step.compensate_alone and step.status in TO_COMPENSATE)
    )


def start_node(plan: Plan, node: StepRow) -> None:
    if node.is_group:
        start_group(plan, node)
    else:
        schedule_action(plan, node)


def schedule_action(plan: Plan, step: StepRow) -> None:
    """Hand the step's next attempt to a worker, unless that job is already queued."""
    attempt = step.attempt_count + 1
    if not plan.expects(step, AttemptKind.ACTION, attempt):
        plan.schedule(step, AttemptKind.ACTION, attempt)


def start_group(plan: Plan, group: StepRow) -> None:
    """Open the group and queue every branch. Its timeout starts with its first branch;
    its schedule-to-close cap, if it has one, starts now."""
    fields: dict[str, Any] = {"started_at": plan.now}
    if group.group_schedule_to_close_s:
        fields["schedule_deadline_at"] = plan.after(group.group_schedule_to_close_s)
    plan.move_step(group, StepStatus.RUNNING, **fields)
    for branch in plan.branches(group):
        if branch.status == StepStatus.PENDING:
            schedule_action(plan, branch)


def sync_activity(plan: Plan) -> None:
    """``waiting_retry`` only when nothing runs or is queued and something waits for a retry."""
    work = plan.work()
    busy = any(
        s.status == StepStatus.RUNNING
        or (
            s.status == StepStatus.PENDING
            and plan.expects(s, AttemptKind.ACTION, s.attempt_count + 1)
        )
        for s in work
    )
    waiting = any(s.status == StepStatus.WAITING_RETRY for s in work)
    if plan.task.status == TaskStatus.RUNNING and waiting and not busy:
        plan.move_task(TaskStatus.WAITING_RETRY, AuditAction.TRANSITION)


# --- attempts starting ---------------------------------------------------------------------


def admissible(plan: Plan, step: StepRow, kind: str, attempt: int) -> str:
    """Empty if this delivery may run now, else why not."""
    statuses: tuple[str, ...]
    if kind == AttemptKind.ACTION:
        statuses, step_statuses = ACTION_TASK_STATUSES, ACTION_STEP_STATUSES
        used = step.attempt_count
    else:
        statuses, step_statuses = UNDOING, COMPENSATION_STEP_STATUSES
        used = step.compensation_attempt_count
    if used >= attempt:
        return "duplicate"
    alone = kind == AttemptKind.COMPENSATION and step.compensate_alone
    if (plan.task.status not in statuses and not alone) or step.status not in step_statuses:
        return f"stale: task is {plan.task.status}, step is {step.status}"
    if used != attempt - 1:
        return f"stale: step is at attempt {used}"
    return ""


def group_deadline(plan: Plan, step: StepRow) -> datetime | None:
    group = plan.group_of(step)
    return joins.deadline(group) if group else None


def group_expired(plan: Plan, step: StepRow) -> bool:
    moment = group_deadline(plan, step)
    return moment is not None and moment <= plan.now


def start_attempt(plan: Plan, step: StepRow, kind: str, number: int) -> None:
    """An admitted attempt begins: the step (and task) show it running."""
    if kind == AttemptKind.ACTION:
        plan.move_step(
            step,
            StepStatus.RUNNING,
            attempt_count=number,
            started_at=step.started_at or plan.now,
            next_attempt_at=None,
        )
        _start_group_clock(plan, step)
        if plan.task.status != TaskStatus.RUNNING:
            plan.move_task(
                TaskStatus.RUNNING,
                AuditAction.TRANSITION,
                started_at=plan.task.started_at or plan.now,
            )
    elif step.status == StepStatus.SUCCEEDED:
        plan.move_step(
            step, StepStatus.COMPENSATING, compensation_attempt_count=number, next_attempt_at=None
        )
    else:
        plan.update_step(step, compensation_attempt_count=number, next_attempt_at=None)
    plan.update_task(current_step=step.name)
    plan.attempt_started(step, kind, number)


def _start_group_clock(plan: Plan, branch: StepRow) -> None:
    group = plan.group_of(branch)
    if group is not None and group.deadline_at is None and group.group_timeout_s:
        plan.update_step(group, deadline_at=plan.after(group.group_timeout_s))


def effective_timeout(
    step_timeout_s: float | None, group_deadline: datetime | None, now: datetime
) -> float | None:
    """A branch's own timeout, cut short by its group's deadline."""
    if group_deadline is None:
        return step_timeout_s
    left = max((group_deadline - now).total_seconds(), 0.001)
    return min(step_timeout_s, left) if step_timeout_s else left


def give_up_before_start(plan: Plan, step: StepRow, reason: str) -> None:
    """A branch that cannot run before its group's deadline is timed out without an attempt."""
    give_up_step(plan, step, f"{joins.TIMED_OUT_PREFIX}: {reason}")
    branch_settled(plan, step)


def defer_for_breaker(plan: Plan, step: StepRow, at: datetime, breaker: str) -> None:
    """Open breaker: no attempt, no retry used; come back when it half-opens."""
    moment = group_deadline(plan, step)
    if moment is not None and at >= moment:
        give_up_before_start(plan, step, "its breaker stays open past the group's deadline")
        return
    if step.status == StepStatus.WAITING_RETRY:
        plan.update_step(step, next_attempt_at=at)
    else:
        plan.move_step(step, StepStatus.WAITING_RETRY, next_attempt_at=at)
    if plan.task.status == TaskStatus.PENDING:
        plan.move_task(TaskStatus.WAITING_RETRY, AuditAction.TRANSITION)
    else:
        sync_activity(plan)  # waiting_retry only if no other step runs
    details = {"breaker": breaker, "next_attempt_at": at.isoformat()}
    plan.audit(AuditAction.BREAKER_OPEN, step, details)
    suffix = f"b{int(at.timestamp())}"
    plan.schedule(step, AttemptKind.ACTION, step.attempt_count + 1, at=at, suffix=suffix)


# --- attempts ending -----------------------------------------------------------------------


def classify(plan: Plan, step: StepRow, kind: str, outcome: Outcome) -> Outcome:
    """What an ended attempt counts as. A stop nobody in the engine asked for (RQ's
    stop-job from a script or dashboard) is a failed attempt that follows the retry
    policy; only a cancel, an undo or a group that no longer needs a branch stops one."""
    if outcome.status != AttemptOutcome.CANCELLED or _asked_to_stop(plan, step, kind):
        return outcome
    error = f"{STOPPED_FROM_OUTSIDE}: {outcome.error}" if outcome.error else STOPPED_FROM_OUTSIDE
    return Outcome(AttemptOutcome.FAILED, error=error, traceback=outcome.traceback)


def _asked_to_stop(plan: Plan, step: StepRow, kind: str) -> bool:
    if kind == AttemptKind.COMPENSATION:
        return False  # compensations are the undo a cancel asks for: nothing stops them
    if plan.task.status in UNDOING:
        return True
    group = plan.group_of(step)
    return group is not None and group.status != StepStatus.RUNNING


def action_ended(plan: Plan, step: StepRow, outcome: Outcome) -> None:
    """Record how an action attempt ended and decide what comes next."""
    definition = plan.definition(step)
    if definition is None:
        code_missing_for_good(plan, step, AttemptKind.ACTION)
    elif outcome.status == AttemptOutcome.SUCCEEDED:
        plan.move_step(
            step,
            StepStatus.SUCCEEDED,
            data=outcome.data,
            error="",
            progress=100,
            finished_at=plan.now,
        )
        plan.audit(AuditAction.STEP_SUCCEEDED, step, {"attempt": step.attempt_count})
        settled(plan, step)
    elif outcome.status == AttemptOutcome.CANCELLED:
        plan.move_step(step, StepStatus.CANCELLED, error=outcome.error, finished_at=plan.now)
        settled(plan, step)
    else:
        action_failed(plan, step, definition, outcome.error or str(outcome.status))


def settled(plan: Plan, step: StepRow) -> None:
    """A step reached its outcome: what comes next."""
    group = plan.group_of(step)
    if plan.task.status in UNDOING:
        compensate_next(plan)
    elif group is not None and group.status != StepStatus.RUNNING:
        _late_branch(plan, group, step)  # undone on its own whatever its task became
    elif plan.task.status not in FORWARD:
        return  # parked or ended: the outcome is recorded, nothing moves until an operator
    elif group is not None:
        branch_settled(plan, step)
    else:
        advance(plan)


def action_failed(plan: Plan, step: StepRow, definition: StepDefinition, error: str) -> None:
    """An action attempt failed (or was lost / timed out): retry or give up per policy."""
    assert plan.saga is not None  # a definition implies its saga
    policy = plan.saga.action_policy(definition, plan.task.input)
    if plan.task.status in UNDOING:
        give_up_step(plan, step, error)  # no retry: the undo goes on once this has stopped
        compensate_next(plan)
    elif plan.task.status not in FORWARD:
        # Parked or ended: no retry now; a redrive gives a parked task's failed steps a
        # fresh budget.
        give_up_step(plan, step, error)
        details = {"error": error, "attempt_count": step.attempt_count, "task": plan.task.status}
        plan.audit(AuditAction.STEP_FAILED, step, details)
    elif can_retry(policy, step.attempt_count - step.attempt_budget_base) and fits_group(
        plan, step, policy
    ):
        retry_later(plan, step, policy, error)
    else:
        exhausted(plan, step, policy, error)


def retry_later(plan: Plan, step: StepRow, policy: RetryPolicy, error: str) -> None:
    """Schedule the next attempt of a failed action after its backoff."""
    delay_ms = backoff_delay_ms(
        policy, step.attempt_count - step.attempt_budget_base, rand=plan.rand
    )
    at = plan.now + timedelta(milliseconds=delay_ms)
    plan.move_step(step, StepStatus.WAITING_RETRY, next_attempt_at=at, error=error)
    sync_activity(plan)
    schedule_retry(plan, step, AttemptKind.ACTION, delay_ms, at, error)


def schedule_retry(
    plan: Plan, step: StepRow, kind: str, delay_ms: int, at: datetime, error: str
) -> None:
    """Audit the retry and hand its job to the scheduler once the plan commits."""
    used = (
        step.compensation_attempt_count if kind == AttemptKind.COMPENSATION else step.attempt_count
    )
    details = {
        "kind": kind,
        "next_attempt": used + 1,
        "delay_ms": delay_ms,
        "next_attempt_at": at.isoformat(),
        "error": error,
    }
    plan.audit(AuditAction.RETRY_SCHEDULED, step, details)
    plan.schedule(step, kind, used + 1, at=at)


def fits_group(plan: Plan, step: StepRow, policy: RetryPolicy) -> bool:
    """A branch is not retried past its group's deadline: it is timed out instead."""
    group = plan.group_of(step)
    if group is None:
        return True
    if group.status != StepStatus.RUNNING:
        return False  # the group has decided without this branch: no point retrying it
    moment = joins.deadline(group)
    if moment is None:
        return True
    used = step.attempt_count - step.attempt_budget_base
    delay = backoff_delay_ms(policy, used, rand=lambda: 0)
    return plan.now + timedelta(milliseconds=delay) < moment


def give_up_step(plan: Plan, step: StepRow, error: str) -> None:
    plan.move_step(step, StepStatus.FAILED, error=error, finished_at=plan.now, next_attempt_at=None)


def exhausted(plan: Plan, step: StepRow, policy: RetryPolicy, error: str) -> None:
    """Retries are used up: non-critical steps are let go; otherwise the policy decides."""
    give_up_step(plan, step, error)
    details = {
        "error": error,
        "attempt_count": step.attempt_count,
        "critical": step.critical,
        "on_exhausted": policy.exhausted_action,
    }
    plan.audit(AuditAction.STEP_FAILED, step, details)
    summary = f"{step.name}: {error}"
    if step.group:
        branch_settled(plan, step)
    elif not step.critical:
        advance(plan)
    elif policy.exhausted_action == "fail":
        fail(plan, summary)
    elif policy.exhausted_action == "dead_letter":
        dead_letter(plan, summary, [step.name])
    else:
        begin_compensation(plan, CompensationReason.FAILURE, summary)


def fail(plan: Plan, summary: str) -> None:
    if any(s.status == StepStatus.RUNNING for s in plan.work()):
        plan.signal_task()  # nothing of a failed task goes on
    skip_unstarted(plan)
    close_groups(plan, undone=False)
    plan.move_task(
        TaskStatus.FAILED, AuditAction.FAILED, finished_at=plan.now, error_summary=summary[:2000]
    )


def dead_letter(plan: Plan, summary: str, steps: list[str]) -> None:
    """Park the task for an operator; the audit entry names exactly the work a redrive
    retries (``steps``)."""
    plan.move_task(
        TaskStatus.DEAD_LETTERED,
        AuditAction.DEAD_LETTERED,
        details={"error": summary, "steps": steps},
        error_summary=summary[:2000],
    )


def skip_unstarted(plan: Plan) -> None:
    for step in plan.steps:
        if step.status in UNSTARTED:
            plan.move_step(step, StepStatus.SKIPPED, next_attempt_at=None)


def close_groups(plan: Plan, *, undone: bool) -> None:
    """Group rows follow their branches: a running group stops; after an undo, a group
    that had succeeded shows whether all of its branches were undone."""
    for group in (s for s in plan.steps if s.is_group):
        if group.status == StepStatus.RUNNING:
            plan.move_step(group, StepStatus.FAILED, finished_at=plan.now, error="stopped")
        elif undone and group.status in TO_COMPENSATE:  # compensating: a retried undo
            failed = any(b.status == StepStatus.COMPENSATION_FAILED for b in plan.branches(group))
            if group.status == StepStatus.SUCCEEDED:
                plan.move_step(group, StepStatus.COMPENSATING)
            end = StepStatus.COMPENSATION_FAILED if failed else StepStatus.COMPENSATED
            plan.move_step(group, end)


def code_missing_for_good(plan: Plan, step: StepRow, kind: str) -> None:
    """No worker has this step's code (after the re-queues that let a newer worker take
    it): an action parks the task, a compensation fails for good."""
    message = missing_message(plan.task.saga, step.name)
    if kind == AttemptKind.ACTION:
        give_up_step(plan, step, message)
        if plan.task.status in FORWARD:
            dead_letter(plan, message, [step.name])
        return
    if step.status == StepStatus.SUCCEEDED:
        plan.move_step(step, StepStatus.COMPENSATING)
    compensation_failed_for_good(plan, step, message, "")
    undo_done(plan, step)


# --- parallel groups -----------------------------------------------------------------------


def branch_settled(plan: Plan, branch: StepRow) -> None:
    """A branch ended for good: join the group, or deal with a branch that came late."""
    if plan.task.status in UNDOING:
        compensate_next(plan)
        return
    if plan.task.status not in FORWARD:
        return  # a parked task joins nothing: the redrive picks up from here
    group = plan.group_of(branch)
    assert group is not None
    if group.status != StepStatus.RUNNING:
        _late_branch(plan, group, branch)
        return
    branches = plan.branches(group)
    verdict = joins.decide(group.group_mode, [b.status for b in branches], branch.status)
    if verdict == joins.WAIT:
        sync_activity(plan)
        return
    _close_group(plan, group, branches, verdict)
    _stop_unsettled(plan, branches)
    if verdict == joins.SUCCEED or not group.critical:
        advance(plan)
    else:
        begin_compensation(plan, CompensationReason.FAILURE, f"{group.name}: group failed")


def _close_group(plan: Plan, group: StepRow, branches: list[StepRow], verdict: str) -> None:
    results = {b.name: joins.branch_result(b) for b in branches if b.status in joins.SETTLED}
    succeeded = verdict == joins.SUCCEED
    status = StepStatus.SUCCEEDED if succeeded else StepStatus.FAILED
    error = "" if succeeded else f"group {group.name} ({group.group_mode}) failed"
    plan.move_step(group, status, data=results, error=error, finished_at=plan.now)
    action = AuditAction.STEP_SUCCEEDED if succeeded else AuditAction.STEP_FAILED
    plan.audit(action, group, {"mode": group.group_mode, "results": results})


def _stop_unsettled(plan: Plan, branches: list[StepRow]) -> None:
    """The group has decided: stop the branches it no longer needs."""
    for branch in branches:
        if branch.status == StepStatus.RUNNING:
            for attempt in branch.running_of(AttemptKind.ACTION):
                plan.signal_attempt(branch, attempt)
        elif branch.status == StepStatus.WAITING_RETRY:
            plan.move_step(branch, StepStatus.CANCELLED, next_attempt_at=None, finished_at=plan.now)
        elif branch.status == StepStatus.PENDING:
            plan.move_step(branch, StepStatus.SKIPPED)


def _late_branch(plan: Plan, group: StepRow, branch: StepRow) -> None:
    """A branch settled after its group decided (a stopped sibling, a slow loser)."""
    if branch.status == StepStatus.SUCCEEDED:
        # Its work is not part of the group's result: undo it on its own.
        plan.update_step(branch, compensate_alone=True)
        schedule_compensation(plan, branch)
        reason = f"group {group.name} decided without this branch"
        plan.audit(AuditAction.COMPENSATION_STARTED, branch, {"reason": reason})
    else:
        advance(plan)  # it may have been the last part of the task still running


# --- the undo path -------------------------------------------------------------------------


def begin_compensation(plan: Plan, reason: str, summary: str = "") -> None:
    target = (
        TaskStatus.CANCELLING if reason == CompensationReason.CANCEL else TaskStatus.COMPENSATING
    )
    if any(s.status == StepStatus.RUNNING for s in plan.work()):
        plan.signal_task()  # steps still running beside the failed one are no longer needed
    if plan.task.status != target:
        plan.move_task(
            target,
            AuditAction.COMPENSATION_STARTED,
            compensation_reason=reason,
            error_summary=summary[:2000],
            undo_started_at=plan.now,
        )
    compensate_next(plan)


def compensate_next(plan: Plan) -> None:
    """Undo the highest level that still has succeeded steps (its steps in parallel),
    after every running step has stopped; finish when nothing is left to undo."""
    if any(s.status == StepStatus.RUNNING for s in plan.work()):
        return  # the running step's outcome comes back here
    for step in compensation_level(plan):
        if needs_compensation_job(plan, step):
            schedule_compensation(plan, step)
    if not any(s.status in TO_COMPENSATE for s in plan.work()):
        finish_compensation(plan)


def compensation_level(plan: Plan) -> list[StepRow]:
    """The steps being undone now: the highest level with something left to undo, once
    nothing runs any more."""
    work = plan.work()
    if any(s.status == StepStatus.RUNNING for s in work):
        return []
    pending = [s for s in work if s.status in TO_COMPENSATE]
    top = max((s.level for s in pending), default=0)
    return [s for s in pending if s.level == top]


def needs_compensation_job(plan: Plan, step: StepRow) -> bool:
    if step.running_of(AttemptKind.COMPENSATION) or step.next_attempt_at is not None:
        return False
    return not plan.expects(step, AttemptKind.COMPENSATION, step.compensation_attempt_count + 1)


def schedule_compensation(plan: Plan, step: StepRow) -> None:
    plan.schedule(step, AttemptKind.COMPENSATION, step.compensation_attempt_count + 1)


def compensation_ended(plan: Plan, step: StepRow, outcome: Outcome) -> None:
    """Record how a compensation attempt ended: next undo, a retry, or a failure for good."""
    if outcome.status == AttemptOutcome.SUCCEEDED:
        plan.move_step(step, StepStatus.COMPENSATED, finished_at=plan.now, compensation_error="")
        plan.audit(AuditAction.STEP_COMPENSATED, step, {"attempt": step.compensation_attempt_count})
        undo_done(plan, step)
        return
    definition = plan.definition(step)
    if definition is None:
        compensation_failed_for_good(plan, step, missing_message(plan.task.saga, step.name), "")
        undo_done(plan, step)
        return
    error = outcome.error or str(outcome.status)
    used = step.compensation_attempt_count - step.compensation_budget_base
    if can_retry(definition.compensation_policy, used):
        retry_compensation_later(plan, step, definition.compensation_policy, error)
    else:
        compensation_failed_for_good(plan, step, error, outcome.traceback)
        undo_done(plan, step)


def retry_compensation_later(plan: Plan, step: StepRow, policy: RetryPolicy, error: str) -> None:
    """The step stays compensating; its next compensation attempt is scheduled."""
    used = step.compensation_attempt_count - step.compensation_budget_base
    delay_ms = backoff_delay_ms(policy, used, rand=plan.rand)
    at = plan.now + timedelta(milliseconds=delay_ms)
    plan.update_step(step, compensation_error=error)  # schedule() records the due time
    schedule_retry(plan, step, AttemptKind.COMPENSATION, delay_ms, at, error)


def compensation_failed_for_good(plan: Plan, step: StepRow, error: str, stack_trace: str) -> None:
    plan.move_step(
        step,
        StepStatus.COMPENSATION_FAILED,
        compensation_error=error,
        finished_at=plan.now,
        next_attempt_at=None,
    )
    details = {
        "step_name": step.name,
        "error": error,
        "trace_id": step.trace_id,
        "attempt_count": step.compensation_attempt_count,
        "stack_trace": stack_trace,
    }
    plan.audit(AuditAction.COMPENSATION_FAILED, step, details)


def undo_done(plan: Plan, step: StepRow) -> None:
    if plan.task.status in UNDOING:
        compensate_next(plan)
        return
    if step.status == StepStatus.COMPENSATION_FAILED:
        # A lone late branch could not be undone while its task went on: the task's
        # status cannot say so, so tell the humans the same way.
        plan.notify_compensation_failed()
    advance(plan)  # the task waited for this undo before it could complete


def undo_failures(steps: list[StepRow]) -> str:
    """What needs a human: each undo that failed for good and its last error."""
    return "; ".join(
        f"compensation of {s.name} failed: {s.compensation_error or 'no error recorded'}"
        for s in steps
    )


def finish_compensation(plan: Plan) -> None:
    skip_unstarted(plan)
    close_groups(plan, undone=True)
    failed = [s for s in plan.work() if s.status == StepStatus.COMPENSATION_FAILED]
    if failed:
        plan.move_task(
            TaskStatus.COMPENSATION_FAILED,
            AuditAction.TRANSITION,
            finished_at=plan.now,
            error_summary=undo_failures(failed)[:2000],
        )
        plan.notify_compensation_failed()
    elif plan.task.compensation_reason == CompensationReason.CANCEL:
        plan.move_task(
            TaskStatus.CANCELLED, AuditAction.CANCELLED, finished_at=plan.now, cancelled_at=plan.now
        )
    else:
        plan.move_task(TaskStatus.COMPENSATED, AuditAction.COMPENSATED, finished_at=plan.now)
