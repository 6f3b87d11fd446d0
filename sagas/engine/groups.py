"""Parallel groups: branches run as separate jobs; the group joins in the database.

Every join runs with the task row locked (``flow.locked_task``), so two branches that
settle at the same moment on two workers are judged one after the other.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone

from sagas import audit
from sagas.audit import AuditAction
from sagas.definitions import Saga
from sagas.engine import cancellation, flow
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.states import AttemptKind, AttemptOutcome, CompensationReason, StepStatus

logger = logging.getLogger("sagas.engine")

SETTLED = (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED)
WAIT, SUCCEED, FAIL = "wait", "succeed", "fail"
TIMED_OUT_PREFIX = "timed out"


def decide(mode: str, statuses: list[str], just_settled: str) -> str:
    """Pure join rule: WAIT, SUCCEED or FAIL for a group whose branches have ``statuses``."""
    settled = [s for s in statuses if s in SETTLED]
    succeeded = [s for s in statuses if s == StepStatus.SUCCEEDED]
    everyone = len(settled) == len(statuses)
    if mode == "race":
        return SUCCEED if just_settled == StepStatus.SUCCEEDED else FAIL
    if mode == "any":
        return SUCCEED if succeeded else (FAIL if everyone else WAIT)
    if mode == "all_settled":
        return SUCCEED if everyone else WAIT
    if len(succeeded) == len(statuses):
        return SUCCEED
    return FAIL if len(settled) > len(succeeded) else WAIT


def branch_result(branch: StepRecord) -> Any:
    """A branch's result, or a structured error the next steps can read."""
    if branch.status == StepStatus.SUCCEEDED:
        return branch.data
    error_type, _, message = branch.error.partition(": ")
    if not message:
        error_type, message = "Error", branch.error
    status = "timed_out" if _timed_out(branch) else str(branch.status)
    return {"status": status, "error_type": error_type, "message": message}


def _timed_out(branch: StepRecord) -> bool:
    if branch.error.startswith(TIMED_OUT_PREFIX):
        return True
    last = StepAttempt.objects.filter(step=branch, kind=AttemptKind.ACTION).order_by("-number")
    return last.values_list("outcome", flat=True).first() == AttemptOutcome.TIMED_OUT


def branches_of(task: TaskInstance, group_name: str) -> list[StepRecord]:
    return list(StepRecord.objects.filter(task=task, group=group_name).order_by("index"))


def start(task: TaskInstance, group: StepRecord, saga: Saga | None) -> None:
    """Open the group (its deadline starts now) and queue every branch."""
    now = timezone.now()
    timeout = group.group_timeout_s
    deadline = now + timedelta(seconds=timeout) if timeout else None
    flow.move_step(group, StepStatus.RUNNING, started_at=now, deadline_at=deadline)
    for branch in branches_of(task, group.name):
        if branch.status == StepStatus.PENDING:
            flow.schedule_action(branch, saga.get_step(branch.name) if saga else None)


def branch_settled(task: TaskInstance, branch: StepRecord, saga: Saga | None) -> None:
    """A branch ended for good: join the group, or deal with a branch that came late."""
    if task.status in flow.UNDOING:
        flow.compensate_next(task, saga)
        return
    group = StepRecord.objects.get(task=task, name=branch.group, is_group=True)
    if group.status != StepStatus.RUNNING:
        _late(task, group, branch, saga)
        return
    branches = branches_of(task, group.name)
    verdict = decide(group.group_mode, [b.status for b in branches], branch.status)
    if verdict == WAIT:
        flow.sync_activity(task)
        return
    _close(task, group, branches, verdict)
    _stop_unsettled(task, branches)
    if verdict == SUCCEED or not group.critical:
        flow.advance(task, saga)
    else:
        flow.begin_compensation(
            task, saga, CompensationReason.FAILURE, f"{group.name}: group failed"
        )


def _close(task: TaskInstance, group: StepRecord, branches: list[StepRecord], verdict: str) -> None:
    results = {b.name: branch_result(b) for b in branches if b.status in SETTLED}
    status = StepStatus.SUCCEEDED if verdict == SUCCEED else StepStatus.FAILED
    error = "" if verdict == SUCCEED else f"group {group.name} ({group.group_mode}) failed"
    flow.move_step(group, status, data=results, error=error, finished_at=timezone.now())
    action = AuditAction.STEP_SUCCEEDED if verdict == SUCCEED else AuditAction.STEP_FAILED
    audit.record(task, action, step=group, details={"mode": group.group_mode, "results": results})


def _stop_unsettled(task: TaskInstance, branches: list[StepRecord]) -> None:
    """The group has decided: stop the branches it no longer needs."""
    for branch in branches:
        if branch.status == StepStatus.RUNNING:
            address = cancellation.AttemptAddress(
                str(task.pk), branch.name, AttemptKind.ACTION, branch.attempt_count
            )
            transaction.on_commit(partial(cancellation.signal_attempt_safely, address))
        elif branch.status == StepStatus.WAITING_RETRY:
            flow.move_step(
                branch, StepStatus.CANCELLED, next_attempt_at=None, finished_at=timezone.now()
            )
        elif branch.status == StepStatus.PENDING:
            flow.move_step(branch, StepStatus.SKIPPED)


def _late(task: TaskInstance, group: StepRecord, branch: StepRecord, saga: Saga | None) -> None:
    """A branch settled after its group decided (a stopped sibling, a slow loser); an
    undoing task never gets here (``branch_settled`` hands it to the undo first)."""
    if branch.status == StepStatus.SUCCEEDED:
        # Its work is not part of the group's result: undo it on its own.
        StepRecord.objects.filter(pk=branch.pk).update(compensate_alone=True)
        flow.schedule_compensation(branch, saga)
        audit.record(
            task,
            AuditAction.COMPENSATION_STARTED,
            step=branch,
            details={"reason": f"group {group.name} decided without this branch"},
        )
    else:
        flow.advance(task, saga)  # it may have been the last part of the task still running
