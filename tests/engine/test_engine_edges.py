"""Timeouts, vanished step code, a busy lock, Redis down at commit, queue order, log context."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone
from redis import Redis
from rq import Queue

from sagas.definitions import registry
from sagas.engine import dispatch, stopping
from sagas.engine.connection import queue, redis
from sagas.engine.locks import TaskLock
from sagas.engine.logs import JsonFormatter, engine_logger
from sagas.engine.reaper import reap
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.services import request_cancel, start
from sagas.states import AttemptKind, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.engine.conftest import drain, reaper_watching, run_to_end

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_step_past_its_timeout_is_timed_out_and_retried():
    task, _ = start("slow-step", {})
    task = run_to_end(task)
    assert task.status == "completed"
    step = task.steps.get()
    outcomes = list(step.attempts.order_by("number").values_list("outcome", "error"))
    assert outcomes[0][0] == "timed_out"
    assert "timeout of 0.5 s" in outcomes[0][1]
    assert outcomes[1][0] == "succeeded"
    assert step.attempt_count == 2


def test_a_task_whose_step_was_removed_by_a_deploy_is_dead_lettered(monkeypatch, settings):
    # After handing the job back once for a worker that might have the step, it is parked.
    settings.SAGAS_CODE_REQUEUES = 1
    saga = registry.get("shrinking")
    task, _ = start("shrinking", {})
    monkeypatch.setattr(saga, "steps", saga.steps[:1])  # the deploy dropped "second"
    task = run_to_end(task)
    assert task.status == "dead_lettered"
    assert "step 'second' of saga 'shrinking' no longer exists" in task.error_summary
    assert task.steps.get(name="first").status == "succeeded"
    handed_back = AuditEntry.objects.get(task=task, action="code_missing")
    assert handed_back.details["attempt"] == 1
    parked = AuditEntry.objects.get(task=task, action="dead_lettered")
    assert parked.details["steps"] == ["second"]


def test_a_busy_lock_requeues_a_bounded_number_of_times_then_the_reaper_recovers(settings):
    settings.SAGAS_LOCK_REQUEUES = 2
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("chaos", {})
    squatter = TaskLock(redis(), task.pk, expiry_s=60)
    assert squatter.acquire()
    drain(timeout=30)
    task.refresh_from_db()
    assert task.status == "pending"
    assert AuditEntry.objects.filter(task=task, action="lock_busy").count() == 1
    squatter.release()
    report = reap(force=True)
    assert report is not None and len(report.requeued_jobs) == 1
    assert run_to_end(task).status == "completed"


def test_redis_down_at_commit_leaves_the_task_for_the_reaper(monkeypatch, caplog, settings):
    settings.SAGAS_REAPER_GRACE = 0
    dead = Queue("default", connection=Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    monkeypatch.setattr(dispatch, "queue", lambda: dead)
    _, created = start("chaos", {})  # no exception although nothing could be enqueued
    assert created
    assert "the reaper will retry" in caplog.text
    monkeypatch.undo()
    assert queue().count == 0
    reap(force=True)
    assert queue().count == 1


def test_compensation_jobs_jump_the_queue():
    for n in range(3):
        dispatch.enqueue(f"t{n}", "step", AttemptKind.ACTION, 1, f"saga-t{n}-step-a1")
    dispatch.enqueue("t9", "step", AttemptKind.COMPENSATION, 1, "saga-t9-step-c1")
    assert queue().job_ids[0] == "saga-t9-step-c1"


def test_job_ids_are_deterministic_and_safe():
    jid = dispatch.job_id("0b6f0f8e-7d2a-4a57-9d1c-5a0d6f4c3b21", "charge", "compensation", 3)
    assert jid == "saga-0b6f0f8e-7d2a-4a57-9d1c-5a0d6f4c3b21-charge-c3"
    assert all(c.isalnum() or c in "-_" for c in jid)
    assert dispatch.enqueue("x", "step", AttemptKind.ACTION, 1, "saga-x-step-a1-once") is True
    # The same id again (the reaper racing the normal path) is refused by RQ, not queued twice.
    assert dispatch.enqueue("x", "step", AttemptKind.ACTION, 1, "saga-x-step-a1-once") is False


def test_engine_log_lines_carry_task_and_w3c_trace_context(caplog):
    task, _ = start("chaos", {}, correlation_id="req-42")
    with caplog.at_level(logging.INFO, logger="sagas.engine"):
        engine_logger(task, step="reserve", attempt=1).info("hello")
    line = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert line["message"] == "hello"
    assert (line["task_id"], line["correlation_id"], line["step"]) == (
        str(task.pk),
        "req-42",
        "reserve",
    )
    version, trace_id, span_id, flags = line["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", task.trace_id, "01")
    assert len(span_id) == 16


def test_an_orphaned_claim_from_a_rolled_back_start_is_taken_over(caplog):
    from sagas.engine.idempotency import claim, claim_name

    task, _ = start("chaos", {})
    # A worker claimed attempt 1 of reserve, then its transaction rolled back.
    assert claim(redis(), claim_name(task.pk, "reserve", AttemptKind.ACTION, 1), "dead-worker")
    assert run_to_end(task).status == "completed"
    assert "had no attempt behind it" in caplog.text
    assert not AuditEntry.objects.filter(task=task, action="duplicate_delivery").exists()


def test_one_broken_item_does_not_stop_the_reaper(monkeypatch, settings):
    from sagas.engine import reaper

    settings.SAGAS_REAPER_GRACE = 0
    broken, _ = start("chaos", {})
    healthy, _ = start("chaos", {})
    queue().empty()  # both tasks lost their jobs
    real = reaper._rescue

    def flaky(task_id, report):
        if task_id == broken.pk:
            raise RuntimeError("poisoned row")
        return real(task_id, report)

    monkeypatch.setattr(reaper, "_rescue", flaky)
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if str(healthy.pk) in j]


@pytest.mark.postgres
def test_a_reaper_whose_clock_runs_fast_does_not_take_a_live_attempt_for_lost(monkeypatch):
    task, _ = start("chaos", {})
    step = task.steps.get(name="reserve")
    transition(task, TaskStatus.RUNNING)
    transition_step(step, StepStatus.RUNNING)
    lease = timedelta(seconds=registry.get("chaos").lock_expiry_s)
    attempt = StepAttempt.objects.create(
        step=step,
        kind="action",
        number=1,
        lock_token="t",
        worker="w",
        heartbeat_at=Now(),
        heartbeat_expires_at=Now() + lease,
    )
    StepRecord.objects.filter(pk=step.pk).update(attempt_count=1)
    reaper_watching()
    fast = timezone.now() + timedelta(hours=1)  # this worker's clock is an hour ahead
    monkeypatch.setattr(timezone, "now", lambda: fast)

    report = reap(force=True)
    assert report is not None and report.lost_attempts == []
    attempt.refresh_from_db()
    assert attempt.outcome == "running"

    # Judged on the database's clock, an attempt that really went silent is still lost.
    silent = Now() - timedelta(minutes=5)
    StepAttempt.objects.filter(pk=attempt.pk).update(
        heartbeat_at=silent, heartbeat_expires_at=silent + lease
    )
    report = reap(force=True)
    assert report is not None and report.lost_attempts == [attempt.pk]
    attempt.refresh_from_db()
    assert attempt.outcome == "lost"


def first_hotel_decided_while_stubborn_runs() -> tuple[TaskInstance, dict[str, StepRecord]]:
    """first-hotel after fast_hotel won: slow_hotel never started, stubborn_hotel still runs."""
    task, _ = start("first-hotel", {})
    queue().empty()  # the branches' own jobs: their outcome is written here
    with transaction.atomic():
        assert transition(task, TaskStatus.RUNNING)
        steps = {s.name: s for s in task.steps.all()}
        for name in ("fast_hotel", "stubborn_hotel"):
            assert transition_step(steps[name], StepStatus.RUNNING)
        assert transition_step(steps["fast_hotel"], StepStatus.SUCCEEDED)
        assert transition_step(steps["slow_hotel"], StepStatus.SKIPPED)
        assert transition_step(
            steps["offers"], StepStatus.SUCCEEDED, fields={"finished_at": timezone.now()}
        )
    return task, steps


def test_a_late_branch_whose_undo_code_vanished_still_lets_its_task_complete(monkeypatch, settings):
    settings.SAGAS_CODE_REQUEUES = 0  # no worker will have it: park at once
    task, steps = first_hotel_decided_while_stubborn_runs()
    with transaction.atomic():  # stubborn_hotel finished late and waits for its own undo
        assert transition_step(steps["stubborn_hotel"], StepStatus.SUCCEEDED)
        StepRecord.objects.filter(pk=steps["stubborn_hotel"].pk).update(compensate_alone=True)
        jid = dispatch.job_id(task.pk, "stubborn_hotel", AttemptKind.COMPENSATION, 1)
        dispatch.schedule(steps["stubborn_hotel"], AttemptKind.COMPENSATION, 1, jid)
    # ... and a deploy removed stubborn_hotel before its undo ran.
    saga = registry.get("first-hotel")
    original = saga.get_step
    monkeypatch.setattr(
        saga, "get_step", lambda name: None if name == "stubborn_hotel" else original(name)
    )

    task = run_to_end(task, timeout=30)
    assert task.status == "completed"
    stubborn = task.steps.get(name="stubborn_hotel")
    assert stubborn.status == "compensation_failed"
    assert "no longer exists in the deployed code" in stubborn.compensation_error
    assert AuditEntry.objects.filter(task=task, action="compensation_failed").count() == 1


def test_a_deadline_does_not_undo_a_task_whose_work_is_done():
    task, _ = first_hotel_decided_while_stubborn_runs()
    outcome = request_cancel(task.pk, None, "deadline passed", by="deadline")
    assert outcome.outcome == "work_done"
    task.refresh_from_db()
    assert task.status == "running"  # stubborn_hotel still runs; nothing was undone
    assert not AuditEntry.objects.filter(task=task, action="cancel_requested").exists()


def test_the_reaper_stops_a_branch_still_running_long_after_its_group_decided(settings):
    settings.SAGAS_CANCEL_GRACE = 0
    settings.SAGAS_REAPER_GRACE = 0
    task, steps = first_hotel_decided_while_stubborn_runs()
    attempt = StepAttempt.objects.create(
        step=steps["stubborn_hotel"], kind="action", number=1, job_id="saga-x", worker="w"
    )
    address = stopping.AttemptAddress(str(task.pk), "stubborn_hotel", "action", 1)
    assert stopping.signalled_at(redis(), address) is None  # its stop signal was lost

    reap(now=timezone.now() + timedelta(seconds=1), force=True)
    assert stopping.signalled_at(redis(), address) is not None
    attempt.refresh_from_db()
    assert attempt.outcome == "running"  # the worker's parent records the stop, not the reaper
