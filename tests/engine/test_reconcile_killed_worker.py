"""Reconciliation after a real worker was killed with SIGKILL mid-step (Postgres), and the
console's actions that clear what it found."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sagas import finding_actions, reconciliation
from sagas.engine.connection import redis
from sagas.models import AuditEntry, Finding, StepAttempt, TaskInstance
from sagas.services import NothingToDo, start
from tests.conftest import console_group
from tests.engine.conftest import kill_tree, terminal, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_a_killed_workers_task_is_a_stuck_task_and_its_lock_a_stale_lock(
    workers, django_user_model
):
    doomed = workers("doomed")
    task, _ = start("chaos", {"sleep_ms": {"ship": 6000}})
    attempt = wait_for(
        lambda: StepAttempt.objects.filter(
            step__task=task, step__name="ship", outcome="running"
        ).first(),
        30,
        message="ship never started",
    )
    kill_tree(doomed.pid)  # the worker and its work horse, SIGKILL: no finally runs
    attempt.refresh_from_db()
    # What time does to a killed worker, without waiting for it: its lock outlives it (as a
    # saga's longer lock expiry would), its heartbeat and RQ registration expire, and the
    # task stays unchanged past SAGAS_STUCK_AFTER (no rescuer worker runs the reaper).
    assert redis().persist(attempt.lock_key) or redis().exists(attempt.lock_key)
    for key in redis().scan_iter(match="rq:worker:doomed-*"):
        redis().delete(key)
    long_ago = timezone.now() - timedelta(hours=1)
    StepAttempt.objects.filter(pk=attempt.pk).update(heartbeat_expires_at=long_ago)
    TaskInstance.objects.filter(pk=task.pk).update(updated_at=long_ago)

    run = reconciliation.reconcile(reconciliation.Scope([], "chaos"))
    assert run is not None and run.status == "succeeded"
    stuck = Finding.objects.get(kind="stuck_task")
    assert (stuck.saga, stuck.key, stuck.task_id) == ("chaos", str(task.pk), task.pk)
    stale = Finding.objects.get(kind="stale_lock")
    assert (stale.key, stale.task_id, stale.details["token"]) == (
        attempt.lock_key,
        task.pk,
        attempt.lock_token,
    )

    # The operator's console actions clear both, each checked again when it runs.
    operator = django_user_model.objects.create_user("night-shift", is_staff=True)
    operator.groups.add(console_group("Saga operators"))
    note = "worker host died at 03:12"
    assert finding_actions.act("release_lock", stale.pk, operator, note) == (
        f"released {attempt.lock_key}"
    )
    assert redis().get(attempt.lock_key) is None
    done = finding_actions.act("requeue_task", stuck.pk, operator, note)
    assert "1 dead attempt(s) settled as lost" in done
    attempt.refresh_from_db()
    assert attempt.outcome == "lost"
    assert {f.state for f in Finding.objects.all()} == {"resolved"}
    requeued = AuditEntry.objects.get(task=task, action="task_requeued")
    assert (requeued.actor, requeued.details["note"]) == (operator, note)
    # A new worker picks the re-enqueued work up and the task ends as scripted.
    workers("rescuer")
    wait_for(lambda: terminal(task), 90, message="the pushed task never finished")
    assert task.status == "completed"
    # Nothing is stuck any more: a second push finds nothing to do.
    with pytest.raises(NothingToDo):
        finding_actions.act("requeue_task", stuck.pk, operator, note)
