"""Cancellation under real forking workers: cooperative stop, forced stop, races."""

from __future__ import annotations

import time

import pytest

from sagas.models import AuditEntry, StepAttempt
from sagas.services import cancel, start
from tests.engine.conftest import terminal, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def running_attempt(task, step):
    return StepAttempt.objects.filter(step__task=task, step__name=step, outcome="running").first()


def test_cancel_stops_a_sleeping_step_within_a_second_and_compensates_in_reverse(
    workers, operator, client
):
    from sagas.models import ApiToken

    token = ApiToken(user=operator, name="on-call laptop")
    bearer = token.generate_key()
    token.save()
    workers("w1")
    task, _ = start("chaos", {"sleep_ms": {"ship": 5000}})
    attempt = wait_for(lambda: running_attempt(task, "ship"), 30, message="ship never started")
    time.sleep(1)
    asked = time.monotonic()
    response = client.delete(
        f"/api/distributed-tasks/chaos/{task.pk}",
        data={"reason": "customer called"},
        content_type="application/json",
        headers={"Authorization": f"Bearer {bearer}"},
    )
    assert response.status_code == 202
    assert response.json() == {"outcome": "cancelled", "status": "cancelling"}
    wait_for(lambda: StepAttempt.objects.get(pk=attempt.pk).outcome != "running", 5)
    assert time.monotonic() - asked < 1.0
    wait_for(lambda: terminal(task), 30, message="cancel did not finish")
    assert task.status == "cancelled"
    attempt.refresh_from_db()
    assert attempt.outcome == "cancelled"
    statuses = dict(task.steps.values_list("name", "status"))
    assert statuses == {"reserve": "compensated", "charge": "compensated", "ship": "cancelled"}
    compensated = list(
        StepAttempt.objects.filter(step__task=task, kind="compensation")
        .order_by("started_at")
        .values_list("step__name", flat=True)
    )
    assert compensated == ["charge", "reserve"]
    requested = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert requested.actor == operator
    assert AuditEntry.objects.filter(task=task, action="cancelled").exists()
    # Honest state: it was cancelling, never cancelled, while the step still ran.
    assert AuditEntry.objects.filter(task=task, to_status="cancelling").exists()


def test_a_step_that_ignores_cancellation_is_stopped_after_the_grace_period(workers):
    # No reaper pass during the test: the stop must come from the worker's own parent.
    workers("w1", SAGAS_CANCEL_GRACE="2s", SAGAS_REAPER_INTERVAL="1h")
    task, _ = start("deaf", {})
    attempt = wait_for(lambda: running_attempt(task, "ignore_cancel"), 30, message="not started")
    asked = time.monotonic()
    assert cancel(task.pk).status == "cancelling"
    wait_for(lambda: terminal(task), 30, message="deaf step was never stopped")
    stopped_after = time.monotonic() - asked
    assert 2 <= stopped_after < 6, stopped_after
    attempt.refresh_from_db()
    assert attempt.outcome == "cancelled"
    assert task.status == "cancelled"
    assert dict(task.steps.values_list("name", "status")) == {
        "book": "compensated",
        "ignore_cancel": "cancelled",
    }


def test_cancel_racing_the_last_step_ends_in_exactly_one_consistent_state(workers):
    workers("w1")
    workers("w2")
    results = []
    # ship works 300 ms: early cancels beat it, late ones find the task completed, and
    # the ones around 300 ms race its completion for the task row.
    for delay in (0.05, 0.1, 0.2, 0.25, 0.28, 0.3, 0.32, 0.35, 0.5, 0.8):
        task, _ = start("chaos", {"sleep_ms": {"ship": 300}})
        wait_for(lambda task=task: running_attempt(task, "ship"), 30, message="no ship")
        time.sleep(delay)
        results.append((task, cancel(task.pk)))
    for task, outcome in results:
        wait_for(lambda task=task: terminal(task), 60, message=f"{task.pk} stuck")
        compensations = StepAttempt.objects.filter(step__task=task, kind="compensation")
        if outcome.outcome == "already_completed":
            assert outcome.http_status == 409
            assert task.status == "completed"
            assert not compensations.exists()
        else:
            assert (outcome.outcome, outcome.http_status) == ("cancelled", 202)
            assert task.status == "cancelled"
            assert set(task.steps.values_list("status", flat=True)) <= {
                "compensated",
                "cancelled",
            }
    assert {t.status for t, _ in results} == {"completed", "cancelled"}  # both sides won
