"""The chaos saga end to end, jobs run in-process by a SimpleWorker (works on SQLite too)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import OperationalError

from sagas.engine.context import StepCancelled, StepContext
from sagas.examples import chaos
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
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


def test_a_slow_step_reports_its_progress_every_tenth(monkeypatch):
    seen: list[tuple[str, int, int]] = []  # (step, percent reported, then in the database)
    record_progress = StepContext.progress

    def recording(ctx, percent, message=""):
        record_progress(ctx, percent, message)
        stored = StepRecord.objects.get(task_id=ctx.task_id, name=ctx.step_name).progress
        seen.append((ctx.step_name, percent, stored))

    monkeypatch.setattr(StepContext, "progress", recording)
    task, _ = start("chaos", {"sleep_ms": {"charge": 400}})
    task = run_to_end(task)
    assert task.status == "completed"
    assert {step for step, _, _ in seen} == {"charge"}  # steps without sleep_ms report nothing
    percents = [percent for _, percent, _ in seen]
    assert percents == sorted(set(percents)) and percents[-1] == 100
    assert set(percents) <= set(range(10, 101, 10))
    assert len(percents) >= 5  # tenths 40 ms apart: a busy machine may merge a few
    assert all(stored == percent for _, percent, stored in seen)  # each one in the database
    charge = task.steps.get(name="charge")
    assert (charge.progress, charge.progress_message) == (100, "charge: 0.4 of 0.4 s")


def test_a_progress_write_that_fails_does_not_fail_the_step(monkeypatch):
    from django.db.models import QuerySet

    update = QuerySet.update
    failed_writes = []

    def unreachable_for_progress(queryset, **fields):
        if "progress_message" in fields:  # only ctx.progress's write meets the "outage"
            failed_writes.append(fields["progress"])
            raise OperationalError("server closed the connection unexpectedly")
        return update(queryset, **fields)

    monkeypatch.setattr(QuerySet, "update", unreachable_for_progress)
    task, _ = start("chaos", {"sleep_ms": {"reserve": 100}})
    task = run_to_end(task)
    assert task.status == "completed"
    assert task.steps.get(name="reserve").attempt_count == 1
    # Every report was tried and none failed the step (a loaded machine may skip a tenth).
    assert failed_writes[-1] == 100
    assert failed_writes == sorted(set(failed_writes))
    assert all(percent % 10 == 0 for percent in failed_writes)


class FakeContext:
    """Counts cancellation checks and progress reports; cancelled after ``cancel_after``."""

    def __init__(self, cancel_after: float = 60.0) -> None:
        self.began = time.monotonic()
        self.cancel_after = cancel_after
        self.checks: list[float] = []
        self.reports: list[int] = []

    def raise_if_cancelled(self) -> None:
        self.checks.append(time.monotonic() - self.began)
        if self.checks[-1] >= self.cancel_after:
            raise StepCancelled("cancelled")

    def progress(self, percent: int, message: str = "") -> None:
        self.reports.append(percent)
        time.sleep(0.02)  # a slow database write


def test_working_checks_for_cancellation_every_50_ms_while_reporting():
    ctx = FakeContext()
    chaos.work_for(ctx, 500, on_tenth=lambda tenths: ctx.progress(tenths * 10))
    assert ctx.reports == list(range(10, 101, 10))
    gaps = [later - earlier for earlier, later in zip(ctx.checks, ctx.checks[1:], strict=False)]
    assert max(gaps) < 0.1
    assert ctx.checks[-1] >= 0.5


def test_working_stops_soon_after_a_cancel():
    ctx = FakeContext(cancel_after=0.15)
    with pytest.raises(StepCancelled):
        chaos.work_for(ctx, 5000, on_tenth=lambda tenths: ctx.progress(tenths * 10))
    assert ctx.checks[-1] < 0.25
    assert ctx.reports == []  # the first tenth (500 ms) never came


def took(attempt: StepAttempt) -> timedelta:
    assert attempt.started_at is not None and attempt.finished_at is not None
    return attempt.finished_at - attempt.started_at


def test_compensation_sleep_makes_the_undo_take_that_long(monkeypatch):
    statuses_while_undoing: list[str] = []
    work_for = chaos.work_for

    def watching(ctx, milliseconds, on_tenth=None):
        if milliseconds and ctx.kind == "compensation":
            statuses_while_undoing.append(TaskInstance.objects.get(pk=ctx.task_id).status)
        work_for(ctx, milliseconds, on_tenth)

    monkeypatch.setattr(chaos, "work_for", watching)
    task, _ = start("chaos", {"fail": {"ship": -1}, "compensation_sleep_ms": {"reserve": 400}})
    task = run_to_end(task)
    assert task.status == "compensated"
    assert statuses_while_undoing == ["compensating"]
    undo = StepAttempt.objects.get(step__task=task, step__name="reserve", kind="compensation")
    assert undo.outcome == "succeeded"
    assert took(undo) >= timedelta(milliseconds=400)
    refund = StepAttempt.objects.get(step__task=task, step__name="charge", kind="compensation")
    assert took(refund) < timedelta(milliseconds=400)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (
            {"compensation_sleep_ms": {"reserve": -1}},
            "compensation_sleep_ms.reserve must be an integer >= 0",
        ),
        (
            {"compensation_sleep_ms": {"reserve": "3s"}},
            "compensation_sleep_ms.reserve must be an integer >= 0",
        ),
        (
            {"compensation_sleep_ms": {"reserve": True}},
            "compensation_sleep_ms.reserve must be an integer >= 0",
        ),
        (
            {"compensation_sleep_ms": {"teleport": 10}},
            "compensation_sleep_ms: unknown step 'teleport'",
        ),
        (
            {"compensation_sleep_ms": [3000]},
            "compensation_sleep_ms must be an object of step name -> integer",
        ),
        ({"sleep_ms": {"ship": -1}}, "sleep_ms.ship must be an integer >= 0"),
        ({"compensation_sleep": {"reserve": 10}}, "unknown input key 'compensation_sleep'"),
    ],
)
def test_bad_sleep_scripts_are_rejected(script, message):
    with pytest.raises(ValidationError) as excinfo:
        start("chaos", script)
    assert message in excinfo.value.messages
    assert not TaskInstance.objects.exists()
