"""Redrive, the reaper's rescue of tasks left behind, and its liveness judgement (in-process
SimpleWorker, works on SQLite too)."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from sagas.definitions import registry
from sagas.engine.connection import queue, redis
from sagas.engine.executor import Outcome, run_step, settle_attempt
from sagas.engine.locks import TaskLock
from sagas.engine.reaper import reap
from sagas.engine.worker import SagaSimpleWorker
from sagas.models import AuditEntry, StepAttempt, StepRecord
from sagas.services import cancel, redrive, start
from sagas.states import AttemptOutcome, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.engine.conftest import (
    hold_reaper,
    move_due_scheduled_jobs,
    reaper_watching,
    run_to_end,
)

pytestmark = pytest.mark.django_db(transaction=True)


def statuses(task):
    return dict(task.steps.values_list("name", "status"))


def run_one_job() -> None:
    hold_reaper()
    move_due_scheduled_jobs()
    SagaSimpleWorker([queue()], connection=redis()).work(burst=True, max_jobs=1)


def forget_all_jobs() -> None:
    """What a flushed or failed-over Redis leaves: no queued and no scheduled job."""
    queue().empty()
    scheduled = queue().scheduled_job_registry
    for jid in scheduled.get_job_ids():
        scheduled.remove(jid, delete_job=True)


# --- redrive ---------------------------------------------------------------------------------


def test_redrive_retries_the_step_that_parked_the_task_not_the_last_failed_one(operator):
    task, _ = start("redrive-dag", {})
    task = run_to_end(task)
    # side_broken failed (all_settled lets it), then parks ran out of retries: parked.
    assert task.status == "dead_lettered"
    assert statuses(task)["side_broken"] == "failed"
    assert statuses(task)["parks"] == "failed"

    redrive(task.pk, operator, "the service parks calls is back")
    task = run_to_end(task)
    assert task.status == "completed"
    parks = task.steps.get(name="parks")
    assert (parks.status, parks.attempt_count) == ("succeeded", 3)
    broken = task.steps.get(name="side_broken")
    assert (broken.status, broken.attempt_count) == ("failed", 1)  # not redriven
    entry = AuditEntry.objects.get(task=task, action="redriven")
    assert entry.details["steps"] == ["parks"]


def test_a_branch_parked_because_its_code_was_missing_is_redriven_into_its_group(
    operator, monkeypatch, settings
):
    settings.SAGAS_CODE_REQUEUES = 0  # no worker has it: park at once
    saga = registry.get("branch-rollout")
    original = saga.get_step
    monkeypatch.setattr(
        saga, "get_step", lambda name: None if name == "shipped_later" else original(name)
    )
    task, _ = start("branch-rollout", {})
    task = run_to_end(task)
    assert task.status == "dead_lettered"
    assert "no longer exists" in task.steps.get(name="shipped_later").error
    assert statuses(task)["fan"] == "running"  # waits for its branch, does not decide

    monkeypatch.undo()  # the code is deployed everywhere now
    redrive(task.pk, operator, "deployed the new branch")
    task = run_to_end(task)
    assert task.status == "completed"
    fan = task.steps.get(name="fan")
    assert fan.status == "succeeded"
    assert fan.data == {"known": {"known": True}, "shipped_later": {"new": True}}


# --- the reaper: work left behind, whatever the step fields say -------------------------------


def test_the_reaper_finds_a_task_with_work_to_do_and_no_job_whatever_its_steps_say(settings):
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("chaos", {})
    forget_all_jobs()
    StepRecord.objects.filter(task=task).update(job_id="")  # no trace of a job anywhere
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if "-reserve-a1" in j]
    assert run_to_end(task).status == "completed"


def test_a_late_lock_requeue_cannot_hide_the_compensation_job_from_the_reaper(settings):
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("chaos", {})
    run_one_job()  # reserve succeeds
    assert cancel(task.pk).status == "cancelling"  # its compensation is queued
    reserve = task.steps.get(name="reserve")
    compensation_job = reserve.job_id
    assert "-reserve-c1" in compensation_job

    squatter = TaskLock(redis(), task.pk, expiry_s=60)
    assert squatter.acquire()
    run_step(str(task.pk), "reserve", "action", 1)  # a late duplicate of reserve's action
    reserve.refresh_from_db()
    assert reserve.job_id == compensation_job  # not overwritten by the late action's re-queue

    forget_all_jobs()  # ... and then Redis loses the compensation's job
    squatter.release()
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if "-reserve-c1-r" in j]
    task = run_to_end(task)
    assert task.status == "cancelled"
    assert statuses(task)["reserve"] == "compensated"


def start_branches(task, names):
    """Branches of a started group running, each with an attempt row (as a worker would)."""
    attempts = {}
    transition(task, TaskStatus.RUNNING)
    for step in task.steps.filter(name__in=names):
        assert transition_step(step, StepStatus.RUNNING, fields={"attempt_count": 1})
        attempts[step.name] = StepAttempt.objects.create(
            step=step, kind="action", number=1, lock_token="t", worker="w"
        )
    return attempts


def test_the_reaper_rebuilds_a_late_branchs_lost_compensation_job(settings):
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("first-hotel", {})
    forget_all_jobs()
    attempts = start_branches(task, ["fast_hotel", "stubborn_hotel"])
    ok = Outcome(AttemptOutcome.SUCCEEDED, data={"hotel": "x"})
    assert settle_attempt(attempts["fast_hotel"].pk, ok)  # the group decides: fast wins
    assert settle_attempt(attempts["stubborn_hotel"].pk, ok)  # a late success: undo it alone
    stubborn = task.steps.get(name="stubborn_hotel")
    assert stubborn.compensate_alone and "-stubborn_hotel-c1" in stubborn.job_id

    forget_all_jobs()  # the late branch's compensation job is lost
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if "-stubborn_hotel-c1-r" in j]
    task = run_to_end(task)
    assert task.status == "completed"
    assert statuses(task)["stubborn_hotel"] == "compensated"


def test_a_deadline_never_cancels_a_parked_task(settings):
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("deadline", {})  # deadline_s=2
    forget_all_jobs()
    assert transition(task, TaskStatus.RUNNING)
    assert transition(task, TaskStatus.DEAD_LETTERED)  # parked for its operator
    from sagas.engine.deadlines import enforce

    assert enforce(str(task.pk)) == "parked"
    reap(now=task.created_at + timedelta(seconds=10), force=True)
    task.refresh_from_db()
    assert task.status == "dead_lettered"
    assert not AuditEntry.objects.filter(task=task, action="cancel_requested").exists()


def test_an_unknown_worker_hands_a_compensation_back_instead_of_failing_it(monkeypatch, settings):
    settings.SAGAS_CODE_REQUEUES = 2
    task, _ = start("chaos", {})
    run_one_job()  # reserve
    run_one_job()  # charge
    assert cancel(task.pk).status == "cancelling"  # charge's compensation is queued
    saga = registry.get("chaos")
    original = saga.get_step
    monkeypatch.setattr(saga, "get_step", lambda n: None if n == "charge" else original(n))
    run_step(str(task.pk), "charge", "compensation", 1)  # an old worker, without charge
    assert statuses(task)["charge"] == "succeeded"  # not compensation_failed
    entry = AuditEntry.objects.get(task=task, action="code_missing")
    assert entry.details["kind"] == "compensation"
    monkeypatch.undo()
    task = run_to_end(task)
    assert task.status == "cancelled"
    assert statuses(task)["charge"] == "compensated"


# --- liveness: lost, or not yet --------------------------------------------------------------


def silent_attempt(saga: str, silent_for: timedelta) -> StepAttempt:
    """A running attempt whose last heartbeat was ``silent_for`` ago."""
    task, _ = start(saga, {})
    forget_all_jobs()
    step = task.steps.order_by("index").first()
    assert step is not None
    transition(task, TaskStatus.RUNNING)
    transition_step(step, StepStatus.RUNNING, fields={"attempt_count": 1})
    lease = timedelta(seconds=registry.get(saga).lock_expiry_s)
    return StepAttempt.objects.create(
        step=step,
        kind="action",
        number=1,
        lock_token="t",
        worker="w",
        heartbeat_at=Now() - silent_for,
        heartbeat_expires_at=Now() - silent_for + lease,
    )


def admitted(saga_name: str):
    """An attempt admitted by the executor, as a worker starts it (its row, its lease)."""
    from sagas.engine import executor
    from sagas.engine.logs import engine_logger

    task, _ = start(saga_name, {})
    forget_all_jobs()
    saga = registry.get(saga_name)
    step = saga.steps[0]
    delivery = executor.Delivery(str(task.pk), step.name, "action", 1, "job-1", "w")
    lock = TaskLock(redis(), task.pk, saga.lock_expiry_s)
    started = executor._admit(delivery, saga, step, lock, engine_logger(task))
    assert started is not None
    return started


def test_each_attempt_beats_against_its_own_sagas_lock_expiry():
    assert registry.get("chaos").lock_expiry_s == 10  # the shortest
    assert registry.get("shrinking").lock_expiry_s == 60
    short, patient = admitted("chaos"), admitted("shrinking")
    from sagas.engine.executor import _keep_alive

    for started, lease in ((short, 10), (patient, 60)):
        _keep_alive(started)  # a heartbeat renews the lease from the database's clock
        row = StepAttempt.objects.get(pk=started.attempt.pk)
        assert row.heartbeat_at is not None and row.heartbeat_expires_at is not None
        assert (row.heartbeat_expires_at - row.heartbeat_at).total_seconds() == lease
    # Both fall silent for 20 s: past the short lease, well within the long one.
    StepAttempt.objects.filter(pk__in=[short.attempt.pk, patient.attempt.pk]).update(
        heartbeat_at=F("heartbeat_at") - timedelta(seconds=20),
        heartbeat_expires_at=F("heartbeat_expires_at") - timedelta(seconds=20),
    )
    reaper_watching()
    report = reap(force=True)
    assert report is not None and report.lost_attempts == [short.attempt.pk]
    assert StepAttempt.objects.get(pk=patient.attempt.pk).outcome == "running"


def test_a_silent_attempt_is_lost_once_its_expiry_has_been_watched():
    silent = silent_attempt("chaos", timedelta(seconds=60))
    from sagas.engine.apply import database_now

    start_at = database_now()
    first = reap(now=start_at, force=True)  # no pass on record: the watch starts here
    assert first is not None and (first.lost_attempts, first.waiting_for_watch) == ([], 1)
    early = reap(now=start_at + timedelta(seconds=6), force=True)
    assert early is not None and early.lost_attempts == []
    watched = reap(now=start_at + timedelta(seconds=11), force=True)
    assert watched is not None and watched.lost_attempts == [silent.pk]
    silent.refresh_from_db()
    assert silent.outcome == "lost"


def test_after_a_gap_longer_than_the_expiry_the_watch_starts_again():
    silent = silent_attempt("chaos", timedelta(seconds=60))
    from sagas.engine.apply import database_now

    start_at = database_now()
    reap(now=start_at, force=True)
    # No pass for 25 s (an outage, or every worker busy): heartbeats may be stale for
    # that reason alone.
    after_gap = reap(now=start_at + timedelta(seconds=25), force=True)
    assert after_gap is not None and after_gap.lost_attempts == []
    later = reap(now=start_at + timedelta(seconds=31), force=True)
    assert later is not None and later.lost_attempts == []
    watched = reap(now=start_at + timedelta(seconds=36), force=True)
    assert watched is not None and watched.lost_attempts == [silent.pk]


def test_declaring_an_attempt_lost_frees_its_lock_and_says_why():
    silent = silent_attempt("chaos", timedelta(seconds=60))
    StepAttempt.objects.filter(pk=silent.pk).update(lock_key="sagas:lock:held-by-dead")
    redis().set("sagas:lock:held-by-dead", "t", px=60_000)  # the dead holder's token is "t"
    redis().set("sagas:lock:someone-else", "other", px=60_000)
    reaper_watching()
    report = reap(force=True)
    assert report is not None and report.lost_attempts == [silent.pk]
    assert redis().get("sagas:lock:held-by-dead") is None
    assert redis().get("sagas:lock:someone-else") == b"other"
    entry = AuditEntry.objects.get(task=silent.step.task, action="attempt_lost")
    assert entry.step_id == silent.step_id
    assert entry.details["kind"] == "action"
    assert entry.details["attempt"] == 1
    assert entry.details["worker"] == "w"
    assert entry.details["last_heartbeat"] is not None
    silent.refresh_from_db()
    assert silent.outcome == "lost"
    assert silent.error.startswith("lost: no heartbeat from w since")


def test_a_pass_waiting_for_its_watch_comes_back_within_half_an_expiry():
    silent_attempt("chaos", timedelta(seconds=60))  # chaos: lock_expiry_s=10
    report = reap(force=True)
    assert report is not None and report.waiting_for_watch == 1
    scheduled = queue().scheduled_job_registry
    follow_ups = [
        jid for jid in scheduled.get_job_ids() if "reaper" in str(queue().fetch_job(jid).func_name)
    ]
    assert len(follow_ups) == 1
    due = scheduled.get_scheduled_time(follow_ups[0]).timestamp()
    assert 3 <= due - time.time() <= 7  # about half the expiry
    again = reap(force=True)  # a second pass within that half: no second follow-up
    assert again is not None and again.waiting_for_watch == 1
    assert len(scheduled.get_job_ids()) == 1


def test_a_stop_goes_straight_to_the_worker_that_runs_the_attempt():
    from sagas.engine.stopping import stop_job

    pubsub = redis().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("rq:pubsub:worker-7")
    try:
        assert stop_job("worker-7", "saga-x-step-a1") is True
        message = None
        for _ in range(50):
            message = pubsub.get_message(timeout=0.1)
            if message:
                break
        assert message is not None
        assert json.loads(message["data"]) == {"command": "stop-job", "job_id": "saga-x-step-a1"}
    finally:
        pubsub.close()
    assert stop_job("", "saga-x-step-a1") is False  # nobody to tell
    assert stop_job("worker-7", "") is False


def test_a_saga_deadline_is_scheduled_at_start_and_cancels_as_the_system():
    task, _ = start("deadline", {})  # deadline_s=2
    scheduled = queue().scheduled_job_registry
    due = scheduled.get_scheduled_time(f"deadline-{task.pk}").timestamp()
    assert 1 <= due - time.time() <= 3
    run_one_job()  # early succeeds; too_long is queued
    from sagas.engine.deadlines import enforce

    assert enforce(str(task.pk)) == "cancelled"
    task.refresh_from_db()
    assert task.status == "cancelling"  # early succeeded: it is undone first
    assert run_to_end(task).status == "cancelled"
    assert statuses(task) == {"early": "compensated", "too_long": "skipped"}
    entry = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert (entry.actor_name, entry.details["by"], entry.details["reason"]) == (
        "system",
        "deadline",
        "deadline passed",
    )
    assert task.deadline_at is not None
    assert abs((task.deadline_at - task.created_at).total_seconds() - 2) < 1


def test_a_dead_holders_lock_is_released_only_with_its_token():
    from sagas.engine.locks import release_if_held_by

    lock = TaskLock(redis(), "t-9", expiry_s=60)
    assert lock.acquire()
    assert release_if_held_by(redis(), lock.key, "not-the-token") is False
    assert lock.holder() == lock.token
    assert release_if_held_by(redis(), lock.key, lock.token) is True
    assert lock.holder() is None


def test_cancel_right_after_a_redrive_of_the_first_step(operator):
    task, _ = start("chaos", {"fail": {"reserve": 4}, "on_exhausted": "dead_letter"})
    assert run_to_end(task).status == "dead_lettered"
    redrive(task.pk, operator, "the service is back")
    task.refresh_from_db()
    assert task.status == "running"  # reserve pending, its job queued
    outcome = cancel(task.pk, operator, "never mind")
    assert (outcome.outcome, outcome.status, outcome.http_status) == ("cancelled", "cancelled", 202)
    assert run_to_end(task).status == "cancelled"


def test_a_task_the_reaper_cannot_judge_does_not_stop_the_others(monkeypatch, settings):
    from sagas.engine import rescue

    settings.SAGAS_REAPER_GRACE = 0
    poisoned, _ = start("chaos", {})
    healthy, _ = start("chaos", {})
    forget_all_jobs()
    real = rescue.needs_rescue

    def judge(plan, states, timing):
        if plan.task.pk == poisoned.pk:
            raise RuntimeError("rows the rules did not foresee")
        return real(plan, states, timing)

    monkeypatch.setattr(rescue, "needs_rescue", judge)
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if str(healthy.pk) in j]
    poisoned.refresh_from_db()
    assert poisoned.wake_at is not None  # looked at again later, not every pass
    assert (poisoned.wake_at - poisoned.created_at).total_seconds() > 600


def test_a_postponement_never_overwrites_a_decision_taken_meanwhile(monkeypatch, settings):
    from sagas.engine import rescue
    from sagas.models import TaskInstance

    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("chaos", {})
    forget_all_jobs()
    transition(task, TaskStatus.RUNNING)
    reserve = task.steps.get(name="reserve")
    transition_step(reserve, StepStatus.RUNNING, fields={"attempt_count": 1})
    attempt = StepAttempt.objects.create(
        step=reserve,
        kind="action",
        number=1,
        lock_token="t",
        worker="w",
        heartbeat_at=Now(),
        heartbeat_expires_at=Now() + timedelta(seconds=10),
    )
    TaskInstance.objects.filter(pk=task.pk).update(wake_at=Now() - timedelta(seconds=1))
    real = rescue.needs_rescue

    def racing(plan, states, timing):
        answer = real(plan, states, timing)  # judged on rows read before the settle
        if plan.task.pk == task.pk:
            # ... meanwhile reserve settles, charge is scheduled and Redis loses its job
            assert settle_attempt(attempt.pk, Outcome(AttemptOutcome.SUCCEEDED, data={}))
            forget_all_jobs()
        return answer

    monkeypatch.setattr(rescue, "needs_rescue", racing)
    reap(force=True)
    monkeypatch.undo()
    task.refresh_from_db()
    assert task.wake_at is not None  # the settle's wake-up time stands
    report = reap(force=True)
    assert report is not None
    assert [j for j in report.requeued_jobs if "-charge-a1" in j]
    assert run_to_end(task).status == "completed"


def test_a_worker_without_the_code_leaves_a_lost_attempt_to_one_that_has_it(monkeypatch, settings):
    silent = silent_attempt("chaos", timedelta(seconds=30))
    reaper_watching()
    saga = registry.get("chaos")
    monkeypatch.setattr(saga, "get_step", lambda name: None)  # an old worker's registry
    report = reap(force=True)
    assert report is not None and report.lost_attempts == []
    silent.refresh_from_db()
    assert silent.outcome == "running"  # not parked by a worker that cannot judge it
    settings.SAGAS_CODE_REQUEUES = 1  # long past the hand-back window: the code is gone
    report = reap(force=True)
    assert report is not None and report.lost_attempts == [silent.pk]
    silent.step.task.refresh_from_db()
    assert silent.step.task.status == "dead_lettered"


def test_the_deadline_job_carries_the_task_and_keeps_no_result():
    task, _ = start("deadline", {})
    job = queue().fetch_job(f"deadline-{task.pk}")
    assert job is not None
    assert (job.func_name, job.args, job.result_ttl) == (
        "sagas.engine.deadlines.enforce",
        (str(task.pk),),
        0,
    )


def test_the_reaper_stops_an_attempt_that_ignored_its_cancel_on_the_worker_that_runs_it(
    settings,
):
    settings.SAGAS_CANCEL_GRACE = 0
    settings.SAGAS_REAPER_GRACE = 0
    task, _ = start("chaos", {})
    forget_all_jobs()
    transition(task, TaskStatus.RUNNING)
    reserve = task.steps.get(name="reserve")
    transition_step(reserve, StepStatus.RUNNING, fields={"attempt_count": 1})
    StepAttempt.objects.create(
        step=reserve,
        kind="action",
        number=1,
        lock_token="t",
        worker="worker-3",
        job_id="saga-x-reserve-a1",
        heartbeat_at=Now(),
        heartbeat_expires_at=Now() + timedelta(seconds=30),
    )
    assert cancel(task.pk).status == "cancelling"
    pubsub = redis().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("rq:pubsub:worker-3")
    try:
        report = reap(now=timezone.now() + timedelta(seconds=1), force=True)
        assert report is not None and report.stopped_jobs == 1
        message = next((m for _ in range(50) if (m := pubsub.get_message(timeout=0.1))), None)
        assert message is not None
        assert json.loads(message["data"]) == {"command": "stop-job", "job_id": "saga-x-reserve-a1"}
    finally:
        pubsub.close()


def test_a_dead_holder_without_a_recorded_lock_frees_its_tasks_lock():
    from sagas.engine.executor import settle_dead_attempt

    silent = silent_attempt("chaos", timedelta(seconds=60))
    StepAttempt.objects.filter(pk=silent.pk).update(lock_key="")  # an older row
    lock = TaskLock(redis(), silent.step.task_id, expiry_s=60)
    redis().set(lock.key, "t", px=60_000)  # held with the attempt's token
    silent.refresh_from_db()
    assert settle_dead_attempt(silent, Outcome(AttemptOutcome.LOST, error="lost"))
    assert redis().get(lock.key) is None


def test_the_follow_up_comes_at_half_the_expiry_and_once_per_half(settings):
    from sagas.engine import reaper

    reaper._follow_up(10)
    scheduled = queue().scheduled_job_registry
    (jid,) = scheduled.get_job_ids()
    job = queue().fetch_job(jid)
    assert job is not None and job.kwargs == {"follow_up": True}
    assert (job.result_ttl, job.timeout) == (0, 600)
    due = scheduled.get_scheduled_time(jid).timestamp()
    assert 4 <= due - time.time() <= 6.1
    ttl = redis().pttl(reaper.FOLLOW_UP_KEY)
    assert 4000 <= ttl <= 5000  # it expires with the half expiry
    reaper._follow_up(10)
    assert len(scheduled.get_job_ids()) == 1
    reaper._follow_up(1)  # never sooner than a second
    assert 0 < redis().pttl(reaper.FOLLOW_UP_KEY) <= 5000


def test_a_follow_up_that_finds_the_turn_busy_comes_back():
    from sagas.engine import reaper

    busy = reaper._turn()
    assert busy.acquire()
    reaper.reaper_pass(follow_up=True)
    (jid,) = queue().scheduled_job_registry.get_job_ids()
    job = queue().fetch_job(jid)
    assert job is not None and job.kwargs == {"follow_up": True}
    forget_all_jobs()
    reaper.reaper_pass()  # an ordinary pass just leaves it to the one running
    assert queue().scheduled_job_registry.get_job_ids() == []
    busy.release()


def test_the_code_hand_back_window_and_an_attempt_without_beats(settings):
    from sagas.engine import reaper

    settings.SAGAS_CODE_REQUEUES = 6
    assert reaper.code_wait_s() == (1 + 2 + 4 + 8 + 16 + 30) + 6
    settings.SAGAS_CODE_REQUEUES = 0
    assert reaper.code_wait_s() == 0
    never_beat = StepAttempt(heartbeat_at=None, heartbeat_expires_at=timezone.now())
    assert reaper._lease(never_beat) == reaper.UNKNOWN_SAGA_EXPIRY_S
    no_lease = StepAttempt(heartbeat_at=timezone.now(), heartbeat_expires_at=None)
    assert reaper._lease(no_lease) == reaper.UNKNOWN_SAGA_EXPIRY_S
