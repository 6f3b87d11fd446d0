"""The demo's findings (``sagas.demo_data``): set up for real on the suite's redis-server and
moto's S3 server, and found by a real dry reconciliation run."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from io import StringIO

import boto3
import pytest
from django.core.management import call_command

from sagas import demo_data, reconciliation
from sagas.engine import apply, dispatch, reaper, rescue
from sagas.engine.connection import queue, redis
from sagas.examples.create_zip import create_zip
from sagas.management.commands.demo import DEMO_TASKS
from sagas.models import (
    Finding,
    FindingKind,
    OwnedKey,
    ReconciliationRun,
    StepAttempt,
    TaskInstance,
)
from sagas.states import ACTIVE_TASK_STATUSES
from tests.engine.conftest import drain

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_redis")]

PREFIX = create_zip.s3_prefix
OUTSIDE = {
    "create-zip-old/sibling.zip": b"a sibling prefix",
    "archive/create-zip/kept.zip": b"archived long ago",
    "unrelated.txt": b"not a saga's",
}


@pytest.fixture
def s3(s3_server, settings, monkeypatch):
    """A fresh bucket on the shared moto server, holding objects outside create-zip's prefix."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"demo-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket=bucket)
    settings.AWS_ENDPOINT_URL = s3_server.endpoint_url
    settings.SAGAS_S3_BUCKET = bucket
    client.bucket = bucket
    for key, body in OUTSIDE.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return client


def listing(s3) -> dict[str, tuple[str, datetime]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    return {
        o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])
    }


def open_finding(kind: str) -> Finding:
    return Finding.objects.get(kind=kind, state="open")


def test_seeding_records_one_open_finding_of_each_kind_and_deletes_nothing(s3, settings):
    settings.SAGAS_RECONCILE_INTERVAL = 3600
    outside_before = {k: v for k, v in listing(s3).items() if not k.startswith(PREFIX)}
    seeded = demo_data.seed_demo_findings()
    assert seeded is not None
    run = seeded.run
    assert (run.trigger, run.applied, run.status) == ("command", False, "succeeded")
    assert sorted(Finding.objects.values_list("kind", flat=True)) == sorted(FindingKind.values)
    assert set(Finding.objects.values_list("state", "run")) == {("open", run.pk)}
    assert all(run.counts[kind] == 1 for kind in FindingKind.values)

    # S3: nothing outside the prefix touched; under it, the two orphans, kept by a dry run.
    after = listing(s3)
    assert {k: v for k, v in after.items() if not k.startswith(PREFIX)} == outside_before
    assert {k for k in after if k.startswith(PREFIX)} == {
        demo_data.LEFT_BEHIND,
        demo_data.JUST_UPLOADED,
    }
    assert open_finding("orphan_object").key == demo_data.LEFT_BEHIND
    assert open_finding("recent_orphan").key == demo_data.JUST_UPLOADED
    uploaded_apart = after[demo_data.JUST_UPLOADED][1] - after[demo_data.LEFT_BEHIND][1]
    assert uploaded_apart >= demo_data.ORPHAN_GAP

    # A key the engine recorded for a succeeded step, gone from S3.
    missing = open_finding("missing_object")
    task = seeded.missing_object_task
    owned = OwnedKey.objects.get(key=missing.key)
    assert missing.task_id == task.pk == owned.step.task_id
    assert (task.status, owned.step.status) == ("completed", "succeeded")
    assert missing.key == f"{PREFIX}{task.pk}.zip" and missing.key not in after

    # Its lock, back in Redis with the token of its finished attempt.
    stale = open_finding("stale_lock")
    attempt = StepAttempt.objects.get(step__task=task)
    assert (attempt.outcome, attempt.worker) == ("succeeded", demo_data.SEEDING_WORKER)
    assert stale.key == seeded.stale_lock == attempt.lock_key
    assert redis().get(stale.key) == attempt.lock_token.encode()
    assert stale.task_id == task.pk

    # Active, no job anywhere, unchanged for longer than SAGAS_STUCK_AFTER.
    stuck = open_finding("stuck_task")
    assert stuck.task_id == seeded.stuck_task.pk
    plan = apply.load_plans([stuck.task_id], apply.database_now())[0]
    assert plan.task.status in ACTIVE_TASK_STATUSES
    jobs = rescue.jobs_to_check(plan)
    assert jobs and set(dispatch.job_states(jobs).values()) == {rescue.MISSING}
    assert rescue.stuck(plan, dispatch.job_states(jobs), apply.timing())

    # The run counts as this interval's: the workers do not start one at once.
    assert not reaper.schedule_reconciliation()

    # Seeded once: a second call finds findings and does nothing.
    assert demo_data.seed_demo_findings() is None
    assert ReconciliationRun.objects.count() == 1
    assert listing(s3) == after


def test_the_reaper_moves_the_stuck_task_and_the_next_run_resolves_its_finding(s3, settings):
    settings.SAGAS_REAPER_GRACE = 1  # the reaper may look at once (the demo's is 10 s)
    seeded = demo_data.seed_demo_findings()
    assert seeded is not None
    report = reaper.reap(force=True)
    assert report is not None and report.requeued_jobs
    drain()
    task = TaskInstance.objects.get(pk=seeded.stuck_task.pk)
    assert task.status == "completed"
    again = reconciliation.reconcile(reconciliation.scope_for(grace=seeded.grace))
    assert again is not None
    assert Finding.objects.get(kind="stuck_task").state == "resolved"
    # What nobody repaired is still found.
    for kind in ("missing_object", "stale_lock"):
        assert Finding.objects.get(kind=kind).state == "open"


def test_the_demo_seeds_its_tasks_then_its_findings_without_running_the_tasks(s3):
    out = StringIO()
    call_command("demo", "--seed-only", stdout=out)
    assert f"Created {len(DEMO_TASKS)} demo tasks." in out.getvalue()
    assert "Recorded reconciliation run #" in out.getvalue()
    assert "1 orphan_object, 1 recent_orphan, 1 missing_object, 1 stuck_task, 1 stale_lock" in (
        out.getvalue()
    )
    assert set(Finding.objects.values_list("state", flat=True)) == {"open"}
    assert Finding.objects.count() == len(FindingKind.values)
    # Only the seeding's own create-zip job ran; the demo tasks' jobs wait for the workers.
    assert set(StepAttempt.objects.values_list("worker", flat=True)) == {demo_data.SEEDING_WORKER}
    assert queue().count >= len(DEMO_TASKS)
    out = StringIO()
    call_command("demo", "--seed-only", stdout=out)
    assert "Demo tasks exist already." in out.getvalue()
    assert "Reconciliation findings exist already." in out.getvalue()
    assert ReconciliationRun.objects.count() == 1


def test_a_grace_fits_strictly_between_two_ages():
    older, younger = timedelta(seconds=5.2), timedelta(seconds=3.1)
    grace = demo_data.grace_between(older, younger)
    assert younger < grace < older and grace.total_seconds() == int(grace.total_seconds())
    with pytest.raises(ValueError, match="too close"):
        demo_data.grace_between(timedelta(seconds=3), timedelta(seconds=2))
