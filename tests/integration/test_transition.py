"""``transition()``: table check, fenced conditional update, audit entry in the same transaction."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from sagas.models import AuditEntry, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import StepStatus, TaskStatus
from sagas.transitions import IllegalTransition, transition, transition_step

pytestmark = pytest.mark.django_db


@pytest.fixture
def task():
    created, _ = start("chaos", {})
    return created


def test_a_won_transition_bumps_the_version_and_writes_one_audit_entry(task, operator):
    assert transition(
        task,
        TaskStatus.RUNNING,
        actor=operator,
        details={"why": "test"},
        fields={"current_step": "reserve"},
    )
    assert (task.status, task.version, task.current_step) == ("running", 1, "reserve")
    stored = TaskInstance.objects.get(pk=task.pk)
    assert (stored.status, stored.version, stored.current_step) == ("running", 1, "reserve")
    entry = AuditEntry.objects.filter(task=task).latest("id")
    assert (entry.action, entry.from_status) == ("transition", "pending")
    assert entry.to_status == "running"
    assert (entry.actor, entry.details) == (operator, {"why": "test"})


def test_a_stale_writer_cannot_overwrite_a_newer_state(task):
    stale = TaskInstance.objects.get(pk=task.pk)
    assert transition(task, TaskStatus.RUNNING)
    assert transition(task, TaskStatus.COMPLETED)
    audit_before = AuditEntry.objects.count()
    # The stale copy still believes the task is pending at version 0.
    assert not transition(stale, TaskStatus.CANCELLED)
    assert stale.status == "pending"  # the loser's copy is untouched: it must re-read
    assert TaskInstance.objects.get(pk=task.pk).status == "completed"
    assert AuditEntry.objects.count() == audit_before


def test_same_status_but_older_version_loses(task):
    stale = TaskInstance.objects.get(pk=task.pk)
    assert transition(task, TaskStatus.RUNNING)
    assert transition(task, TaskStatus.WAITING_RETRY)
    assert transition(task, TaskStatus.RUNNING)
    stale.status, stale.version = "running", 1  # right status, old fencing token
    assert not transition(stale, TaskStatus.COMPLETED)
    assert TaskInstance.objects.get(pk=task.pk).version == 3


def test_the_table_refuses_illegal_transitions_without_touching_the_row(task):
    with pytest.raises(IllegalTransition, match="pending -> completed is not allowed"):
        transition(task, TaskStatus.COMPLETED)
    stored = TaskInstance.objects.get(pk=task.pk)
    assert (stored.status, stored.version) == ("pending", 0)
    assert AuditEntry.objects.filter(task=task).count() == 1


def test_the_audit_entry_and_the_status_commit_or_roll_back_together(task, monkeypatch):
    from sagas import audit

    def broken_record(*args, **kwargs):
        raise RuntimeError("audit write failed")

    monkeypatch.setattr(audit, "record", broken_record)
    with pytest.raises(RuntimeError, match="audit write failed"):
        transition(task, TaskStatus.RUNNING)
    assert TaskInstance.objects.get(pk=task.pk).status == "pending"


def test_a_plain_save_cannot_write_back_a_status(task):
    stale = TaskInstance.objects.get(pk=task.pk)
    assert transition(task, TaskStatus.RUNNING)
    stale.error_summary = "note"
    with pytest.raises(ValueError, match=r"use sagas\.transitions\.transition"):
        stale.save()
    stale.save(update_fields=["error_summary"])
    stored = TaskInstance.objects.get(pk=task.pk)
    assert (stored.status, stored.version, stored.error_summary) == ("running", 1, "note")
    step = StepRecord.objects.get(task=task, name="reserve")
    with pytest.raises(ValueError, match="cannot write status or version"):
        step.save(update_fields=["status"])


def test_step_transitions_are_fenced_too(task):
    step = StepRecord.objects.get(task=task, name="reserve")
    stale = StepRecord.objects.get(pk=step.pk)
    assert transition_step(step, StepStatus.RUNNING)
    assert transition_step(step, StepStatus.SUCCEEDED, fields={"data": {"ok": 1}})
    assert not transition_step(stale, StepStatus.SKIPPED)
    stored = StepRecord.objects.get(pk=step.pk)
    assert (stored.status, stored.version, stored.data) == ("succeeded", 2, {"ok": 1})
    with pytest.raises(IllegalTransition, match="succeeded -> running"):
        transition_step(step, StepStatus.RUNNING)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_transition_that_waits_for_an_uncommitted_winner_loses():
    """Deterministic interleaving: B's UPDATE blocks on A's row lock, then finds nothing."""
    task, _ = start("chaos", {})
    assert transition(task, TaskStatus.RUNNING)
    a_updated, a_may_commit = threading.Event(), threading.Event()
    results: dict[str, bool] = {}

    def winner():
        try:
            copy = TaskInstance.objects.get(pk=task.pk)
            with transaction.atomic():
                results["a"] = transition(copy, TaskStatus.COMPLETED)
                a_updated.set()
                a_may_commit.wait(10)
        finally:
            connection.close()

    def loser():
        try:
            copy = TaskInstance.objects.get(pk=task.pk)  # read before A commits: same version
            a_updated.wait(10)
            threading.Timer(0.5, a_may_commit.set).start()
            results["b"] = transition(copy, TaskStatus.CANCELLING)
        finally:
            connection.close()

    threads = [threading.Thread(target=winner), threading.Thread(target=loser)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"a": True, "b": False}
    assert TaskInstance.objects.get(pk=task.pk).status == "completed"
    assert AuditEntry.objects.filter(task=task, from_status="running").count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("targets", [("completed", "cancelling"), ("cancelling", "cancelling")])
def test_concurrent_transitions_from_one_state_have_exactly_one_winner(targets):
    task, _ = start("chaos", {})
    assert transition(task, TaskStatus.RUNNING)
    barrier = threading.Barrier(len(targets))
    outcomes: list[bool] = []

    def attempt(target):
        try:
            copy = TaskInstance.objects.get(pk=task.pk)
            barrier.wait()
            outcomes.append(transition(copy, TaskStatus(target)))
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False, True]
    stored = TaskInstance.objects.get(pk=task.pk)
    assert stored.version == 2
    entries = AuditEntry.objects.filter(task=task, from_status="running")
    assert entries.count() == 1
    assert entries.get().to_status == stored.status


# --- where a mutation run of transitions.py found nothing watching ----------------------------


def test_a_step_with_the_right_status_but_an_older_version_loses(task):
    step = StepRecord.objects.get(task=task, name="reserve")
    assert transition_step(step, StepStatus.RUNNING)
    stale = StepRecord.objects.get(pk=step.pk)  # running, version 1
    assert transition_step(step, StepStatus.WAITING_RETRY)
    assert transition_step(step, StepStatus.RUNNING)  # running again, version 3
    assert not transition_step(stale, StepStatus.SUCCEEDED, fields={"data": {"late": 1}})
    stored = StepRecord.objects.get(pk=step.pk)
    assert (stored.status, stored.version, stored.data) == ("running", 3, step.data)


def test_a_won_step_transition_is_seen_in_memory_with_its_fields(task):
    from django.db.models.functions import Now

    step = StepRecord.objects.get(task=task, name="reserve")
    assert transition_step(step, StepStatus.RUNNING, fields={"started_at": Now(), "progress": 5})
    # Plain values are copied onto the object; a database expression is not (re-read it).
    assert (step.status, step.version, step.progress) == ("running", 1, 5)
    assert step.started_at is None or not hasattr(step.started_at, "resolve_expression")
    assert StepRecord.objects.get(pk=step.pk).started_at is not None


def test_a_task_transition_about_a_step_names_the_step_in_its_audit_entry(task):
    step = StepRecord.objects.get(task=task, name="reserve")
    assert transition(task, TaskStatus.RUNNING, step=step)
    entry = AuditEntry.objects.filter(task=task).latest("id")
    assert entry.step == step
