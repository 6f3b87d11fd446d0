"""Reconciliation against moto's S3 server over HTTP (and Postgres for the concurrency)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from io import StringIO

import boto3
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from sagas import findings, ownership, reconciliation, storage
from sagas.engine.connection import redis
from sagas.engine.locks import lock_key
from sagas.examples.create_zip import create_zip
from sagas.models import (
    AuditEntry,
    Finding,
    OwnedKey,
    ReconciliationRun,
    StepAttempt,
    StepRecord,
    TaskInstance,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_redis")]

PREFIX = "create-zip/"
OWNED = [
    "create-zip/owned.zip",
    "create-zip/sub/dir/owned nested.zip",
    "create-zip/ünïcode ключ.zip",
]
OLD_ORPHANS = [
    "create-zip/old-orphan.zip",
    "create-zip/a b/old with space.zip",
    "create-zip/deep/er/ørphan 🦆.zip",
]
COMPENSATED = "create-zip/compensated.zip"
SIBLING = "create-zip-old/sibling.zip"
YOUNG_ORPHANS = ["create-zip/young.zip", "create-zip/young ü/x.zip"]
MISSING = "create-zip/missing.zip"
GRACE = timedelta(seconds=2)


@pytest.fixture
def s3(s3_server, settings, monkeypatch):
    """A fresh bucket per test on the shared moto server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"rec-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket=bucket)
    settings.AWS_ENDPOINT_URL = s3_server.endpoint_url
    settings.SAGAS_S3_BUCKET = bucket
    client.bucket = bucket
    return client


def put(s3, key: str) -> None:
    s3.put_object(Bucket=s3.bucket, Key=key, Body=b"zip")


def keys(s3, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def step_owning(key: str, *, status: str = "succeeded", saga: str = "create-zip") -> StepRecord:
    task = TaskInstance.objects.create(saga=saga, status="completed", trace_id="0" * 32)
    step = StepRecord.objects.create(
        task=task, index=0, name="upload", status=status, data={"Key": key}
    )
    if status != "compensated":
        ownership.record(step, saga, step.data)
    return step


def found(kind: str | None = None, state: str | None = None) -> set[str]:
    query = Finding.objects.all()
    if kind:
        query = query.filter(kind=kind)
    if state:
        query = query.filter(state=state)
    return set(query.values_list("key", flat=True))


@pytest.fixture
def world(s3):
    """The bucket of the issue: owned, old and young orphans, a sibling prefix, spaces,
    unicode, sub-folders, a compensated step's key, and an owned key that is missing.
    Returns the ``now`` at which old orphans are past the grace and young ones are not."""
    for key in [*OWNED, *OLD_ORPHANS, COMPENSATED, SIBLING]:
        put(s3, key)
    for key in [*OWNED, MISSING]:
        step_owning(key)
    step_owning(COMPENSATED, status="compensated")
    time.sleep(3)  # S3 keeps whole seconds: the young ones are clearly younger
    for key in YOUNG_ORPHANS:
        put(s3, key)
    newest = max(storage.head_object(k).last_modified for k in YOUNG_ORPHANS)  # type: ignore[union-attr]
    return newest + timedelta(seconds=0.5)


def run(now, *, apply_policies: bool = False, grace: timedelta = GRACE):
    scope = reconciliation.scope_for("create-zip", grace)
    result = reconciliation.reconcile(scope, apply_policies=apply_policies, now=now)
    assert result is not None
    return result


def test_a_dry_run_records_exactly_the_expected_findings_and_deletes_nothing(s3, world):
    before = keys(s3)
    result = run(world)
    assert result.status == "succeeded" and not result.applied
    assert found("orphan_object") == {*OLD_ORPHANS, COMPENSATED}
    assert found("recent_orphan") == set(YOUNG_ORPHANS)
    assert found("missing_object") == {MISSING}
    assert found(state="open") == found()
    assert keys(s3) == before
    assert result.counts["objects"] == len(OWNED + OLD_ORPHANS + YOUNG_ORPHANS) + 1
    assert result.counts["owned"] == len(OWNED)
    missing = Finding.objects.get(kind="missing_object")
    assert missing.task is not None and missing.details["step"] == "upload"


def test_apply_on_a_deleting_saga_deletes_only_old_orphans_under_the_prefix(s3, world):
    assert create_zip.orphan_policy == "delete"
    result = run(world, apply_policies=True)
    assert result.counts["deleted"] == len(OLD_ORPHANS) + 1
    assert keys(s3) == {*OWNED, *YOUNG_ORPHANS, SIBLING}
    assert found(state="deleted") == {*OLD_ORPHANS, COMPENSATED}
    assert found("recent_orphan", "open") == set(YOUNG_ORPHANS)
    audited = AuditEntry.objects.filter(action="orphan_deleted")
    assert {a.details["key"] for a in audited} == {*OLD_ORPHANS, COMPENSATED}
    assert all(a.from_status == "open" and a.to_status == "deleted" for a in audited)


def test_apply_on_a_reporting_saga_deletes_nothing(s3, world, monkeypatch):
    monkeypatch.setattr(create_zip, "orphan_policy", "report")
    before = keys(s3)
    run(world, apply_policies=True)
    assert keys(s3) == before
    assert found("orphan_object", "open") == {*OLD_ORPHANS, COMPENSATED}


def test_the_archive_policy_copies_then_deletes(s3, settings, monkeypatch):
    monkeypatch.setattr(create_zip, "orphan_policy", "archive")
    put(s3, "create-zip/old.zip")
    run(timezone.now() + timedelta(days=3), apply_policies=True, grace=timedelta(hours=48))
    assert keys(s3) == {settings.SAGAS_ARCHIVE_PREFIX + "create-zip/old.zip"}
    assert found(state="archived") == {"create-zip/old.zip"}


def test_a_key_owned_between_the_scan_and_the_deletion_is_not_deleted(s3, monkeypatch):
    late = "create-zip/late.zip"
    put(s3, late)
    put(s3, "create-zip/orphan.zip")
    head = storage.head_object

    def engine_writes_meanwhile(key: str) -> storage.StoredObject | None:
        if key == late and not OwnedKey.objects.filter(key=late).exists():
            step_owning(late)
        return head(key)

    monkeypatch.setattr(storage, "head_object", engine_writes_meanwhile)
    result = run(timezone.now() + timedelta(days=3), apply_policies=True)
    assert keys(s3) == {late}
    assert result.counts["kept_owned"] == 1
    assert Finding.objects.get(key=late).state == "resolved"


def test_an_ignored_orphan_stays_ignored_and_a_vanished_one_is_resolved(s3):
    put(s3, "create-zip/keep-me.zip")
    put(s3, "create-zip/goes-away.zip")
    later = timezone.now() + timedelta(days=3)
    run(later)
    ignored = Finding.objects.get(key="create-zip/keep-me.zip")
    assert findings.change_state(ignored, "ignored", now=timezone.now())
    s3.delete_object(Bucket=s3.bucket, Key="create-zip/goes-away.zip")
    second = run(later, apply_policies=True)
    assert keys(s3) == {"create-zip/keep-me.zip"}
    ignored.refresh_from_db()
    assert ignored.state == "ignored" and ignored.run_id == second.pk
    gone = Finding.objects.get(key="create-zip/goes-away.zip")
    assert gone.state == "resolved"
    assert Finding.objects.count() == 2  # one per (saga, kind, key) across runs
    actions = list(AuditEntry.objects.order_by("pk").values_list("action", flat=True))
    assert actions == ["finding_ignored", "finding_resolved"]


def test_an_ignored_young_orphan_that_ages_stays_the_same_ignored_finding(s3, saga_operator):
    key = "create-zip/young, then old.zip"
    put(s3, key)
    run(timezone.now(), grace=timedelta(hours=48))
    young = Finding.objects.get(key=key)
    assert young.kind == "recent_orphan"
    assert findings.change_state(young, "ignored", actor=saga_operator, now=timezone.now())
    assert create_zip.orphan_policy == "delete"
    second = run(timezone.now() + timedelta(seconds=5), apply_policies=True, grace=timedelta(0))
    aged = Finding.objects.get(key=key)
    assert (aged.pk, aged.kind, aged.state) == (young.pk, "orphan_object", "ignored")
    assert aged.acted_by == saga_operator and aged.first_seen == young.first_seen
    assert aged.run_id == second.pk and aged.last_seen > young.last_seen
    assert aged.details["was"] == {"kind": "recent_orphan", "until_run": second.pk}
    assert keys(s3) == {key}  # ignored: never deleted by the policy
    assert second.counts.get("deleted", 0) == 0
    actions = list(AuditEntry.objects.values_list("action", flat=True))
    assert actions == ["finding_ignored"]  # a change of kind is not a change of state
    # later runs keep the note of what it was
    third = run(timezone.now() + timedelta(seconds=5), grace=timedelta(0))
    aged.refresh_from_db()
    assert aged.run_id == third.pk and aged.details["was"]["kind"] == "recent_orphan"


def test_an_orphan_seen_young_again_with_a_larger_grace_is_the_same_finding(s3):
    key = "create-zip/old.zip"
    put(s3, key)
    later = timezone.now() + timedelta(days=3)
    run(later, grace=timedelta(hours=48))
    old = Finding.objects.get(key=key)
    assert (old.kind, old.state) == ("orphan_object", "open")
    second = run(later, grace=timedelta(days=7))
    young = Finding.objects.get(key=key)
    assert (young.pk, young.kind, young.state) == (old.pk, "recent_orphan", "open")
    assert young.details["was"] == {"kind": "orphan_object", "until_run": second.pk}
    assert not AuditEntry.objects.exists()


def test_with_both_orphan_findings_of_a_key_the_kind_seen_is_kept_and_the_other_resolved(s3):
    key = "create-zip/both.zip"
    put(s3, key)
    earlier = ReconciliationRun.objects.create(trigger="command", status="succeeded")
    now = timezone.now()
    made = {
        kind: Finding.objects.create(
            run=earlier, kind=kind, saga="create-zip", key=key, first_seen=now, last_seen=now
        )
        for kind in ("recent_orphan", "orphan_object")
    }
    second = run(timezone.now() + timedelta(days=3), grace=timedelta(hours=48))
    kept = Finding.objects.get(pk=made["orphan_object"].pk)
    assert (kept.kind, kept.state, kept.run_id) == ("orphan_object", "open", second.pk)
    assert "was" not in kept.details
    other = Finding.objects.get(pk=made["recent_orphan"].pk)
    assert (other.kind, other.state) == ("recent_orphan", "resolved")


def test_many_pages_are_streamed(s3, monkeypatch):
    for n in range(25):
        put(s3, f"create-zip/p/{n:03}.zip")
    step_owning("create-zip/p/007.zip")
    pages = []
    original = storage.list_pages

    def small_pages(prefix: str, page_size: int = 1000):
        for page in original(prefix, page_size=10):
            pages.append(len(page))
            yield page

    monkeypatch.setattr(storage, "list_pages", small_pages)
    result = run(timezone.now() + timedelta(days=3))
    assert pages == [10, 10, 5]
    assert result.counts["orphan_object"] == 24 and result.counts["owned"] == 1
    assert result.counts.get("missing_object", 0) == 0


# --- the command -------------------------------------------------------------------------


def test_the_command_prints_one_json_summary_and_changes_nothing_without_apply(s3):
    put(s3, "create-zip/orphan.zip")
    out = StringIO()
    call_command("reconcile", "--saga", "create-zip", "--grace", "0s", "--json", stdout=out)
    summary = json.loads(out.getvalue())
    assert summary["status"] == "succeeded" and summary["applied"] is False
    assert summary["counts"]["orphan_object"] == 1
    assert keys(s3) == {"create-zip/orphan.zip"}
    assert ReconciliationRun.objects.get().trigger == "command"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grace", "soon"], "invalid duration"),
        (["--saga", "nope"], "unknown saga"),
        (["--saga", "chaos"], "has no s3_prefix"),
    ],
)
def test_bad_arguments_exit_2_and_record_no_run(argv, message):
    with pytest.raises(CommandError, match=message) as caught:
        call_command("reconcile", *argv)
    assert caught.value.returncode == 2
    assert not ReconciliationRun.objects.exists()


def test_s3_unreachable_exits_1_with_one_line_and_the_run_failed(s3, settings):
    settings.AWS_ENDPOINT_URL = "http://127.0.0.1:1"
    with pytest.raises(CommandError) as caught:
        call_command("reconcile", "--saga", "create-zip")
    assert caught.value.returncode == 1
    assert str(caught.value) == "S3 endpoint unreachable: http://127.0.0.1:1"
    failed = ReconciliationRun.objects.get()
    assert failed.status == "failed" and failed.error == str(caught.value)
    assert failed.finished_at is not None


def test_a_missing_bucket_is_named(s3, settings):
    settings.SAGAS_S3_BUCKET = "no-such-bucket-here"
    with pytest.raises(CommandError, match="'no-such-bucket-here' does not exist") as caught:
        call_command("reconcile", "--saga", "create-zip")
    assert caught.value.returncode == 1


def test_a_second_run_while_one_runs_says_so_and_does_nothing(s3):
    ReconciliationRun.objects.create(
        trigger="command",
        holder=f"{socket.gethostname()}:{os.getpid()}",
        heartbeat_at=timezone.now(),
    )
    out = StringIO()
    call_command("reconcile", "--saga", "create-zip", stdout=out)
    assert "another reconciliation run is in progress" in out.getvalue()
    assert ReconciliationRun.objects.count() == 1


def test_a_crashed_run_is_marked_failed_and_the_next_starts_clean(s3):
    dead = ReconciliationRun.objects.create(
        trigger="schedule",
        holder=f"{socket.gethostname()}:999999999",
        heartbeat_at=timezone.now(),
    )
    silent = timezone.now() - reconciliation.RUN_STALE_AFTER - timedelta(minutes=1)
    ReconciliationRun.objects.filter(pk=dead.pk).update(status="failed")
    quiet = ReconciliationRun.objects.create(
        trigger="schedule", holder="another-host:1", heartbeat_at=silent
    )
    out = StringIO()
    call_command("reconcile", "--saga", "create-zip", stdout=out)
    quiet.refresh_from_db()
    assert quiet.status == "failed" and "crashed" in quiet.error
    assert ReconciliationRun.objects.latest("pk").status == "succeeded"
    # and a holder on this host whose process is gone needs no wait at all
    ReconciliationRun.objects.filter(pk=dead.pk).update(status="running")
    call_command("reconcile", "--saga", "create-zip", stdout=out)
    dead.refresh_from_db()
    assert dead.status == "failed"


@pytest.mark.postgres
def test_two_runs_started_at_once_one_runs_and_the_other_exits_0(s3, monkeypatch):
    put(s3, "create-zip/orphan.zip")
    listing, release = threading.Event(), threading.Event()
    original = storage.list_pages

    def slow_pages(prefix: str, page_size: int = 1000):
        listing.set()
        release.wait(30)
        yield from original(prefix, page_size)

    monkeypatch.setattr(storage, "list_pages", slow_pages)
    results: list[object] = []

    def first() -> None:
        from django.db import connection

        try:
            results.append(run(None))
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    assert listing.wait(30)
    out = StringIO()
    call_command("reconcile", "--json", stdout=out)  # returns: exit status 0
    assert json.loads(out.getvalue())["status"] == "busy"
    release.set()
    thread.join(30)
    assert len(results) == 1
    assert ReconciliationRun.objects.get().status == "succeeded"


# --- tasks and locks ---------------------------------------------------------------------


def test_a_task_whose_worker_was_killed_is_a_stuck_task_with_a_stale_lock(s3, settings):
    task = TaskInstance.objects.create(
        saga="create-zip", status="running", trace_id="0" * 32, started_at=timezone.now()
    )
    step = StepRecord.objects.create(
        task=task, index=0, name="upload", status="running", attempt_count=1
    )
    name = lock_key(task.pk)
    long_ago = timezone.now() - timedelta(hours=1)
    StepAttempt.objects.create(
        step=step,
        kind="action",
        number=1,
        worker="killed-worker",
        job_id="gone",
        lock_token="tok-1",
        lock_key=name,
        heartbeat_at=long_ago,
        heartbeat_expires_at=long_ago + timedelta(seconds=60),
    )
    TaskInstance.objects.filter(pk=task.pk).update(updated_at=long_ago)
    redis().set(name, "tok-1")  # the killed holder never released it
    result = run(None)
    stuck = Finding.objects.get(kind="stuck_task")
    assert stuck.key == str(task.pk) and stuck.task_id == task.pk
    stale = Finding.objects.get(kind="stale_lock")
    assert stale.key == name and stale.task_id == task.pk
    assert result.counts["stuck_task"] == 1 and result.counts["stale_lock"] == 1
    # once the lock is gone and the task moved on, the next run resolves both
    redis().delete(name)
    TaskInstance.objects.filter(pk=task.pk).update(status="failed")
    run(None)
    assert found(state="resolved") >= {str(task.pk), name}


def _running_task() -> TaskInstance:
    return TaskInstance.objects.create(
        saga="create-zip", status="running", trace_id="0" * 32, started_at=timezone.now()
    )


def test_a_lock_without_expiry_whose_token_no_attempt_knows_is_a_stale_lock(s3):
    task = _running_task()
    name = lock_key(task.pk)
    redis().set(name, "set-by-hand")  # no PX: nobody would ever release it
    result = run(None)
    stale = Finding.objects.get(kind="stale_lock")
    assert (stale.key, stale.task_id, stale.saga) == (name, task.pk, "create-zip")
    assert stale.details["token"] == "set-by-hand"
    assert stale.details["reason"] == "no expiry and no attempt holds its token"
    assert result.counts["stale_lock"] == 1


def test_a_lock_that_expires_whose_token_no_attempt_knows_yet_is_left_alone(s3):
    task = _running_task()
    redis().set(lock_key(task.pk), "just-taken", px=60_000)  # the engine's lock, attempt to come
    result = run(None)
    assert not Finding.objects.filter(kind="stale_lock").exists()
    assert result.counts.get("stale_lock", 0) == 0


def test_a_lock_without_expiry_on_no_known_task_is_recorded_without_a_task(s3, monkeypatch):
    monkeypatch.setattr(reconciliation, "LOCK_BATCH", 1)  # a pipeline per batch of one
    gone = lock_key(uuid.uuid4())
    by_hand = lock_key("not-a-task")
    redis().set(gone, "from-a-script")
    redis().set(by_hand, "from-a-script")
    result = reconciliation.reconcile(reconciliation.scope_for(None, GRACE))
    assert result is not None and result.status == "succeeded"
    stale = Finding.objects.filter(kind="stale_lock")
    assert {(f.key, f.saga, f.task_id) for f in stale} == {(gone, "", None), (by_hand, "", None)}


def test_a_database_failure_exits_1_with_one_line_and_the_run_failed(s3, monkeypatch):
    from django.db import OperationalError

    put(s3, "create-zip/orphan.zip")

    def outage(keys):
        raise OperationalError("server closed the connection\nunexpectedly")

    monkeypatch.setattr(ownership, "owned", outage)
    with pytest.raises(CommandError) as caught:
        call_command("reconcile", "--saga", "create-zip")
    assert caught.value.returncode == 1
    assert str(caught.value) == "database error: server closed the connection unexpectedly"
    assert ReconciliationRun.objects.get().status == "failed"


# --- the schedule ------------------------------------------------------------------------


def test_the_workers_start_a_scheduled_run_as_a_job_once_per_interval(s3, settings):
    from sagas.engine import reaper
    from sagas.engine.connection import queue
    from sagas.engine.worker import SagaSimpleWorker

    settings.SAGAS_RECONCILE_INTERVAL = 3600
    put(s3, "create-zip/fresh.zip")
    SagaSimpleWorker([queue()], connection=redis()).work(burst=True)
    scheduled = ReconciliationRun.objects.get()
    assert (scheduled.trigger, scheduled.applied, scheduled.status) == (
        "schedule",
        True,
        "succeeded",
    )
    assert not reaper.schedule_reconciliation()  # this interval's run was enqueued already
    assert keys(s3) == {"create-zip/fresh.zip"}  # younger than create-zip's 48 h grace
    assert found("recent_orphan") == {"create-zip/fresh.zip"}


def test_a_zero_interval_switches_the_schedule_off(settings):
    from sagas.engine import reaper

    settings.SAGAS_RECONCILE_INTERVAL = 0
    assert not reaper.schedule_reconciliation()
