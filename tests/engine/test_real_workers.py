"""The engine under real forking workers with their scheduler: retries, duplicates, crashes.

Worker processes cannot see an in-memory SQLite test database, so these run on Postgres.
"""

from __future__ import annotations

import time

import pytest

from sagas.engine import dispatch
from sagas.engine.connection import redis
from sagas.models import AuditEntry, StepAttempt
from sagas.services import start
from sagas.states import AttemptKind
from tests.engine.conftest import kill_tree, terminal, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_scheduled_retries_follow_the_policy(workers):
    workers("w1")
    task, _ = start("chaos", {"fail": {"charge": 2}})
    wait_for(lambda: terminal(task), 60, message="chaos task did not finish")
    assert task.status == "completed"
    charge = task.steps.get(name="charge")
    assert charge.attempt_count == 3
    attempts = list(charge.attempts.order_by("number"))
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    # chaos retries: exponential from 20 ms -> 20 ms, then 40 ms; RQ's scheduler rounds
    # up to whole seconds, so each gap is at least the delay and at most ~2 s more.
    scheduled = AuditEntry.objects.filter(task=task, action="retry_scheduled").order_by("id")
    assert [e.details["delay_ms"] for e in scheduled] == [20, 40]
    for before, after, delay_ms in zip(attempts, attempts[1:], (20, 40), strict=False):
        assert before.finished_at is not None
        gap = (after.started_at - before.finished_at).total_seconds()
        assert delay_ms / 1000 <= gap < delay_ms / 1000 + 2.5, gap


def test_one_job_delivered_twice_to_two_workers_succeeds_once(workers):
    task, _ = start("chaos", {"sleep_ms": {"reserve": 1500}})
    reserve = task.steps.get(name="reserve")
    # The normal enqueue happened at commit; deliver the same attempt a second time.
    duplicate = dispatch.job_id(task.pk, "reserve", AttemptKind.ACTION, 1, "dup")
    assert dispatch.enqueue(str(task.pk), "reserve", AttemptKind.ACTION, 1, duplicate)
    workers("w1")
    workers("w2")
    wait_for(lambda: terminal(task), 60, message="task did not finish")
    assert task.status == "completed"
    reserve.refresh_from_db()
    assert reserve.attempt_count == 1
    assert StepAttempt.objects.filter(step=reserve, outcome="succeeded").count() == 1
    # The second delivery is refused (it may arrive after the task already completed).
    refused = AuditEntry.objects.filter(task=task, action="duplicate_delivery")
    wait_for(refused.exists, 30, message="the second delivery left no trace")
    assert StepAttempt.objects.filter(step=reserve).count() == 1


def test_kill_9_of_worker_and_horse_mid_step_is_recovered_by_the_reaper(workers):
    doomed = workers("doomed")
    task, _ = start("chaos", {"sleep_ms": {"ship": 4000}})
    running = wait_for(
        lambda: StepAttempt.objects.filter(
            step__task=task, step__name="ship", outcome="running"
        ).first(),
        30,
        message="ship never started",
    )
    kill_tree(doomed.pid)  # the worker and its work horse, SIGKILL: no finally runs
    workers("rescuer")
    wait_for(lambda: terminal(task), 90, message="task was not recovered")
    assert task.status == "completed"
    running.refresh_from_db()
    assert running.outcome == "lost"
    ship = task.steps.get(name="ship")
    assert ship.attempt_count == 2
    for step in task.steps.all():
        assert step.attempts.filter(outcome="succeeded").count() == 1
    assert AuditEntry.objects.filter(task=task, action="attempt_lost").count() == 1


def test_flushall_mid_run_delays_but_loses_nothing(workers):
    tasks = [
        start("chaos", {"sleep_ms": {"charge": 1500}, "fail": {"ship": 1}})[0] for _ in range(3)
    ]
    tasks.append(start("chaos", {"fail": {"charge": -1}})[0])
    workers("w1")
    wait_for(
        lambda: StepAttempt.objects.filter(step__name="charge", outcome="running").exists(),
        30,
        message="nothing started",
    )
    redis().flushall()
    for task in tasks:
        wait_for(lambda task=task: terminal(task), 120, message=f"{task.pk} stuck")
    assert [t.status for t in tasks] == ["completed", "completed", "completed", "compensated"]


def test_workers_survive_their_database_connections_being_cut(workers):
    from django.db import connection

    worker = workers("w1")
    first, _ = start("chaos", {})
    wait_for(lambda: terminal(first), 30, message="first task did not finish")
    time.sleep(1.5)  # the worker's parent has run its reaper and holds a connection
    # What a Postgres restart does to every open session (ours included, last).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    connection.close()
    second, _ = start("chaos", {"fail": {"charge": 1}})
    wait_for(lambda: terminal(second), 60, message="worker did not reconnect")
    assert (first.status, second.status) == ("completed", "completed")
    time.sleep(2)  # a few more reaper passes in the parent, on its re-opened connection
    assert worker.log_path is not None
    assert "reaper pass failed" not in worker.log_path.read_text()
