"""The chaos saga end to end, jobs run in-process by a SimpleWorker (works on SQLite too)."""

from __future__ import annotations

import pytest

from sagas.models import AuditEntry, StepAttempt
from sagas.services import start
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)


def statuses(task):
    return {s.name: s.status for s in task.steps.all()}


def test_happy_path_completes():
    task, _ = start("chaos", {})
    task = run_to_end(task)
    assert task.status == "completed"
    assert statuses(task) == {"reserve": "succeeded", "charge": "succeeded", "ship": "succeeded"}
    assert task.steps.get(name="charge").data == {"payment": f"P-{task.pk}", "attempt": 1}


def test_retries_then_completes():
    task, _ = start("chaos", {"fail": {"charge": 2}})
    task = run_to_end(task)
    assert task.status == "completed"
    charge = task.steps.get(name="charge")
    assert charge.attempt_count == 3
    outcomes = list(charge.attempts.order_by("number").values_list("outcome", flat=True))
    assert outcomes == ["failed", "failed", "succeeded"]
    assert AuditEntry.objects.filter(task=task, action="retry_scheduled").count() == 2


def test_exhausted_compensates_in_reverse():
    task, _ = start("chaos", {"fail": {"charge": -1}})
    task = run_to_end(task)
    assert task.status == "compensated"
    assert statuses(task) == {"reserve": "compensated", "charge": "failed", "ship": "skipped"}
    assert not StepAttempt.objects.filter(step__task=task, step__name="ship").exists()


@pytest.mark.parametrize(
    ("policy", "expected"), [("fail", "failed"), ("dead_letter", "dead_lettered")]
)
def test_exhaustion_policies(policy, expected):
    task, _ = start("chaos", {"fail": {"charge": -1}, "on_exhausted": policy})
    task = run_to_end(task)
    assert task.status == expected
    assert task.steps.get(name="reserve").status == "succeeded"


def test_compensation_failure():
    task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    task = run_to_end(task)
    assert task.status == "compensation_failed"
    assert statuses(task) == {
        "reserve": "compensation_failed",
        "charge": "compensated",
        "ship": "failed",
    }
    entry = AuditEntry.objects.get(task=task, action="compensation_failed")
    assert set(entry.details) >= {"step_name", "error", "trace_id", "attempt_count", "stack_trace"}
    assert entry.details["attempt_count"] == 3
