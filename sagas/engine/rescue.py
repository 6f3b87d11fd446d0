"""What a task should have going on, when the reaper should next look at it, and what the
reaper does when it does: pure functions of a task's rows (and of what Redis holds).

Every applied plan ends by computing ``wake_time``, so the reaper never scans active
tasks: it visits only tasks whose wake-up time has passed (and attempts whose heartbeat
expired), and what it does there is decided here from the rows, whatever a step's
``job_id`` happens to say.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timedelta

from sagas.engine import decisions, requests
from sagas.engine.plan import FORWARD, UNDOING, Plan, Schedule, StepRow
from sagas.states import ACTIVE_TASK_STATUSES, AttemptKind, StepStatus

ALIVE, STUCK_SCHEDULED, MISSING = "alive", "stuck_scheduled", "missing"


@dataclass(frozen=True)
class Timing:
    """The reaper's tolerances: how late a job may be, how long a step may ignore a stop."""

    grace: timedelta
    cancel_grace: timedelta
    stuck_after: timedelta


@dataclass(frozen=True)
class ExpectedJob:
    step: StepRow
    kind: str
    attempt: int
    due: datetime | None  # None: as soon as a worker is free


def expected_jobs(plan: Plan) -> list[ExpectedJob]:
    """The jobs that should be queued or scheduled for this task now, by its rows alone."""
    if plan.task.status in UNDOING:
        return _compensations(plan, decisions.compensation_level(plan))
    # A late branch's own undo runs whatever became of its task (even a parked one).
    alone = [s for s in plan.work() if s.compensate_alone and s.status in decisions.TO_COMPENSATE]
    if plan.task.status not in FORWARD:
        return _compensations(plan, alone)
    actions = [
        ExpectedJob(s, AttemptKind.ACTION, s.attempt_count + 1, s.next_attempt_at)
        for s in plan.work()
        if _action_due(plan, s)
    ]
    return actions + _compensations(plan, alone)


def _action_due(plan: Plan, step: StepRow) -> bool:
    if step.running:
        return False
    if step.status == StepStatus.WAITING_RETRY:
        return True
    return step.status == StepStatus.PENDING and startable(plan, step)


def startable(plan: Plan, step: StepRow) -> bool:
    """A pending step that may start: a branch of a running group, or a node whose
    dependencies are done."""
    group = plan.group_of(step)
    if group is not None:
        return group.status == StepStatus.RUNNING
    finished = {n.name for n in plan.nodes() if decisions.done(n)}
    return set(step.after) <= finished


def _compensations(plan: Plan, steps: list[StepRow]) -> list[ExpectedJob]:
    return [
        ExpectedJob(
            s, AttemptKind.COMPENSATION, s.compensation_attempt_count + 1, s.next_attempt_at
        )
        for s in steps
        if not s.running_of(AttemptKind.COMPENSATION)
    ]


def job_of(plan: Plan, job: ExpectedJob) -> str:
    """The id of the job the step records for this attempt, or "" if it records another."""
    return job.step.job_id if plan.expects(job.step, job.kind, job.attempt) else ""


# --- when to look again --------------------------------------------------------------------


def wake_time(plan: Plan, timing: Timing) -> datetime | None:
    """When the reaper should look at this task if nothing else happens (database clock)."""
    moments = [(job.due or plan.now) + timing.grace for job in expected_jobs(plan)]
    if plan.task.status not in ACTIVE_TASK_STATUSES:
        return min(moments) if moments else None  # only a late branch's undo is left
    moments += [at + timing.cancel_grace + timing.grace for at in _stop_requests(plan)]
    if plan.task.deadline_at and _deadline_applies(plan):
        moments.append(plan.task.deadline_at)
    if not moments and not _running(plan):
        moments.append(plan.now + timing.grace)  # nothing runs, nothing is queued: look soon
    return min(moments) if moments else None


def _running(plan: Plan) -> bool:
    return any(s.running for s in plan.steps)


def _fresh_attempt(plan: Plan) -> bool:
    return any(
        a.heartbeat_expires_at is None or a.heartbeat_expires_at > plan.now
        for s in plan.steps
        for a in s.running
    )


def _deadline_applies(plan: Plan) -> bool:
    return plan.task.status in requests.STILL_ACTIVE and not decisions.work_done(plan)


def _stop_requests(plan: Plan) -> list[datetime]:
    """When each still-running action was asked to stop (a cancel, or its group deciding)."""
    moments = []
    for step in plan.work():
        if not step.running_of(AttemptKind.ACTION):
            continue
        asked = _asked_to_stop_at(plan, step)
        if asked is not None:
            moments.append(asked)
    return moments


def _asked_to_stop_at(plan: Plan, step: StepRow) -> datetime | None:
    """When this step's running action was asked to stop: its task's undo began (a cancel,
    or compensating a failure), or its group decided without it."""
    if plan.task.status in UNDOING:
        return plan.task.undo_started_at or plan.task.cancel_requested_at
    group = plan.group_of(step)
    if group is not None and group.status != StepStatus.RUNNING:
        return group.finished_at or plan.now
    return None


# --- what the reaper does ------------------------------------------------------------------


def rescue(plan: Plan, job_states: dict[str, str], timing: Timing) -> None:
    """Move a task the normal path left behind: start what should have started, re-enqueue
    jobs Redis lost, promote jobs a dead scheduler holds, stop steps that ignore a stop,
    and enforce the saga's deadline."""
    if _deadline_due(plan):
        requests.cancel(plan, None, "deadline passed", by=requests.BY_DEADLINE)
    scheduled = {e.job_id for e in plan.effects if isinstance(e, Schedule)}
    decisions.advance(plan)  # whatever is ready starts; whatever is done completes
    scheduled |= {e.job_id for e in plan.effects if isinstance(e, Schedule)}
    for job in expected_jobs(plan):
        jid = job_of(plan, job)
        state = ALIVE if jid in scheduled else job_states.get(jid, MISSING)
        if state == MISSING:
            suffix = f"r{int(plan.now.timestamp())}"
            at = job.due if job.due and job.due > plan.now else None
            plan.schedule(job.step, job.kind, job.attempt, at=at, suffix=suffix)
        elif state == STUCK_SCHEDULED and _overdue(plan, job, timing):
            plan.promote(jid)
    _stop_overdue(plan, timing)


def _deadline_due(plan: Plan) -> bool:
    deadline = plan.task.deadline_at
    return deadline is not None and deadline <= plan.now and _deadline_applies(plan)


def _overdue(plan: Plan, job: ExpectedJob, timing: Timing) -> bool:
    return (job.due or plan.now) + timing.grace <= plan.now


def _stop_overdue(plan: Plan, timing: Timing) -> None:
    """Actions still running a full grace period after they were asked to stop: ask again
    (a flushed Redis forgot the signal) and stop their work horse outright."""
    late = plan.now - timing.cancel_grace - timing.grace
    for step in plan.work():
        asked = _asked_to_stop_at(plan, step)
        if asked is None or asked > late:
            continue
        for attempt in step.running_of(AttemptKind.ACTION):
            if plan.task.status in UNDOING:
                plan.signal_task()
            else:
                plan.signal_attempt(step, attempt)
            plan.stop_attempt(step, attempt)


def jobs_to_check(plan: Plan) -> list[str]:
    """The job ids whose state in Redis decides whether this task needs a rescue."""
    return [jid for job in expected_jobs(plan) if (jid := job_of(plan, job))]


def needs_rescue(plan: Plan, job_states: dict[str, str], timing: Timing) -> bool:
    """Whether a rescue would change anything. Decided on unlocked rows, so that tasks
    whose jobs are merely waiting for a worker cost no lock and no write each."""
    probe = Plan(copy.deepcopy(plan.task), copy.deepcopy(plan.steps), plan.now, plan.saga)
    rescue(probe, job_states, timing)
    return probe.changed


# --- stuck: the one definition -------------------------------------------------------------


def stuck(plan: Plan, job_states: dict[str, str], timing: Timing) -> bool:
    """Active, no attempt running with a fresh heartbeat, no job queued or scheduled for it,
    and unchanged for longer than ``SAGAS_STUCK_AFTER``. (Attempts whose heartbeat expired
    are not in a plan's rows: the reaper settles them as lost first.)"""
    if plan.task.status not in ACTIVE_TASK_STATUSES or _fresh_attempt(plan):
        return False
    if any(job_states.get(jid) in (ALIVE, STUCK_SCHEDULED) for jid in jobs_to_check(plan)):
        return False
    changed = plan.task.updated_at
    return changed is not None and changed < plan.now - timing.stuck_after
