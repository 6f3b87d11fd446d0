"""Parallel groups on real workers: all_settled with a timeout, any, all, overlap, non-critical."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from sagas.engine import dispatch
from sagas.models import AuditEntry, StepAttempt
from sagas.services import start
from sagas.states import AttemptKind
from tests.engine.conftest import terminal, wait_for, workers_up

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def statuses(task):
    return dict(task.steps.values_list("name", "status"))


def test_all_settled_returns_partial_results_within_the_timeout(workers):
    for name in ("w1", "w2", "w3"):
        workers(name)
    began = timezone.now()
    task, _ = start("flight-search", {})  # demo defaults: 2 fast, 1 failing, 1 too slow
    group = wait_for(
        lambda: task.steps.filter(name="search", status="succeeded").first(),
        30,
        message="the search group never joined",
    )
    joined_after = (group.finished_at - began).total_seconds()
    assert joined_after < 5 + 3, joined_after  # group timeout + scheduling slack
    results = group.data
    assert results is not None
    assert results["skyways"]["provider"] == "skyways"
    assert results["aerofast"]["provider"] == "aerofast"
    assert results["budgetjet"] == {
        "status": "failed",
        "error_type": "ProviderError",
        "message": "budgetjet is unavailable",
    }
    assert results["slowair"]["status"] == "timed_out"
    wait_for(lambda: terminal(task), 30)
    assert task.status == "completed"
    best = task.steps.get(name="pick_best").data
    assert best is not None
    assert best["compared"] == 2
    slow = StepAttempt.objects.get(step__task=task, step__name="slowair")
    assert slow.outcome == "timed_out"


def test_any_first_success_wins_siblings_stop_and_late_work_is_undone(workers):
    for name in ("w1", "w2", "w3"):
        workers(name)
    workers_up(3)
    task, _ = start("first-hotel", {})
    wait_for(lambda: terminal(task), 60, message="first-hotel did not finish")
    assert task.status == "completed"
    offers = task.steps.get(name="offers")
    assert offers.status == "succeeded"
    assert offers.data is not None
    assert offers.data["fast_hotel"] == {"hotel": "fast"}
    # The task says `completed` only once no part of it still runs: slow_hotel observed
    # the cancellation, and stubborn_hotel, which ignored it and finished, is undone.
    steps = statuses(task)
    assert steps["slow_hotel"] == "cancelled"
    assert steps["stubborn_hotel"] == "compensated"
    completed_at = AuditEntry.objects.get(task=task, action="completed").created_at
    last_undo = StepAttempt.objects.get(
        step__task=task, step__name="stubborn_hotel", kind=AttemptKind.COMPENSATION
    )
    assert last_undo.finished_at is not None
    assert last_undo.finished_at <= completed_at
    assert not StepAttempt.objects.filter(
        step__task=task, step__name="fast_hotel", kind=AttemptKind.COMPENSATION
    ).exists()


def test_all_with_a_failing_branch_stops_the_others_and_compensates_by_level(workers):
    for name in ("w1", "w2", "w3"):
        workers(name)
    workers_up(3)
    task, _ = start("all-or-nothing", {})
    wait_for(lambda: terminal(task), 60, message="all-or-nothing did not finish")
    assert task.status == "compensated"
    steps = statuses(task)
    assert steps["broken_job"] == "failed"
    assert steps["long_job"] == "cancelled"
    assert steps["quick_job"] == "compensated"
    assert steps["prepare"] == "compensated"
    assert steps["finish"] == "skipped"
    undo = list(
        StepAttempt.objects.filter(step__task=task, kind=AttemptKind.COMPENSATION)
        .order_by("started_at")
        .values_list("step__name", flat=True)
    )
    assert undo == ["quick_job", "prepare"]  # the branch level first, then the level before


def test_branches_run_at_the_same_time_and_a_duplicate_delivery_still_succeeds_once(workers):
    task, _ = start("pair", {})
    both_started = time.monotonic()
    workers("w1")
    workers("w2")
    workers("w3")
    left = wait_for(lambda: task.steps.filter(name="left", status="running").first(), 30)
    # Deliver the running branch's attempt a second time.
    dup = dispatch.job_id(task.pk, "left", AttemptKind.ACTION, 1, "dup")
    assert dispatch.enqueue(str(task.pk), "left", AttemptKind.ACTION, 1, dup)
    wait_for(lambda: terminal(task), 60, message="pair did not finish")
    assert task.status == "completed"
    attempts = {
        a.step.name: a for a in StepAttempt.objects.filter(step__task=task).select_related("step")
    }
    assert set(attempts) == {"left", "right"}
    a, b = attempts["left"], attempts["right"]
    assert a.finished_at is not None and b.finished_at is not None
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # they overlapped
    assert StepAttempt.objects.filter(step=left, outcome="succeeded").count() == 1
    assert time.monotonic() - both_started < 1.5 * 2 + 10
    wait_for(
        lambda: AuditEntry.objects.filter(task=task, action="duplicate_delivery").exists(),
        30,
        message="the duplicate delivery left no trace",
    )


def test_a_failing_non_critical_step_leaves_the_task_completed_with_the_failure_visible(workers):
    workers("w1")
    workers("w2")
    task, _ = start(
        "flight-search", {"providers": {"slowair": {"latency_ms": 100}}, "notify": "fail"}
    )
    wait_for(lambda: terminal(task), 60, message="flight-search did not finish")
    assert task.status == "completed"
    notify = task.steps.get(name="notify")
    assert notify.status == "failed"
    assert "mail relay refused" in notify.error
    assert AuditEntry.objects.filter(task=task, step=notify, action="step_failed").exists()
    assert task.steps.get(name="pick_best").status == "succeeded"


def test_a_step_failing_beside_a_running_sibling_stops_it_and_compensates(workers):
    workers("w1")
    workers("w2")
    workers_up(2)
    task, _ = start("dag-fail", {})
    wait_for(lambda: terminal(task), 60, message="dag-fail stayed active")
    assert task.status == "compensated"
    assert statuses(task) == {"base": "compensated", "breaks": "failed", "sibling": "cancelled"}


def test_a_task_past_its_deadline_is_cancelled_by_the_system(workers):
    workers("w1")
    workers("w2")
    workers_up(2)  # the 2 s deadline starts with the task, not with the workers
    task, _ = start("deadline", {})
    wait_for(lambda: terminal(task), 30, message="the deadline was not enforced")
    assert task.status == "cancelled"
    assert statuses(task) == {"early": "compensated", "too_long": "cancelled"}
    requested = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert (requested.actor_name, requested.details["by"]) == ("system", "deadline")
    assert task.cancelled_at is not None
    assert (task.cancelled_at - task.created_at).total_seconds() < 2 + 4


@pytest.mark.parametrize(
    ("quick_fails", "task_status", "quick_status"),
    [(False, "completed", "succeeded"), (True, "compensated", "failed")],
    ids=["first-to-settle-succeeds", "first-to-settle-fails"],
)
def test_race_follows_the_first_branch_to_settle(workers, quick_fails, task_status, quick_status):
    workers("w1")
    workers("w2")
    workers_up(2)
    task, _ = start("first-answer", {"quick_fails": quick_fails})
    wait_for(lambda: terminal(task), 60, message="first-answer did not finish")
    assert task.status == task_status
    steps = statuses(task)
    assert steps["quick"] == quick_status
    assert steps["slow"] == "cancelled"  # stopped as soon as the race was decided
    group = task.steps.get(name="answer")
    if quick_fails:
        assert (group.status, steps["ask"]) == ("failed", "compensated")
    else:
        assert group.status == "succeeded"
        assert group.data == {"quick": {"answer": "quick"}}
        assert steps["ask"] == "succeeded"
    slow = StepAttempt.objects.get(step__task=task, step__name="slow")
    assert slow.finished_at is not None and slow.started_at is not None
    assert (slow.finished_at - slow.started_at).total_seconds() < 4  # never ran its 5 s
