"""Redis and Postgres outages under real workers: no success lost, nothing declared lost in
bulk, no cancelled step left running. The workers reach Redis and Postgres through a
loopback proxy the test cuts and restores (tests/faults.py)."""

from __future__ import annotations

import time

import pytest

from sagas.engine.connection import redis
from sagas.models import AuditEntry, StepAttempt
from sagas.services import cancel, start
from tests.engine.conftest import (
    database_url_via,
    redis_url_via,
    terminal,
    wait_for,
    workers_up,
)

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def running(task, step):
    return StepAttempt.objects.filter(step__task=task, step__name=step, outcome="running").first()


def test_a_step_that_returns_while_redis_is_down_still_records_its_success(workers, redis_proxy):
    workers("w1", REDIS_URL=redis_url_via(redis_proxy))
    task, _ = start("chaos", {"sleep_ms": {"reserve": 2500}})
    attempt = wait_for(lambda: running(task, "reserve"), 30, message="reserve never started")
    with redis_proxy.outage():
        # The body returns during the outage: its lock cannot be released, its next job
        # cannot be enqueued, but its success must reach the database.
        wait_for(
            lambda: StepAttempt.objects.get(pk=attempt.pk).outcome != "running",
            20,
            message="the success was never recorded while Redis was down",
        )
        attempt.refresh_from_db()
        assert attempt.outcome == "succeeded"
        time.sleep(1)
    # Redis is back: the reaper enqueues what could not be enqueued, and the side effect
    # of reserve ran exactly once.
    wait_for(lambda: terminal(task), 60, message="task did not finish after Redis came back")
    assert task.status == "completed"
    reserve = task.steps.get(name="reserve")
    assert reserve.attempt_count == 1
    assert list(reserve.attempts.values_list("outcome", flat=True)) == ["succeeded"]


def test_a_settle_rides_out_a_postgres_restart(workers, postgres_proxy):
    worker = workers("w1", DATABASE_URL=database_url_via(postgres_proxy))
    task, _ = start("chaos", {"sleep_ms": {"reserve": 2000}})
    attempt = wait_for(lambda: running(task, "reserve"), 30, message="reserve never started")
    with postgres_proxy.outage():
        time.sleep(8)  # the body returns about 1 s into the outage and cannot settle
    wait_for(lambda: terminal(task), 60, message="task did not finish after the restart")
    assert task.status == "completed"
    attempt.refresh_from_db()
    assert attempt.outcome == "succeeded"
    reserve = task.steps.get(name="reserve")
    assert reserve.attempt_count == 1  # recorded once: the side effect was not repeated
    assert worker.log_path is not None
    assert "database unreachable while settling" in worker.log_path.read_text()


def test_nothing_is_declared_lost_in_bulk_after_an_outage_longer_than_the_lock_expiry(
    workers, postgres_proxy
):
    # Two workers: one runs the long step, the other runs reaper passes every second.
    for name in ("w1", "w2"):
        workers(name, DATABASE_URL=database_url_via(postgres_proxy))
    workers_up(2)
    task, _ = start("chaos", {"sleep_ms": {"reserve": 22000}})  # chaos: lock_expiry_s=10
    attempt = wait_for(lambda: running(task, "reserve"), 30, message="reserve never started")
    time.sleep(2)  # a few reaper passes watch the database before the outage
    with postgres_proxy.outage():
        time.sleep(13)  # longer than the lock expiry: every heartbeat looks stale after it
    # The first passes after the outage see a stale heartbeat, but the attempt is alive:
    # its heartbeat comes back within a third of the expiry.
    wait_for(lambda: terminal(task), 60, message="task did not finish")
    attempt.refresh_from_db()
    assert attempt.outcome == "succeeded"
    assert task.status == "completed"
    assert not AuditEntry.objects.filter(task=task, action="attempt_lost").exists()
    assert task.steps.get(name="reserve").attempt_count == 1


def test_a_step_that_ignores_its_cancel_is_stopped_after_redis_lost_everything(workers, settings):
    # Two workers, so reaper passes run while one is busy with the deaf step. The cancel is
    # decided in this process: it uses the workers' grace periods too.
    settings.SAGAS_CANCEL_GRACE = 2
    settings.SAGAS_REAPER_GRACE = 2
    for name in ("w1", "w2"):
        workers(name, SAGAS_CANCEL_GRACE="2s")
    workers_up(2)
    task, _ = start("deaf", {})  # ignore_cancel works 30 s and never looks
    attempt = wait_for(lambda: running(task, "ignore_cancel"), 30, message="not started")
    asked = time.monotonic()
    assert cancel(task.pk).status == "cancelling"
    redis().flushall()  # the stop signal and the job hash are gone
    wait_for(lambda: terminal(task), 25, message="the deaf step was never stopped")
    assert time.monotonic() - asked < 20  # not its 30 s of work, nor its job timeout
    attempt.refresh_from_db()
    assert attempt.outcome == "cancelled"
    assert task.status == "cancelled"
    assert dict(task.steps.values_list("name", "status")) == {
        "book": "compensated",
        "ignore_cancel": "cancelled",
    }
