"""Stopping steps under real forking workers: a stop nobody in the engine asked for, a stop
that lands while a finished step settles, a cancel while the first step runs, an attempt
the reaper declared lost, and what a breaker counts."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction
from rq.command import send_stop_job_command

from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import redis
from sagas.models import AuditEntry, StepAttempt, TaskInstance
from sagas.services import cancel, start
from tests.engine.conftest import terminal, wait_for, workers_up
from tests.engine.sagas_for_tests import call_fragile_service

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def running(task, step):
    return StepAttempt.objects.filter(step__task=task, step__name=step, outcome="running").first()


def attempts(task, step, kind="action"):
    query = StepAttempt.objects.filter(step__task=task, step__name=step, kind=kind)
    return list(query.order_by("number").values_list("outcome", flat=True))


def test_a_stop_job_from_outside_is_a_failed_attempt_that_is_retried(workers):
    workers("w1")
    task, _ = start("chaos", {"sleep_ms": {"charge": 3000}})
    attempt = wait_for(lambda: running(task, "charge"), 30, message="charge never started")
    send_stop_job_command(redis(), attempt.job_id)  # what RQ's dashboard or a script does
    wait_for(lambda: terminal(task), 60, message="the task was left running")
    assert task.status == "completed"
    attempt.refresh_from_db()
    assert attempt.outcome == "failed"
    assert attempt.error.startswith("stopped without a cancel")
    assert attempts(task, "charge") == ["failed", "succeeded"]
    assert AuditEntry.objects.filter(task=task, action="retry_scheduled").count() == 1


def test_a_branch_stopped_from_outside_is_retried_and_its_group_still_joins(workers):
    for name in ("w1", "w2"):
        workers(name)
    workers_up(2)
    task, _ = start("pair", {})  # left and right work 1.5 s each, side by side
    attempt = wait_for(lambda: running(task, "left"), 30, message="left never started")
    send_stop_job_command(redis(), attempt.job_id)
    wait_for(lambda: terminal(task), 60, message="the task was left running")
    assert task.status == "completed"
    assert attempts(task, "left") == ["failed", "succeeded"]
    assert task.steps.get(name="both").status == "succeeded"


class RowLock:
    """Holds a task's row lock from another connection, so its settle has to wait."""

    def __init__(self, task_id):
        self.task_id = task_id
        self.taken = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        try:
            with transaction.atomic():
                TaskInstance.objects.select_for_update().get(pk=self.task_id)
                self.taken.set()
                self.release.wait(30)
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        assert self.taken.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)


def settle_waits_for_the_row_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        row = cursor.fetchone()
        return bool(row and row[0] > 0)


def test_a_stop_that_lands_while_a_finished_step_settles_waits_for_the_settle(workers):
    worker = workers("w1")
    task, _ = start("settling", {})
    attempt = wait_for(lambda: running(task, "book_slowly"), 30, message="never started")
    with RowLock(task.pk):
        # The body returns after 1.5 s and its settle waits for the row lock we hold.
        wait_for(settle_waits_for_the_row_lock, 10, message="the settle never started")
        send_stop_job_command(redis(), attempt.job_id)
        wait_for(lambda: "deferred: it is settling" in worker.log_path.read_text(), 10)
    wait_for(lambda: terminal(task), 30, message="task did not finish")
    attempt.refresh_from_db()
    assert attempt.outcome == "succeeded"  # settled as what the body returned
    assert task.status == "completed"
    assert attempts(task, "book_slowly") == ["succeeded"]


def test_a_cancel_whose_stop_lands_during_the_settle_undoes_the_finished_step(workers, settings):
    # The grace runs out after the body returned (1.5 s), while its settle waits.
    settings.SAGAS_CANCEL_GRACE = 2
    worker = workers("w1", SAGAS_CANCEL_GRACE="2s")
    task, _ = start("settling", {})
    attempt = wait_for(lambda: running(task, "book_slowly"), 30, message="never started")
    assert cancel(task.pk).status == "cancelling"
    with RowLock(task.pk):
        wait_for(settle_waits_for_the_row_lock, 10, message="the settle never started")
        wait_for(lambda: "deferred: it is settling" in worker.log_path.read_text(), 10)
    wait_for(lambda: terminal(task), 30, message="task did not finish")
    assert task.status == "cancelled"
    attempt.refresh_from_db()
    assert attempt.outcome == "succeeded"
    step = task.steps.get(name="book_slowly")
    assert step.status == "compensated"  # its side effect happened, so it was undone
    assert attempts(task, "book_slowly", "compensation") == ["succeeded"]


def test_cancelling_while_the_first_step_runs_stops_it_and_undoes_nothing(workers):
    workers("w1")
    task, _ = start("chaos", {"sleep_ms": {"reserve": 5000}})
    attempt = wait_for(lambda: running(task, "reserve"), 30, message="reserve never started")
    outcome = cancel(task.pk)
    assert (outcome.outcome, outcome.status) == ("cancelled", "cancelling")
    wait_for(lambda: terminal(task), 20, message="cancel did not finish")
    assert task.status == "cancelled"
    attempt.refresh_from_db()
    assert attempt.outcome == "cancelled"
    assert dict(task.steps.values_list("name", "status")) == {
        "reserve": "cancelled",
        "charge": "skipped",
        "ship": "skipped",
    }
    assert not StepAttempt.objects.filter(step__task=task, kind="compensation").exists()


def test_a_first_step_that_succeeds_despite_its_cancel_is_compensated(workers):
    workers("w1")
    task, _ = start("settling", {})  # book_slowly ignores ctx.cancelled and succeeds
    wait_for(lambda: running(task, "book_slowly"), 30, message="never started")
    outcome = cancel(task.pk)
    assert (outcome.outcome, outcome.status) == ("cancelled", "cancelling")
    task.refresh_from_db()
    assert task.status == "cancelling"  # never "cancelled" while the step still runs
    wait_for(lambda: terminal(task), 30, message="cancel did not finish")
    assert task.status == "cancelled"
    assert task.steps.get(name="book_slowly").status == "compensated"
    assert attempts(task, "book_slowly") == ["succeeded"]
    assert attempts(task, "book_slowly", "compensation") == ["succeeded"]


def test_an_attempt_declared_lost_sees_ctx_cancelled_within_one_heartbeat(workers):
    workers("w1")
    task, _ = start("watchful", {})  # lock_expiry_s=3: a heartbeat every second
    attempt = wait_for(lambda: running(task, "watch_for_stop"), 30, message="never started")
    time.sleep(0.5)
    declared = time.time()
    # What the reaper does to an attempt it takes for lost (its own signal not needed).
    StepAttempt.objects.filter(pk=attempt.pk).update(outcome="lost")
    saw = wait_for(lambda: redis().get(f"test:saw-stop:{task.pk}"), 10, message="never saw it")
    # One heartbeat interval (1 s), plus the body's poll and scheduling slack.
    assert float(saw) - declared <= 2.0
    attempt.refresh_from_db()
    assert attempt.outcome == "lost"  # the superseded attempt wrote nothing


def test_cancelled_attempts_never_count_as_breaker_failures(workers):
    workers("w1")
    policy = call_fragile_service.breaker
    assert policy is not None and policy.failure_threshold == 1
    task, _ = start("tripwire", {})
    wait_for(lambda: running(task, "call_fragile_service"), 30, message="never started")
    cancel(task.pk)
    wait_for(lambda: terminal(task), 30, message="cancel did not finish")
    assert attempts(task, "call_fragile_service") == ["cancelled"]
    state = CircuitBreaker(redis(), policy).state()
    assert (state.failures, state.status(time.time())) == (0, "closed")
