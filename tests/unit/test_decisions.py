"""The engine's decisions as pure functions of a task's rows: no database, no Redis, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagas.definitions import RetryPolicy, Saga
from sagas.engine import decisions, joins, requests, rescue
from sagas.engine.apply import step_row
from sagas.engine.decisions import Outcome
from sagas.engine.plan import (
    AttemptRow,
    Audit,
    IllegalMove,
    MoveTask,
    NotifyCompensationFailed,
    Plan,
    PromoteJob,
    Schedule,
    SignalAttempt,
    SignalTask,
    StepRow,
    StopAttempt,
    TaskRow,
    is_job_for,
    job_id,
)
from sagas.engine.reaper import Watch, watch_after
from sagas.models import TaskInstance
from sagas.services import step_records
from sagas.states import AttemptKind, StepStatus, TaskStatus

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TIMING = rescue.Timing(
    grace=timedelta(seconds=10),
    cancel_grace=timedelta(seconds=10),
    stuck_after=timedelta(minutes=15),
)


def noop(ctx: Any) -> None:
    return None


def linear() -> Saga:
    saga = Saga("linear", cancellable=True, lock_expiry_s=10)
    retry = RetryPolicy(max_retries=2, backoff="constant", base_delay_ms=500)
    for name in ("one", "two", "three"):
        saga.step(name=name, retry=retry)(noop).compensate(noop)
    return saga


def grouped(mode: str = "all", **group: Any) -> Saga:
    saga = Saga("grouped", lock_expiry_s=10)
    saga.step(name="first")(noop).compensate(noop)
    fan = saga.parallel("fan", mode=mode, **group)
    for name in ("left", "right"):
        fan.branch(name=name, retry=RetryPolicy(max_retries=0))(noop).compensate(noop)
    saga.step(name="last")(noop)
    return saga


def plan_for(saga: Saga, task_status: str = "running", **steps: dict[str, Any]) -> Plan:
    """A plan over fresh rows for ``saga`` (built as ``start`` builds them, never saved);
    ``steps`` override fields per step name."""
    records = step_records(saga, TaskInstance(pk="t1", saga=saga.name))
    for pk, record in enumerate(records, start=1):
        record.pk = pk
    rows = [step_row(record, []) for record in records]
    for step in rows:
        for field, value in steps.get(step.name, {}).items():
            setattr(step, field, value)
    task = TaskRow(pk="t1", saga=saga.name, status=task_status)
    return Plan(task, rows, NOW, saga, rand=lambda: 0.5)


def of(plan: Plan, kind: type) -> list[Any]:
    return [e for e in plan.effects if isinstance(e, kind)]


def scheduled(plan: Plan) -> list[tuple[str, str, int]]:
    return [(e.step, e.kind, e.attempt) for e in of(plan, Schedule)]


def task_moves(plan: Plan) -> list[str]:
    return [e.to for e in of(plan, MoveTask)]


def running(number: int = 1, kind: str = "action", **fields: Any) -> list[AttemptRow]:
    return [AttemptRow(pk=number, kind=kind, number=number, **fields)]


# --- job ids ---------------------------------------------------------------------------------


def test_a_job_id_names_exactly_one_attempt_and_its_requeues():
    jid = job_id("t1", "charge", AttemptKind.COMPENSATION, 3, "l2")
    assert jid == "saga-t1-charge-c3-l2"
    assert is_job_for(jid, "t1", "charge", AttemptKind.COMPENSATION, 3)
    assert not is_job_for(jid, "t1", "charge", AttemptKind.COMPENSATION, 33)
    assert not is_job_for(jid, "t1", "charge", AttemptKind.ACTION, 3)
    assert not is_job_for("saga-t1-charge-c30", "t1", "charge", AttemptKind.COMPENSATION, 3)


# --- the forward path ------------------------------------------------------------------------


def test_a_new_task_queues_its_first_step_only():
    plan = plan_for(linear(), "pending")
    decisions.advance(plan)
    assert scheduled(plan) == [("one", "action", 1)]
    assert task_moves(plan) == []
    decisions.advance(plan)  # again: the job is already handed out
    assert scheduled(plan) == [("one", "action", 1)]


def test_the_last_success_completes_the_task():
    done = {"status": "succeeded"}
    plan = plan_for(linear(), "waiting_retry", one=done, two=done, three=done)
    decisions.advance(plan)
    assert task_moves(plan) == ["running", "completed"]
    assert plan.task.status == TaskStatus.COMPLETED


def test_a_failed_attempt_within_its_budget_waits_for_a_scheduled_retry():
    plan = plan_for(linear(), one={"status": "running", "attempt_count": 1})
    decisions.action_ended(plan, plan.step("one"), Outcome("failed", error="boom"))
    step = plan.step("one")
    assert step.status == StepStatus.WAITING_RETRY
    assert step.next_attempt_at == NOW + timedelta(milliseconds=500)
    assert [(e.step, e.attempt, e.at) for e in of(plan, Schedule)] == [
        ("one", 2, NOW + timedelta(milliseconds=500))
    ]
    assert task_moves(plan) == ["waiting_retry"]  # nothing else runs
    assert [e.action for e in of(plan, Audit)] == ["retry_scheduled"]


def test_an_exhausted_dead_letter_step_parks_the_task_naming_the_step():
    policy = RetryPolicy(max_retries=0, on_exhausted="dead_letter")
    saga = Saga("parking")
    saga.step(name="only", retry=policy)(noop)
    plan = plan_for(saga, only={"status": "running", "attempt_count": 1})
    decisions.action_ended(plan, plan.step("only"), Outcome("failed", error="no"))
    moves = of(plan, MoveTask)
    assert [m.to for m in moves] == ["dead_lettered"]
    assert moves[0].details == {"error": "only: no", "steps": ["only"]}


def test_exhaustion_policies_fail_or_compensate():
    for on_exhausted, expected in (("fail", ["failed"]), ("compensate", ["compensating"])):
        saga = Saga(f"p-{on_exhausted}")
        saga.step(name="a")(noop).compensate(noop)
        saga.step(name="b", retry=RetryPolicy(max_retries=0, on_exhausted=on_exhausted))(noop)
        plan = plan_for(
            saga, a={"status": "succeeded"}, b={"status": "running", "attempt_count": 1}
        )
        decisions.action_ended(plan, plan.step("b"), Outcome("failed", error="x"))
        assert task_moves(plan)[: len(expected)] == expected


def test_a_missing_definition_parks_an_action_and_fails_a_compensation():
    plan = plan_for(linear(), one={"status": "running"})
    plan.saga = None
    decisions.action_ended(plan, plan.step("one"), Outcome("succeeded"))
    assert plan.step("one").status == StepStatus.FAILED
    assert task_moves(plan) == ["dead_lettered"]

    plan = plan_for(linear(), "cancelling", one={"status": "succeeded"})
    plan.saga = None
    decisions.code_missing_for_good(plan, plan.step("one"), AttemptKind.COMPENSATION)
    assert plan.step("one").status == StepStatus.COMPENSATION_FAILED
    assert task_moves(plan) == ["compensation_failed"]


def test_illegal_moves_are_refused_in_the_plan():
    plan = plan_for(linear(), "completed")
    with pytest.raises(IllegalMove):
        plan.move_task(TaskStatus.RUNNING, "transition")
    with pytest.raises(IllegalMove):
        plan.move_step(plan.step("one"), StepStatus.COMPENSATED)


# --- admission and stops ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_status", "step", "kind", "attempt", "verdict"),
    [
        ("running", {"status": "pending"}, "action", 1, ""),
        ("running", {"status": "pending", "attempt_count": 1}, "action", 1, "duplicate"),
        ("running", {"status": "waiting_retry", "attempt_count": 1}, "action", 3, "stale"),
        ("cancelling", {"status": "pending"}, "action", 1, "stale"),
        ("cancelling", {"status": "succeeded"}, "compensation", 1, ""),
        ("running", {"status": "succeeded"}, "compensation", 1, "stale"),
        ("completed", {"status": "succeeded", "compensate_alone": True}, "compensation", 1, ""),
    ],
)
def test_admission(task_status, step, kind, attempt, verdict):
    plan = plan_for(linear(), task_status, one=step)
    assert decisions.admissible(plan, plan.step("one"), kind, attempt).startswith(verdict)
    assert bool(verdict) == bool(decisions.admissible(plan, plan.step("one"), kind, attempt))


def test_a_stop_nobody_asked_for_is_a_failure_and_a_cancel_is_a_cancel():
    stopped = Outcome("cancelled", error="step stopped by RQ's stop-job")
    plan = plan_for(linear(), one={"status": "running"})
    outside = decisions.classify(plan, plan.step("one"), AttemptKind.ACTION, stopped)
    assert outside.status == "failed"
    assert outside.error.startswith(decisions.STOPPED_FROM_OUTSIDE)
    cancelling = plan_for(linear(), "cancelling", one={"status": "running"})
    kept = decisions.classify(cancelling, cancelling.step("one"), AttemptKind.ACTION, stopped)
    assert kept == stopped
    undo = decisions.classify(cancelling, cancelling.step("one"), AttemptKind.COMPENSATION, stopped)
    assert undo.status == "failed"  # nothing stops an undo on purpose
    ok = Outcome("succeeded")
    assert decisions.classify(plan, plan.step("one"), AttemptKind.ACTION, ok) is ok


def test_a_branch_its_group_no_longer_needs_is_cancelled_not_failed():
    plan = plan_for(grouped(), fan={"status": "succeeded"}, left={"status": "running"})
    stopped = Outcome("cancelled")
    assert decisions.classify(plan, plan.step("left"), AttemptKind.ACTION, stopped) == stopped
    still_needed = plan_for(grouped(), fan={"status": "running"}, left={"status": "running"})
    verdict = decisions.classify(still_needed, still_needed.step("left"), "action", stopped)
    assert verdict.status == "failed"


# --- groups ----------------------------------------------------------------------------------


def test_a_groups_timeout_starts_with_its_first_branch_and_its_cap_with_the_group():
    plan = plan_for(grouped(timeout_s=4, schedule_to_close_s=30), first={"status": "succeeded"})
    decisions.advance(plan)
    fan = plan.step("fan")
    assert (fan.status, fan.deadline_at) == (StepStatus.RUNNING, None)
    assert fan.schedule_deadline_at == NOW + timedelta(seconds=30)
    assert scheduled(plan) == [("left", "action", 1), ("right", "action", 1)]
    plan.now = NOW + timedelta(seconds=20)  # the first branch starts after 20 s in the queue
    decisions.start_attempt(plan, plan.step("left"), AttemptKind.ACTION, 1)
    assert fan.deadline_at == NOW + timedelta(seconds=24)
    plan.now = NOW + timedelta(seconds=21)
    decisions.start_attempt(plan, plan.step("right"), AttemptKind.ACTION, 1)
    assert fan.deadline_at == NOW + timedelta(seconds=24)  # not moved by later branches
    assert joins.deadline(fan) == NOW + timedelta(seconds=24)
    assert decisions.group_deadline(plan, plan.step("left")) == NOW + timedelta(seconds=24)


def test_a_branch_that_cannot_start_before_the_deadline_times_out_without_an_attempt():
    fan = {"status": "running", "schedule_deadline_at": NOW - timedelta(seconds=1)}
    plan = plan_for(grouped(), first={"status": "succeeded"}, fan=fan)
    assert decisions.group_expired(plan, plan.step("left"))
    decisions.give_up_before_start(plan, plan.step("left"), "too late")
    assert plan.step("left").error.startswith("timed out")
    assert plan.step("fan").status == StepStatus.FAILED  # an "all" group fails with it
    assert plan.step("right").status == StepStatus.SKIPPED
    assert task_moves(plan) == ["compensating"]


def test_a_parked_task_joins_nothing():
    plan = plan_for(
        grouped(),
        "dead_lettered",
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "running"},
        right={"status": "failed"},
    )
    decisions.action_ended(plan, plan.step("left"), Outcome("succeeded", data={"l": 1}))
    assert plan.step("left").status == StepStatus.SUCCEEDED
    assert plan.step("fan").status == StepStatus.RUNNING
    assert task_moves(plan) == []


def test_a_late_branch_success_is_undone_on_its_own():
    plan = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running"},
    )
    decisions.action_ended(plan, plan.step("right"), Outcome("succeeded"))
    assert plan.step("right").compensate_alone
    assert scheduled(plan) == [("right", "compensation", 1)]
    assert task_moves(plan) == []  # not completed while its late work is undone


def test_the_winner_stops_its_siblings():
    plan = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "running", "running": running()},
        right={"status": "running", "running": running(2)},
    )
    decisions.action_ended(plan, plan.step("left"), Outcome("succeeded"))
    assert [(e.step, e.number) for e in of(plan, SignalAttempt)] == [("right", 2)]
    assert plan.step("fan").status == StepStatus.SUCCEEDED


# --- the undo path ---------------------------------------------------------------------------


def test_compensation_walks_levels_backwards_and_waits_for_running_steps():
    plan = plan_for(
        grouped(),
        "compensating",
        first={"status": "succeeded"},
        fan={"status": "failed"},
        left={"status": "succeeded"},
        right={"status": "running"},
    )
    decisions.compensate_next(plan)
    assert scheduled(plan) == []  # right still runs
    plan.step("right").status = StepStatus.FAILED
    decisions.compensate_next(plan)
    assert scheduled(plan) == [("left", "compensation", 1)]  # level 1 before level 0
    assert [s.name for s in decisions.compensation_level(plan)] == ["left"]


def test_the_last_undo_ends_the_task_as_its_reason_says():
    for reason, end in (("cancel", "cancelled"), ("failure", "compensated")):
        status = "cancelling" if reason == "cancel" else "compensating"
        plan = plan_for(linear(), status, one={"status": "compensated"})
        plan.task.compensation_reason = reason
        decisions.compensate_next(plan)
        assert task_moves(plan) == [end]


def test_a_failed_compensation_retries_then_fails_for_good_and_the_undo_goes_on():
    plan = plan_for(
        linear(),
        "compensating",
        one={"status": "succeeded"},
        two={"status": "compensating", "compensation_attempt_count": 1},
    )
    decisions.compensation_ended(plan, plan.step("two"), Outcome("failed", error="e"))
    assert plan.step("two").next_attempt_at is not None
    assert scheduled(plan) == [("two", "compensation", 2)]
    plan = plan_for(
        linear(),
        "compensating",
        one={"status": "succeeded"},
        two={"status": "compensating", "compensation_attempt_count": 3},
    )
    decisions.compensation_ended(plan, plan.step("two"), Outcome("failed", error="e"))
    assert plan.step("two").status == StepStatus.COMPENSATION_FAILED
    assert scheduled(plan) == [("one", "compensation", 1)]


# --- requests from outside -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome", "http"),
    [
        ("cancelling", "already_cancelled", 200),
        ("cancelled", "already_cancelled", 200),
        ("completed", "already_completed", 409),
        ("compensating", "already_finished", 409),
        ("resolved", "already_finished", 409),
    ],
)
def test_cancel_answers_for_tasks_it_cannot_cancel(status, outcome, http):
    plan = plan_for(linear(), status)
    answer = requests.cancel(plan, None, "")
    assert (answer.outcome, answer.http_status) == (outcome, http)
    assert plan.effects == []


def test_cancel_while_the_first_step_runs_is_cancelling_and_asks_it_to_stop():
    plan = plan_for(linear(), one={"status": "running", "running": running()})
    answer = requests.cancel(plan, None, "customer called")
    assert (answer.outcome, answer.status, answer.http_status) == ("cancelled", "cancelling", 202)
    assert of(plan, SignalTask)
    assert scheduled(plan) == []  # the undo waits for the running step


def test_cancel_with_nothing_started_ends_at_once():
    plan = plan_for(linear(), "pending")
    answer = requests.cancel(plan, None, "")
    assert (answer.outcome, answer.status) == ("cancelled", "cancelled")
    assert {s.status for s in plan.steps} == {StepStatus.SKIPPED}


def test_a_deadline_spares_parked_tasks_and_tasks_whose_work_is_done():
    parked = plan_for(linear(), "dead_lettered", one={"status": "failed"})
    assert requests.cancel(parked, None, "", by="deadline").outcome == "parked"
    assert parked.effects == []
    winding = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running"},
        last={"status": "succeeded"},
    )
    assert requests.cancel(winding, None, "", by="deadline").outcome == "work_done"
    assert requests.cancel(parked, None, "operator").outcome == "cancelled"


def test_redrive_retries_the_steps_that_parked_the_task_with_a_fresh_budget():
    plan = plan_for(
        grouped(),
        "dead_lettered",
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "failed", "attempt_count": 1},
        right={"status": "succeeded"},
    )
    requests.redrive(plan, None, "fixed", ["left"])
    left = plan.step("left")
    assert (left.status, left.attempt_budget_base) == (StepStatus.PENDING, 1)
    assert [(s, k, a) for s, k, a in scheduled(plan)] == [("left", "action", 2)]
    assert task_moves(plan) == ["running"]
    with pytest.raises(requests.NotAllowed):
        requests.redrive(plan_for(linear(), "running"), None, "x", None)


def test_redrive_without_a_record_falls_back_to_the_last_failed_critical_node():
    plan = plan_for(
        linear(),
        "dead_lettered",
        one={"status": "succeeded"},
        two={"status": "failed", "attempt_count": 3},
    )
    requests.redrive(plan, None, "fixed", None)
    assert scheduled(plan)[0] == ("two", "action", 4)


def test_resolve_and_retry_compensation_need_a_parked_task():
    plan = plan_for(
        linear(),
        "compensation_failed",
        one={"status": "compensation_failed", "compensation_attempt_count": 3},
    )
    plan.task.compensation_reason = "cancel"
    requests.retry_compensation(plan, None, "again")
    assert task_moves(plan) == ["cancelling"]
    assert plan.step("one").compensation_budget_base == 3
    assert scheduled(plan) == [("one", "compensation", 4)]
    with pytest.raises(requests.NotAllowed):
        requests.resolve(plan_for(linear(), "running"), None, "note")
    done = plan_for(linear(), "failed")
    requests.resolve(done, None, "fixed by hand")
    assert task_moves(done) == ["resolved"]


# --- the reaper's view -----------------------------------------------------------------------


def test_wake_time_follows_what_the_task_waits_for():
    fresh = plan_for(linear(), "pending")
    decisions.advance(fresh)
    assert rescue.wake_time(fresh, TIMING) == NOW + TIMING.grace
    busy = plan_for(linear(), one={"status": "running", "running": running()})
    assert rescue.wake_time(busy, TIMING) is None  # its heartbeat speaks for it
    later = NOW + timedelta(minutes=5)
    waiting = plan_for(
        linear(), "waiting_retry", one={"status": "waiting_retry", "next_attempt_at": later}
    )
    assert rescue.wake_time(waiting, TIMING) == later + TIMING.grace
    for status in ("completed", "dead_lettered", "compensation_failed"):
        assert rescue.wake_time(plan_for(linear(), status), TIMING) is None


def test_a_late_branchs_undo_is_watched_even_on_a_parked_task():
    plan = plan_for(
        grouped("any"),
        "dead_lettered",
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "succeeded", "compensate_alone": True},
    )
    assert [(j.step.name, j.kind) for j in rescue.expected_jobs(plan)] == [
        ("right", "compensation")
    ]
    assert rescue.wake_time(plan, TIMING) == NOW + TIMING.grace
    rescue.rescue(plan, {}, TIMING)
    assert [(e.step, e.kind) for e in of(plan, Schedule)] == [("right", "compensation")]


def test_wake_time_covers_stops_and_deadlines():
    cancelling = plan_for(linear(), "cancelling", one={"status": "running", "running": running()})
    cancelling.task.cancel_requested_at = NOW
    assert rescue.wake_time(cancelling, TIMING) == NOW + TIMING.cancel_grace + TIMING.grace
    deadline = NOW + timedelta(hours=1)
    busy = plan_for(linear(), one={"status": "running", "running": running()})
    busy.task.deadline_at = deadline
    assert rescue.wake_time(busy, TIMING) == deadline
    idle = plan_for(linear(), one={"status": "succeeded"})
    assert rescue.wake_time(idle, TIMING) == NOW + TIMING.grace  # nothing runs or waits


def test_the_rescue_reenqueues_lost_jobs_and_leaves_live_ones_alone():
    plan = plan_for(linear(), one={"status": "pending", "job_id": "saga-t1-one-a1"})
    assert rescue.jobs_to_check(plan) == ["saga-t1-one-a1"]
    assert not rescue.needs_rescue(plan, {"saga-t1-one-a1": rescue.ALIVE}, TIMING)
    assert rescue.needs_rescue(plan, {}, TIMING)
    rescue.rescue(plan, {}, TIMING)
    assert [e.job_id for e in of(plan, Schedule)] == [f"saga-t1-one-a1-r{int(NOW.timestamp())}"]


def test_the_rescue_promotes_a_scheduled_job_only_once_it_is_overdue():
    due = NOW - timedelta(seconds=30)
    jid = "saga-t1-one-a2"
    plan = plan_for(
        linear(),
        "waiting_retry",
        one={"status": "waiting_retry", "attempt_count": 1, "next_attempt_at": due, "job_id": jid},
    )
    rescue.rescue(plan, {jid: rescue.STUCK_SCHEDULED}, TIMING)
    assert [e.job_id for e in of(plan, PromoteJob)] == [jid]
    soon = plan_for(
        linear(),
        "waiting_retry",
        one={
            "status": "waiting_retry",
            "attempt_count": 1,
            "next_attempt_at": NOW - timedelta(seconds=2),
            "job_id": jid,
        },
    )
    rescue.rescue(soon, {jid: rescue.STUCK_SCHEDULED}, TIMING)
    assert soon.effects == []


def test_the_rescue_stops_an_action_that_ignored_its_cancel():
    attempt = running(worker="w1", job_id="saga-t1-one-a1")
    plan = plan_for(linear(), "cancelling", one={"status": "running", "running": attempt})
    plan.task.cancel_requested_at = NOW - timedelta(seconds=19)
    rescue.rescue(plan, {}, TIMING)
    assert plan.effects == []  # not a full grace yet
    plan.task.cancel_requested_at = NOW - timedelta(seconds=21)
    rescue.rescue(plan, {}, TIMING)
    assert of(plan, SignalTask)
    assert [(e.worker, e.job_id) for e in of(plan, StopAttempt)] == [("w1", "saga-t1-one-a1")]


def test_the_rescue_enforces_a_missed_deadline():
    plan = plan_for(
        linear(), one={"status": "succeeded"}, two={"status": "running", "running": running()}
    )
    plan.task.deadline_at = NOW - timedelta(seconds=1)
    rescue.rescue(plan, {}, TIMING)
    assert task_moves(plan) == ["cancelling"]


def test_stuck_is_the_one_definition():
    old = NOW - timedelta(minutes=20)
    idle = plan_for(linear(), one={"status": "succeeded"})
    idle.task.updated_at = old
    assert rescue.stuck(idle, {}, TIMING)
    idle.task.updated_at = NOW - timedelta(minutes=5)
    assert not rescue.stuck(idle, {}, TIMING)  # changed recently
    queued = plan_for(
        linear(), one={"status": "succeeded"}, two={"status": "pending", "job_id": "saga-t1-two-a1"}
    )
    queued.task.updated_at = old
    assert not rescue.stuck(queued, {"saga-t1-two-a1": rescue.ALIVE}, TIMING)
    assert rescue.stuck(queued, {}, TIMING)
    fresh = AttemptRow(1, "action", 1, heartbeat_expires_at=NOW + timedelta(seconds=5))
    beating = plan_for(linear(), one={"status": "running", "running": [fresh]})
    beating.task.updated_at = old
    assert not rescue.stuck(beating, {}, TIMING)
    fresh.heartbeat_expires_at = NOW - timedelta(seconds=5)
    assert rescue.stuck(beating, {}, TIMING)
    assert not rescue.stuck(plan_for(linear(), "dead_lettered"), {}, TIMING)


# --- the watch -------------------------------------------------------------------------------


def test_the_watch_starts_with_the_first_pass_and_again_after_a_gap():
    first = watch_after({}, 100.0, {10, 60})
    assert first == {"last": 100.0, "since:10": 100.0, "since:60": 100.0}
    steady = watch_after(first, 108.0, {10, 60})
    assert (steady["since:10"], steady["since:60"]) == (100.0, 100.0)
    gap = watch_after(steady, 130.0, {10, 60})  # 22 s without a pass
    assert (gap["since:10"], gap["since:60"]) == (130.0, 100.0)
    watch = Watch(now=141.0, since={10: 130.0, 60: 100.0})
    assert watch.observed(10)
    assert not watch.observed(60)
    assert not Watch(now=139.0, since={10: 130.0}).observed(10)
    assert not Watch(now=1000.0, since={}).observed(10)  # never watched: never lost


# --- what a group's result says --------------------------------------------------------------


def test_branch_results_carry_data_or_a_structured_error():
    ok = StepRow(1, "a", 0, "succeeded", data={"quote": 1})
    assert joins.branch_result(ok) == {"quote": 1}
    failed = StepRow(2, "b", 1, "failed", error="ProviderError: skyways is down")
    assert joins.branch_result(failed) == {
        "status": "failed",
        "error_type": "ProviderError",
        "message": "skyways is down",
    }
    bare = StepRow(3, "c", 2, "failed", error="no colon here")
    assert joins.branch_result(bare) == {
        "status": "failed",
        "error_type": "Error",
        "message": "no colon here",
    }
    slow = StepRow(4, "d", 3, "failed", error="StepTimedOut: 5 s", last_action_outcome="timed_out")
    assert joins.branch_result(slow)["status"] == "timed_out"
    never = StepRow(5, "e", 4, "failed", error="timed out: the group's deadline passed")
    assert joins.branch_result(never)["status"] == "timed_out"
    assert not joins.timed_out(failed)
    stopped = StepRow(6, "f", 5, "cancelled", error="StepCancelled: stop")
    assert joins.branch_result(stopped)["status"] == "cancelled"


def test_a_closing_group_records_each_branchs_result_and_audits_it():
    plan = plan_for(
        grouped("all_settled"),
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "succeeded", "data": {"l": 1}},
        right={"status": "running", "attempt_count": 1},
    )
    decisions.action_ended(plan, plan.step("right"), Outcome("failed", error="KeyError: x"))
    fan = plan.step("fan")
    results = {
        "left": {"l": 1},
        "right": {"status": "failed", "error_type": "KeyError", "message": "x"},
    }
    assert (fan.status, fan.data, fan.error) == (StepStatus.SUCCEEDED, results, "")
    entry = [e for e in of(plan, Audit) if e.step == "fan"]
    assert [(e.action, e.details) for e in entry] == [
        ("step_succeeded", {"mode": "all_settled", "results": results})
    ]
    assert scheduled(plan) == [("last", "action", 1)]


def test_a_failing_group_says_so_and_undoes_what_ran():
    plan = plan_for(
        grouped("all"),
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "succeeded"},
        right={"status": "running", "attempt_count": 1},
    )
    decisions.action_ended(plan, plan.step("right"), Outcome("failed", error="E: x"))
    fan = plan.step("fan")
    assert (fan.status, fan.error) == (StepStatus.FAILED, "group fan (all) failed")
    assert [e.action for e in of(plan, Audit) if e.step == "fan"] == ["step_failed"]
    moves = of(plan, MoveTask)
    assert [(m.to, m.fields["error_summary"]) for m in moves] == [
        ("compensating", "fan: group failed")
    ]
    assert scheduled(plan) == [("left", "compensation", 1)]


def test_a_late_branch_is_audited_with_the_reason_it_is_undone():
    plan = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running", "attempt_count": 1},
    )
    decisions.action_ended(plan, plan.step("right"), Outcome("succeeded"))
    late = [e for e in of(plan, Audit) if e.action == "compensation_started"]
    assert [(e.step, e.details) for e in late] == [
        ("right", {"reason": "group fan decided without this branch"})
    ]
    failed_late = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running", "attempt_count": 1},
        last={"status": "succeeded"},
    )
    decisions.action_ended(failed_late, failed_late.step("right"), Outcome("failed", error="x"))
    assert task_moves(failed_late) == ["completed"]  # the last part still running settled


def test_boundaries_of_the_watch_and_of_an_overdue_job():
    assert Watch(now=110.0, since={10: 100.0}).observed(10)
    assert not Watch(now=109.9, since={10: 100.0}).observed(10)
    jid = "saga-t1-one-a2"
    exactly = plan_for(
        linear(),
        "waiting_retry",
        one={
            "status": "waiting_retry",
            "attempt_count": 1,
            "job_id": jid,
            "next_attempt_at": NOW - TIMING.grace,
        },
    )
    rescue.rescue(exactly, {jid: rescue.STUCK_SCHEDULED}, TIMING)
    assert [e.job_id for e in of(exactly, PromoteJob)] == [jid]


# --- parked tasks, redrives and retried undos ------------------------------------------------


def dead_letter_first() -> Saga:
    saga = Saga("dag-park", lock_expiry_s=10)
    saga.step(name="a", retry=RetryPolicy(max_retries=0, on_exhausted="dead_letter"))(noop)
    saga.step(name="b", after=[], retry=RetryPolicy(max_retries=5))(noop)
    saga.step(name="c", after=["a", "b"])(noop)
    return saga


def succeed(plan: Plan, name: str, attempt: int) -> None:
    step = plan.step(name)
    decisions.start_attempt(plan, step, AttemptKind.ACTION, attempt)
    plan.attempt_ended(step, AttemptKind.ACTION, attempt, "succeeded")
    decisions.action_ended(plan, step, Outcome("succeeded", data={name: attempt}))


def test_cancel_of_a_running_task_with_only_queued_work_ends_through_cancelling():
    plan = plan_for(
        linear(),
        one={
            "status": "pending",
            "attempt_count": 3,
            "attempt_budget_base": 3,
            "job_id": "saga-t1-one-a4-rd1",
        },
    )
    answer = requests.cancel(plan, None, "never mind")
    assert (answer.outcome, answer.status) == ("cancelled", "cancelled")
    assert task_moves(plan) == ["cancelling", "cancelled"]  # never running -> cancelled


def test_a_sibling_that_fails_while_the_task_is_parked_is_redriven_with_it():
    plan = plan_for(
        dead_letter_first(),
        "dead_lettered",
        a={"status": "failed", "attempt_count": 1},
        b={"status": "running", "attempt_count": 1, "running": running()},
    )
    b = plan.step("b")
    plan.attempt_ended(b, AttemptKind.ACTION, 1, "failed")
    decisions.action_ended(plan, b, Outcome("failed", error="boom"))
    assert b.status == StepStatus.FAILED  # no retry while parked, but on record
    assert [(e.action, e.step) for e in of(plan, Audit)] == [("step_failed", "b")]
    requests.redrive(plan, None, "fixed a", ["a"])
    assert sorted(s for s, _, _ in scheduled(plan)) == ["a", "b"]
    succeed(plan, "a", 2)
    succeed(plan, "b", 2)
    assert ("c", "action", 1) in scheduled(plan)
    succeed(plan, "c", 1)
    assert plan.task.status == TaskStatus.COMPLETED


def test_a_group_that_settled_while_the_task_was_parked_joins_at_the_redrive():
    saga = Saga("dag-group", lock_expiry_s=10)
    saga.step(name="a", retry=RetryPolicy(max_retries=0, on_exhausted="dead_letter"))(noop)
    fan = saga.parallel("fan", mode="all", after=[])
    for name in ("left", "right"):
        fan.branch(name=name)(noop).compensate(noop)
    saga.step(name="c", after=["a", "fan"])(noop)
    plan = plan_for(
        saga,
        "dead_lettered",
        a={"status": "failed", "attempt_count": 1},
        fan={"status": "running"},
        left={"status": "running", "attempt_count": 1, "running": running()},
        right={"status": "running", "attempt_count": 1, "running": running()},
    )
    for name in ("left", "right"):
        step = plan.step(name)
        plan.attempt_ended(step, AttemptKind.ACTION, 1, "succeeded")
        decisions.action_ended(plan, step, Outcome("succeeded", data={name: 1}))
    assert plan.step("fan").status == StepStatus.RUNNING  # no join while parked
    requests.redrive(plan, None, "fixed a", ["a"])
    assert plan.step("fan").status == StepStatus.SUCCEEDED  # joined at the redrive
    succeed(plan, "a", 2)
    assert ("c", "action", 1) in scheduled(plan)


def test_a_late_branch_that_succeeds_while_its_task_is_parked_is_undone_alone():
    saga = Saga("late-parked", lock_expiry_s=10)
    fan = saga.parallel("fan", mode="any")
    for name in ("left", "right"):
        fan.branch(name=name)(noop).compensate(noop)
    saga.step(name="last", retry=RetryPolicy(max_retries=0, on_exhausted="dead_letter"))(noop)
    plan = plan_for(
        saga,
        "dead_lettered",
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running", "attempt_count": 1, "running": running()},
        last={"status": "failed", "attempt_count": 1},
    )
    right = plan.step("right")
    plan.attempt_ended(right, AttemptKind.ACTION, 1, "succeeded")
    decisions.action_ended(plan, right, Outcome("succeeded", data={"x": 1}))
    assert right.compensate_alone
    assert scheduled(plan) == [("right", "compensation", 1)]


def test_a_retried_undo_of_a_saga_with_a_group_can_end_compensated():
    plan = plan_for(
        grouped("all"),
        "compensation_failed",
        first={"status": "compensated"},
        fan={"status": "compensation_failed"},
        left={"status": "compensation_failed", "compensation_attempt_count": 3},
        right={"status": "compensated"},
        last={"status": "skipped"},
    )
    plan.task.compensation_reason = "failure"
    requests.retry_compensation(plan, None, "fixed the bucket")
    assert plan.step("fan").status == StepStatus.COMPENSATING
    left = plan.step("left")
    decisions.start_attempt(plan, left, AttemptKind.COMPENSATION, 4)
    plan.attempt_ended(left, AttemptKind.COMPENSATION, 4, "succeeded")
    decisions.compensation_ended(plan, left, Outcome("succeeded"))
    assert plan.step("fan").status == StepStatus.COMPENSATED
    assert plan.task.status == TaskStatus.COMPENSATED


def test_a_redrive_restarts_its_groups_clocks_and_takes_the_task_past_its_deadline():
    fan = {
        "status": "running",
        "deadline_at": NOW - timedelta(hours=1),
        "schedule_deadline_at": NOW - timedelta(hours=1),
    }
    plan = plan_for(
        grouped("all", timeout_s=4, schedule_to_close_s=30),
        "dead_lettered",
        first={"status": "succeeded"},
        fan=fan,
        left={"status": "failed", "attempt_count": 1},
        right={"status": "running"},
    )
    plan.task.deadline_at = NOW - timedelta(minutes=5)
    requests.redrive(plan, None, "deployed", ["left"])
    group = plan.step("fan")
    assert group.deadline_at is None  # starts again with the next branch start
    assert group.schedule_deadline_at == NOW + timedelta(seconds=30)
    assert plan.task.deadline_at is None
    assert not rescue.needs_rescue(plan, {plan.step("left").job_id: rescue.ALIVE}, TIMING)


def test_a_task_is_not_resolved_while_a_step_still_runs():
    plan = plan_for(
        grouped("all"),
        "dead_lettered",
        first={"status": "failed"},
        fan={"status": "running"},
        left={"status": "running", "running": running()},
    )
    with pytest.raises(requests.NotAllowed):
        requests.resolve(plan, None, "closing it")


def test_the_reaper_stops_a_sibling_that_ignores_a_failure_undo():
    attempt = running(worker="w2", job_id="saga-t1-right-a1")
    plan = plan_for(
        grouped("all"),
        "compensating",
        first={"status": "succeeded"},
        fan={"status": "failed"},
        left={"status": "failed"},
        right={"status": "running", "running": attempt},
    )
    plan.task.undo_started_at = NOW - timedelta(seconds=25)
    assert rescue.wake_time(plan, TIMING) == plan.task.undo_started_at + timedelta(seconds=20)
    rescue.rescue(plan, {}, TIMING)
    assert of(plan, SignalTask)
    assert [(e.step, e.worker) for e in of(plan, StopAttempt)] == [("right", "w2")]


def test_a_gap_restarts_even_the_watches_this_worker_does_not_know():
    state = {"last": 100.0, "since:10": 50.0, "since:45": 50.0}
    after_gap = watch_after(state, 130.0, {10})  # 45 s: a saga only newer workers have
    assert after_gap["since:45"] == 50.0  # 30 s gap < 45 s: still watched
    after_long_gap = watch_after(state, 200.0, {10})
    assert after_long_gap["since:45"] == 200.0


def test_a_task_waiting_for_a_free_worker_is_looked_at_less_and_less_often():
    from sagas.engine.reaper import ReapReport, _next_look

    jid = "saga-t1-one-a1"
    looks = []
    for waited in (0, 30, 120, 600, 3600):
        plan = plan_for(linear(), "pending", one={"status": "pending", "job_id": jid})
        plan.task.updated_at = NOW - timedelta(seconds=waited)
        wake = _next_look(plan, {jid: rescue.ALIVE}, TIMING, ReapReport())
        assert wake is not None
        looks.append((wake - NOW).total_seconds())
    assert looks == [10.0, 30.0, 120.0, 600.0, 900.0]  # capped at SAGAS_STUCK_AFTER
    later = NOW + timedelta(minutes=5)
    waiting = plan_for(
        linear(),
        "waiting_retry",
        one={
            "status": "waiting_retry",
            "next_attempt_at": later,
            "job_id": "saga-t1-one-a2",
            "attempt_count": 1,
        },
    )
    assert (
        _next_look(waiting, {"saga-t1-one-a2": rescue.STUCK_SCHEDULED}, TIMING, ReapReport())
        == later + TIMING.grace
    )


# --- details the audit trail and the reaper rely on ------------------------------------------


def test_a_failed_task_stops_what_still_runs_and_keeps_its_error():
    saga = Saga("fails", lock_expiry_s=10)
    saga.step(name="a", retry=RetryPolicy(max_retries=0, on_exhausted="fail"))(noop)
    fan = saga.parallel("fan", mode="all", after=[])
    fan.branch(name="slow")(noop)
    plan = plan_for(
        saga,
        a={"status": "running", "attempt_count": 1},
        fan={"status": "running"},
        slow={"status": "running", "running": running()},
    )
    decisions.action_ended(plan, plan.step("a"), Outcome("failed", error="x" * 3000))
    assert of(plan, SignalTask)
    assert plan.step("fan").status == StepStatus.FAILED  # a stopped group, not "undone"
    move = of(plan, MoveTask)[-1]
    assert (move.to, move.fields["finished_at"]) == ("failed", NOW)
    assert move.fields["error_summary"] == ("a: " + "x" * 3000)[:2000]
    quiet = plan_for(linear(), one={"status": "failed", "attempt_count": 1})
    decisions.fail(quiet, "one: no")
    assert not of(quiet, SignalTask)  # nothing ran beside it


def test_a_stop_names_exactly_the_attempt_and_where_it_runs():
    plan = plan_for(linear())
    attempt = AttemptRow(7, "action", 3, worker="w9", job_id="saga-t1-one-a3")
    plan.stop_attempt(plan.step("one"), attempt)
    assert of(plan, StopAttempt) == [StopAttempt("one", "action", 3, "w9", "saga-t1-one-a3")]


def test_a_race_follows_the_branch_that_settled_first():
    plan = plan_for(
        grouped("race"),
        first={"status": "succeeded"},
        fan={"status": "running"},
        left={"status": "running", "attempt_count": 1},
        right={"status": "running", "running": running(2)},
    )
    decisions.action_ended(plan, plan.step("left"), Outcome("failed", error="E: no"))
    assert plan.step("fan").status == StepStatus.FAILED
    assert task_moves(plan) == ["compensating"]


def test_a_branch_that_times_out_after_its_group_decided_is_let_go():
    plan = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "pending"},
        last={"status": "succeeded"},
    )
    decisions.give_up_before_start(plan, plan.step("right"), "too late")
    assert task_moves(plan) == ["completed"]


def test_a_compensation_without_code_fails_for_good_with_a_clear_record():
    plan = plan_for(linear(), "cancelling", one={"status": "succeeded"})
    decisions.code_missing_for_good(plan, plan.step("one"), AttemptKind.COMPENSATION)
    entry = next(e for e in of(plan, Audit) if e.action == "compensation_failed")
    assert entry.details["stack_trace"] == ""
    assert "no longer exists in the deployed code" in entry.details["error"]


def test_redrive_and_retry_compensation_say_what_they_did():
    parked = plan_for(
        dead_letter_first(),
        "dead_lettered",
        a={"status": "failed", "attempt_count": 2, "finished_at": NOW},
        b={"status": "succeeded"},
    )
    parked.task.deadline_at = None
    requests.redrive(parked, "ops", "fixed a", ["a"])
    a = parked.step("a")
    assert (a.status, a.finished_at, a.attempt_budget_base) == ("pending", None, 2)
    move = of(parked, MoveTask)[0]
    assert (move.to, move.action, move.actor, move.step) == ("running", "redriven", "ops", "a")
    assert move.details == {"reason": "fixed a", "step": "a", "steps": ["a"], "next_attempt": 3}
    assert move.fields["error_summary"] == ""
    undo = plan_for(
        linear(),
        "compensation_failed",
        one={
            "status": "compensation_failed",
            "compensation_attempt_count": 2,
            "next_attempt_at": NOW,
        },
    )
    undo.task.compensation_reason = "failure"
    requests.retry_compensation(undo, "ops", "bucket is back")
    assert undo.step("one").next_attempt_at is None
    move = of(undo, MoveTask)[0]
    assert (move.to, move.action, move.details) == (
        "compensating",
        "compensation_retried",
        {"reason": "bucket is back", "steps": ["one"]},
    )
    assert move.fields["finished_at"] is None


def test_an_operation_that_does_not_apply_says_which_and_why():
    with pytest.raises(requests.NotAllowed) as refused:
        requests.redrive(plan_for(linear(), "completed"), None, "x", None)
    assert (str(refused.value), refused.value.operation, refused.value.status) == (
        "redrive",
        "redrive",
        "completed",
    )
    assert refused.value.allowed == ("dead_lettered",)
    with pytest.raises(requests.NotAllowed) as refused:
        requests.retry_compensation(plan_for(linear(), "running"), None, "x")
    assert refused.value.operation == "retry the compensation of"
    with pytest.raises(requests.NotAllowed) as refused:
        requests.resolve(plan_for(linear(), "running"), None, "x")
    assert refused.value.operation == "resolve"


def test_only_failures_that_block_the_task_are_redriven():
    plan = plan_for(
        grouped("all_settled"),
        "dead_lettered",
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "failed"},
        right={"status": "succeeded"},
        last={"status": "failed", "attempt_count": 1},
    )
    requests.redrive(plan, None, "fixed", None)
    assert [s for s, _, _ in scheduled(plan)] == ["last"]  # left's failure was a result


def test_groups_that_settled_while_parked_all_join_each_by_its_last_branch():
    saga = Saga("two-groups", lock_expiry_s=10)
    saga.step(name="a", retry=RetryPolicy(max_retries=0, on_exhausted="dead_letter"))(noop)
    for group_name in ("g1", "g2"):
        group = saga.parallel(group_name, mode="any", after=[])
        for name in (f"{group_name}x", f"{group_name}y"):
            group.branch(name=name)(noop).compensate(noop)
    early, late = NOW - timedelta(seconds=9), NOW - timedelta(seconds=1)
    plan = plan_for(
        saga,
        "dead_lettered",
        a={"status": "failed", "attempt_count": 1},
        g1={"status": "running"},
        g2={"status": "running"},
        g1x={"status": "failed", "finished_at": early, "error": "E: x"},
        g1y={"status": "succeeded", "finished_at": late},
        g2x={"status": "succeeded", "finished_at": early},
        g2y={"status": "succeeded", "finished_at": None},
    )
    requests.redrive(plan, None, "fixed", ["a"])
    assert [s for s, _, _ in scheduled(plan)] == ["a"]  # g1x's failure was a result
    assert plan.step("g1").status == StepStatus.SUCCEEDED
    assert plan.step("g2").status == StepStatus.SUCCEEDED


def test_a_saga_deadline_is_no_wake_up_for_tasks_it_no_longer_applies_to():
    deadline = NOW + timedelta(hours=1)
    for status in ("dead_lettered", "compensating"):
        plan = plan_for(linear(), status, one={"status": "running", "running": running()})
        plan.task.deadline_at = deadline
        assert rescue.wake_time(plan, TIMING) != deadline
    done = plan_for(
        grouped("any"),
        first={"status": "succeeded"},
        fan={"status": "succeeded"},
        left={"status": "succeeded"},
        right={"status": "running", "running": running()},
        last={"status": "succeeded"},
    )
    done.task.deadline_at = deadline
    assert rescue.wake_time(done, TIMING) != deadline


def test_resolve_records_who_closed_the_task_and_why():
    plan = plan_for(linear(), "failed", one={"status": "failed"}, two={"status": "pending"})
    requests.resolve(plan, "ops", "refunded by hand")
    move = of(plan, MoveTask)[-1]
    assert (move.to, move.action, move.actor, move.details) == (
        "resolved",
        "resolved",
        "ops",
        {"note": "refunded by hand"},
    )
    assert move.fields == {
        "resolved_by": "ops",
        "resolution_note": "refunded by hand",
        "finished_at": NOW,
    }
    assert plan.step("two").status == StepStatus.SKIPPED


def test_every_end_records_when_it_ended():
    done = plan_for(
        linear(),
        one={"status": "succeeded"},
        two={"status": "succeeded"},
        three={"status": "succeeded"},
    )
    decisions.advance(done)
    end = of(done, MoveTask)[-1]
    assert (end.to, end.fields) == ("completed", {"finished_at": NOW, "current_step": ""})
    for reason, to, fields in (
        ("cancel", "cancelled", {"finished_at": NOW, "cancelled_at": NOW}),
        ("failure", "compensated", {"finished_at": NOW}),
    ):
        status = "cancelling" if reason == "cancel" else "compensating"
        plan = plan_for(linear(), status, one={"status": "compensated"})
        plan.task.compensation_reason = reason
        decisions.compensate_next(plan)
        end = of(plan, MoveTask)[-1]
        assert (end.to, end.fields) == (to, fields)
    failed = plan_for(
        linear(),
        "compensating",
        one={"status": "compensation_failed", "compensation_error": "IOError: disk gone"},
    )
    decisions.compensate_next(failed)
    end = of(failed, MoveTask)[-1]
    # The summary names the undo that needs a human, not the step whose failure began it.
    summary = "compensation of one failed: IOError: disk gone"
    assert (end.to, end.fields) == (
        "compensation_failed",
        {"finished_at": NOW, "error_summary": summary},
    )
    assert of(failed, NotifyCompensationFailed)


def test_a_cancel_records_who_asked_and_stops_waiting_retries_at_once():
    plan = plan_for(
        linear(),
        "waiting_retry",
        one={"status": "succeeded"},
        two={"status": "waiting_retry", "next_attempt_at": NOW},
    )
    requests.cancel(plan, "ops", "customer called")
    two = plan.step("two")
    assert (two.status, two.finished_at, two.next_attempt_at) == ("cancelled", NOW, None)
    move = of(plan, MoveTask)[0]
    assert (move.to, move.actor) == ("cancelling", "ops")
    assert move.fields == {
        "cancel_requested_at": NOW,
        "cancelled_by": "ops",
        "cancel_reason": "customer called",
        "compensation_reason": "cancel",
        "undo_started_at": NOW,
    }
    assert next((e.action, e.actor, e.details) for e in of(plan, Audit)) == (
        "cancel_requested",
        "ops",
        {"reason": "customer called", "by": "operator", "from_status": "waiting_retry"},
    )


# --- where a mutation run found nothing watching ---------------------------------------------


def test_a_breaker_open_past_the_groups_deadline_gives_the_branch_up_at_once():
    fan = {"status": "running", "deadline_at": NOW + timedelta(seconds=5)}
    before = plan_for(grouped(), first={"status": "succeeded"}, fan=fan)
    decisions.defer_for_breaker(before, before.step("left"), NOW + timedelta(seconds=4), "s3")
    assert (before.step("left").status, before.step("left").next_attempt_at) == (
        StepStatus.WAITING_RETRY,
        NOW + timedelta(seconds=4),
    )
    # Half-opening exactly at the deadline is too late: the branch could not run in time.
    at_deadline = plan_for(grouped(), first={"status": "succeeded"}, fan=fan)
    left = at_deadline.step("left")
    decisions.defer_for_breaker(at_deadline, left, NOW + timedelta(seconds=5), "s3")
    assert left.status != StepStatus.WAITING_RETRY and left.error.startswith("timed out")
    assert not [a for a in of(at_deadline, Audit) if a.action == "breaker_open"]


def test_cancelling_a_running_task_with_only_queued_work_names_who_on_every_move():
    plan = plan_for(linear(), "running")  # a redriven first step, queued, not started
    operator = object()
    answer = requests.cancel(plan, operator, "wrong order")
    assert (answer.outcome, answer.status) == ("cancelled", "cancelled")
    moves = of(plan, MoveTask)
    assert [m.to for m in moves] == ["cancelling", "cancelled"]
    assert all(m.actor is operator for m in moves)


def test_a_step_that_fails_for_good_says_why_in_its_audit_entry_and_the_summary():
    saga = Saga("audited")
    saga.step(name="a")(noop).compensate(noop)
    saga.step(name="b", retry=RetryPolicy(max_retries=1, on_exhausted="compensate"))(noop)
    plan = plan_for(saga, a={"status": "succeeded"}, b={"status": "running", "attempt_count": 2})
    decisions.action_ended(plan, plan.step("b"), Outcome("failed", error="card declined"))
    failed = [a for a in of(plan, Audit) if a.action == "step_failed"]
    assert [(a.step, a.details) for a in failed] == [
        (
            "b",
            {
                "error": "card declined",
                "attempt_count": 2,
                "critical": True,
                "on_exhausted": "compensate",
            },
        )
    ]
    compensating = of(plan, MoveTask)[0]
    assert (compensating.to, compensating.fields["compensation_reason"]) == (
        "compensating",
        "failure",
    )
    assert compensating.fields["error_summary"] == "b: card declined"
