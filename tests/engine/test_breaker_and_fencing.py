"""Breakers are shared across workers and never burn retries; superseded attempts write nothing."""

from __future__ import annotations

import time

import pytest

from sagas.definitions import CircuitBreakerPolicy
from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import queue, redis
from sagas.engine.executor import Outcome, settle_attempt
from sagas.engine.worker import SagaSimpleWorker
from sagas.models import AuditEntry, StepAttempt
from sagas.services import start
from sagas.states import AttemptOutcome, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.engine.conftest import (
    drain,
    hold_reaper,
    move_due_scheduled_jobs,
    next_scheduled_in,
)

pytestmark = pytest.mark.django_db(transaction=True)

FLAKY = CircuitBreakerPolicy("flaky", failure_threshold=2, open_seconds=3)


def work_as(name: str, max_jobs: int | None = None) -> None:
    """Run what is due as the named worker (waiting for the next scheduled retry first).

    A 10 ms retry is often already due when its transaction commits, so it goes straight
    to the queue: ``max_jobs=1`` keeps one call to one attempt.
    """
    hold_reaper()  # its passes would count as jobs too
    wait = next_scheduled_in()
    if wait is not None and not queue().count:
        time.sleep(wait + 0.05)
    move_due_scheduled_jobs()
    worker = SagaSimpleWorker([queue()], connection=redis(), name=name)
    worker.work(burst=True, max_jobs=max_jobs)


def test_a_breaker_opened_by_one_worker_is_open_for_another_and_costs_no_retry():
    first, _ = start("flaky-service", {"fail_first": 2})
    work_as("worker-a", max_jobs=1)  # attempt 1 fails
    assert CircuitBreaker(redis(), FLAKY).state().status(time.time()) == "closed"
    work_as("worker-a", max_jobs=1)  # attempt 2 fails: threshold reached, breaker opens
    assert first.steps.get().attempt_count == 2
    assert CircuitBreaker(redis(), FLAKY).state().status(time.time()) == "open"

    second, _ = start("flaky-service", {})
    work_as("worker-b")  # another worker: sees it open, does not attempt
    step = second.steps.get()
    assert step.attempt_count == 0
    assert not StepAttempt.objects.filter(step=step).exists()
    assert step.status == "waiting_retry"
    entry = AuditEntry.objects.get(task=second, action="breaker_open")
    assert entry.details["breaker"] == "flaky"
    assert step.next_attempt_at is not None
    assert step.next_attempt_at.timestamp() >= CircuitBreaker(redis(), FLAKY).state().open_until

    # Once it half-opens, one trial goes through, succeeds and closes the breaker; both
    # tasks complete and neither spent a retry while the breaker was open.
    drain(timeout=30)
    second.refresh_from_db()
    first.refresh_from_db()
    assert (first.status, second.status) == ("completed", "completed")
    assert second.steps.get().attempt_count == 1
    assert first.steps.get().attempt_count == 3
    assert CircuitBreaker(redis(), FLAKY).state().status(time.time()) == "closed"


def test_a_superseded_attempt_cannot_record_its_result():
    task, _ = start("chaos", {"sleep_ms": {"reserve": 10}})
    step = task.steps.get(name="reserve")
    transition(task, TaskStatus.RUNNING)
    attempt = StepAttempt.objects.create(
        step=step, kind="action", number=1, lock_token="old-token", worker="old"
    )
    step.attempt_count = 1
    step.save(update_fields=["attempt_count"])
    # The reaper already judged the attempt lost ...
    StepAttempt.objects.filter(pk=attempt.pk).update(outcome=AttemptOutcome.LOST)
    # ... so the late success of the old worker is refused and changes nothing.
    late = Outcome(AttemptOutcome.SUCCEEDED, data={"late": True})
    assert settle_attempt(attempt.pk, late, token="old-token") is False
    step.refresh_from_db()
    attempt.refresh_from_db()
    assert (step.status, step.data, attempt.outcome) == ("pending", None, "lost")


def test_a_result_with_the_wrong_lock_token_is_refused():
    task, _ = start("chaos", {})
    step = task.steps.get(name="reserve")
    attempt = StepAttempt.objects.create(
        step=step, kind="action", number=1, lock_token="current", worker="w"
    )
    ok = Outcome(AttemptOutcome.SUCCEEDED, data={})
    assert settle_attempt(attempt.pk, ok, token="someone-else") is False
    attempt.refresh_from_db()
    assert attempt.outcome == "running"


def test_a_second_success_of_one_step_is_refused_and_recorded_as_a_duplicate():
    """The database is the final judge of exactly-once: a late attempt that succeeds after
    another attempt of the same step already did is recorded as failed, never as a second
    success, and the step keeps the first result."""
    task, _ = start("chaos", {})
    step = task.steps.get(name="reserve")
    transition(task, TaskStatus.RUNNING)
    assert transition_step(step, StepStatus.RUNNING)
    first = StepAttempt.objects.create(
        step=step, kind="action", number=1, lock_token="t1", worker="w1"
    )
    late = StepAttempt.objects.create(
        step=step, kind="action", number=2, lock_token="t2", worker="w2"
    )
    step.attempt_count = 2
    step.save(update_fields=["attempt_count"])
    assert settle_attempt(first.pk, Outcome(AttemptOutcome.SUCCEEDED, data={"n": 1}), token="t1")
    second = Outcome(AttemptOutcome.SUCCEEDED, data={"n": 2})
    assert settle_attempt(late.pk, second, token="t2") is False
    late.refresh_from_db()
    step.refresh_from_db()
    assert (late.outcome, late.error) == (
        "failed",
        "result refused: another attempt already succeeded",
    )
    assert (step.status, step.data) == ("succeeded", {"n": 1})
    refused = AuditEntry.objects.get(task=task, action="duplicate_delivery")
    assert refused.details == {"kind": "action", "attempt": 2, "refused": "second success"}
    assert StepAttempt.objects.filter(step=step, outcome="succeeded").count() == 1
