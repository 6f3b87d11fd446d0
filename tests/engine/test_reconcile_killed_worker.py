"""Reconciliation after a real worker was killed with SIGKILL mid-step (Postgres)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sagas import reconciliation
from sagas.engine.connection import redis
from sagas.models import Finding, StepAttempt, TaskInstance
from sagas.services import start
from tests.engine.conftest import kill_tree, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_a_killed_workers_task_is_a_stuck_task_and_its_lock_a_stale_lock(workers):
    doomed = workers("doomed")
    task, _ = start("chaos", {"sleep_ms": {"ship": 30000}})
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
