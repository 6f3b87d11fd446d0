"""Every (from, to) pair of both tables is allowed or refused exactly as written here."""

from __future__ import annotations

import itertools

import pytest

from sagas.states import (
    ACTIVE_TASK_STATUSES,
    STEP_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL_TASK_STATUSES,
    StepStatus,
    TaskStatus,
    can_transition_step,
    can_transition_task,
)

# Written out independently of sagas/states.py on purpose: a change to the table must be
# a change here too.
TASK_ALLOWED = {
    "pending": {
        "running",
        "waiting_retry",
        "compensating",
        "failed",
        "cancelled",
        "cancelling",
        "dead_lettered",
    },
    "running": {
        "waiting_retry",
        "completed",
        "compensating",
        "failed",
        "dead_lettered",
        "cancelling",
    },
    "waiting_retry": {
        "running",
        "compensating",
        "failed",
        "dead_lettered",
        "cancelling",
        "cancelled",
    },
    "compensating": {"compensated", "compensation_failed"},
    "cancelling": {"cancelled", "compensation_failed"},
    "compensation_failed": {"compensating", "cancelling", "resolved"},
    "dead_lettered": {"running", "cancelling", "cancelled", "resolved"},
    "failed": {"resolved"},
    "completed": set(),
    "compensated": set(),
    "cancelled": set(),
    "resolved": set(),
}

STEP_ALLOWED = {
    "pending": {"running", "waiting_retry", "skipped", "failed"},
    "running": {"succeeded", "failed", "waiting_retry", "cancelled"},
    "waiting_retry": {"running", "failed", "skipped", "cancelled"},
    "succeeded": {"compensating"},
    "failed": {"pending"},
    "compensating": {"compensated", "compensation_failed"},
    "compensation_failed": {"compensating"},
    "skipped": set(),
    "cancelled": set(),
    "compensated": set(),
}

TASK_PAIRS = list(itertools.product(TaskStatus.values, repeat=2))
STEP_PAIRS = list(itertools.product(StepStatus.values, repeat=2))


def test_tables_cover_every_status():
    assert set(TASK_ALLOWED) == set(TaskStatus.values) == set(TASK_TRANSITIONS)
    assert set(STEP_ALLOWED) == set(StepStatus.values) == set(STEP_TRANSITIONS)


@pytest.mark.parametrize(("current", "target"), TASK_PAIRS)
def test_task_transition(current, target):
    assert can_transition_task(current, target) is (target in TASK_ALLOWED[current])


@pytest.mark.parametrize(("current", "target"), STEP_PAIRS)
def test_step_transition(current, target):
    assert can_transition_step(current, target) is (target in STEP_ALLOWED[current])


def test_no_status_transitions_to_itself():
    assert not any(can_transition_task(s, s) for s in TaskStatus.values)
    assert not any(can_transition_step(s, s) for s in StepStatus.values)


def test_terminal_statuses_are_the_ones_nothing_leaves():
    assert TERMINAL_TASK_STATUSES == {"completed", "compensated", "cancelled", "resolved"}
    assert not TERMINAL_TASK_STATUSES & ACTIVE_TASK_STATUSES


def test_cancelled_is_only_reached_from_states_with_nothing_running():
    # Honest state: a running task goes through cancelling first.
    sources = {s for s, targets in TASK_ALLOWED.items() if "cancelled" in targets}
    assert "running" not in sources
    assert sources == {"pending", "waiting_retry", "dead_lettered", "cancelling"}


@pytest.mark.parametrize("bad", ["", "done", "RUNNING"])
def test_unknown_status_is_refused(bad):
    with pytest.raises(ValueError, match="is not a valid"):
        can_transition_task(bad, "running")
    with pytest.raises(ValueError, match="is not a valid"):
        can_transition_step("running", bad)
