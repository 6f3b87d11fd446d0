"""cancel(): honest outcomes for every status; stopped steps, then compensation in reverse."""

from __future__ import annotations

import pytest

from sagas.engine.connection import queue, redis
from sagas.engine.worker import SagaSimpleWorker
from sagas.models import AuditEntry, StepAttempt
from sagas.services import cancel, start
from sagas.states import TaskStatus
from sagas.transitions import transition
from tests.engine.conftest import drain, run_to_end

pytestmark = pytest.mark.django_db(transaction=True)


def test_cancel_of_a_pending_task_is_immediate_and_its_queued_step_never_runs(operator):
    task, _ = start("chaos", {})
    outcome = cancel(task.pk, operator, "changed my mind")
    assert (outcome.outcome, outcome.status, outcome.http_status) == ("cancelled", "cancelled", 202)
    drain()
    task.refresh_from_db()
    assert task.status == "cancelled"
    assert not StepAttempt.objects.filter(step__task=task).exists()
    assert set(task.steps.values_list("status", flat=True)) == {"skipped"}
    requested = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert (requested.actor, requested.details["reason"]) == (operator, "changed my mind")
    assert AuditEntry.objects.filter(task=task, action="cancelled").exists()
    assert (task.cancelled_by, task.cancel_reason) == (operator, "changed my mind")


def test_cancel_between_steps_compensates_what_succeeded_in_reverse(operator):
    task, _ = start("chaos", {"fail": {"ship": 1}})
    # One pass: reserve and charge succeed, ship fails and waits for its scheduled retry.
    SagaSimpleWorker([queue()], connection=redis()).work(burst=True)
    task.refresh_from_db()
    assert task.status == "waiting_retry"
    outcome = cancel(task.pk, operator)
    assert (outcome.outcome, outcome.status) == ("cancelled", "cancelling")
    task = run_to_end(task)
    assert task.status == "cancelled"
    statuses = dict(task.steps.values_list("name", "status"))
    assert statuses == {"reserve": "compensated", "charge": "compensated", "ship": "cancelled"}
    order = list(
        StepAttempt.objects.filter(step__task=task, kind="compensation")
        .order_by("started_at")
        .values_list("step__name", flat=True)
    )
    assert order == ["charge", "reserve"]
    assert task.steps.get(name="ship").attempt_count == 1  # its scheduled retry never ran


@pytest.mark.parametrize(
    ("status", "outcome", "http_status"),
    [
        ("completed", "already_completed", 409),
        ("compensating", "already_finished", 409),
        ("failed", "already_finished", 409),
        ("compensated", "already_finished", 409),
        ("compensation_failed", "already_finished", 409),
        ("resolved", "already_finished", 409),
        ("cancelling", "already_cancelled", 200),
        ("cancelled", "already_cancelled", 200),
    ],
)
def test_cancel_of_a_task_that_cannot_be_stopped_changes_nothing(status, outcome, http_status):
    task, _ = start("chaos", {})
    path = {
        "completed": ["running", "completed"],
        "compensating": ["running", "compensating"],
        "failed": ["running", "failed"],
        "compensated": ["running", "compensating", "compensated"],
        "compensation_failed": ["running", "compensating", "compensation_failed"],
        "resolved": ["running", "failed", "resolved"],
        "cancelling": ["running", "cancelling"],
        "cancelled": ["cancelled"],
    }[status]
    for step in path:
        assert transition(task, TaskStatus(step))
    entries = AuditEntry.objects.filter(task=task).count()
    result = cancel(task.pk)
    assert (result.outcome, result.status, result.http_status) == (outcome, status, http_status)
    task.refresh_from_db()
    assert task.status == status
    assert AuditEntry.objects.filter(task=task).count() == entries


def test_not_found_and_not_cancellable():
    assert cancel("00000000-0000-0000-0000-000000000000").outcome == "not_found"
    assert cancel("nonsense").http_status == 404
    task, _ = start("flaky-service", {})
    result = cancel(task.pk)
    assert (result.outcome, result.http_status) == ("not_cancellable", 409)
    task.refresh_from_db()
    assert task.status == "pending"
