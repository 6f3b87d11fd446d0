"""Parallel groups' join rule and branch results: pure functions of the branches' rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sagas.engine.plan import StepRow
from sagas.states import AttemptOutcome, StepStatus

SETTLED = (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED)
WAIT, SUCCEED, FAIL = "wait", "succeed", "fail"
TIMED_OUT_PREFIX = "timed out"


def decide(mode: str, statuses: list[str], just_settled: str) -> str:
    """WAIT, SUCCEED or FAIL for a group whose branches have ``statuses``."""
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


def branch_result(branch: StepRow) -> Any:
    """A branch's result, or a structured error the next steps can read."""
    if branch.status == StepStatus.SUCCEEDED:
        return branch.data
    error_type, _, message = branch.error.partition(": ")
    if not message:
        error_type, message = "Error", branch.error
    status = "timed_out" if timed_out(branch) else str(branch.status)
    return {"status": status, "error_type": error_type, "message": message}


def timed_out(branch: StepRow) -> bool:
    return (
        branch.error.startswith(TIMED_OUT_PREFIX)
        or branch.last_action_outcome == AttemptOutcome.TIMED_OUT
    )


def deadline(group: StepRow) -> datetime | None:
    """When a group's branches must have finished: the earlier of its timeout (counted from
    its first branch's start) and its schedule-to-close cap (counted from its own start)."""
    moments = [m for m in (group.deadline_at, group.schedule_deadline_at) if m is not None]
    return min(moments) if moments else None
