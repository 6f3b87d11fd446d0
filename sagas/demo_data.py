"""The demo's reconciliation findings: set up for real, then found by a real run.

Nothing here writes a finding. It makes S3, Redis and the database disagree the way they
do in production, then records one dry reconciliation run (trigger ``command``, nothing
deleted), so the findings page shows every kind the first time an operator opens it:

- ``orphan_object`` and ``recent_orphan``: two zips under create-zip's prefix that no
  step owns, uploaded a few seconds apart. S3 cannot backdate an object, so the run uses
  a grace between their ages: the older one is past it, the younger one is not.
- ``missing_object``: a create-zip task the engine runs to completion in this process
  (the step owns its zip through ``OwnedKey``, written as the engine writes it), whose zip
  is then deleted from S3 behind the engine's back.
- ``stale_lock``: that task's lock, set again in Redis with the token of its finished
  attempt, as if the worker's release had been lost. It is kept for an hour (a real one
  expires after the saga's ``lock_expiry_s``), so the locks page still shows it.
- ``stuck_task``: a chaos task whose queued job Redis lost, its row backdated past
  ``SAGAS_STUCK_AFTER`` (the demo cannot wait that long). Once the demo's workers are up,
  their reaper re-enqueues the job and the task completes; its finding stays open until a
  later run sees the task moved on and resolves it.

The run counts as this interval's scheduled run: otherwise the workers would start one at
once, whose 48 h grace would turn the older orphan into a recent one again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from rq.exceptions import NoSuchJobError
from rq.job import Job

from sagas import reconciliation, services, storage
from sagas.engine import apply, reaper
from sagas.engine.connection import queue, redis
from sagas.examples.create_zip import build_zip, create_zip
from sagas.models import (
    Finding,
    OwnedKey,
    ReconciliationRun,
    RunTrigger,
    StepAttempt,
    StepRecord,
    TaskInstance,
)
from sagas.states import AttemptOutcome, TaskStatus

CORRELATION_ID = "demo-findings"
SEEDING_WORKER = "demo-seeding"
LEFT_BEHIND = f"{create_zip.s3_prefix}demo/left-behind.zip"
JUST_UPLOADED = f"{create_zip.s3_prefix}demo/just-uploaded.zip"
# S3 keeps whole seconds: two seconds apart, a whole-second grace fits strictly between.
ORPHAN_GAP = timedelta(seconds=2)
UPLOAD_TRIES = 5
STALE_LOCK_TTL = timedelta(hours=1)
STUCK_MARGIN = timedelta(minutes=1)


class DemoSeedingError(RuntimeError):
    """The demo's findings could not be set up; the message is one line."""


@dataclass(frozen=True)
class SeededFindings:
    run: ReconciliationRun
    grace: timedelta
    missing_object_task: TaskInstance
    stuck_task: TaskInstance
    stale_lock: str


def seed_demo_findings(sleep: Callable[[float], None] = time.sleep) -> SeededFindings | None:
    """Set up one finding of each kind and record the run that finds them; None when the
    database has findings already (the demo seeds only once)."""
    if Finding.objects.exists():
        return None
    left_behind_at = upload_orphan(LEFT_BEHIND)
    missing = task_with_a_missing_object()
    lock = leave_its_lock_behind(missing)
    stuck = task_whose_job_was_lost()
    just_uploaded_at = upload_orphan_after(JUST_UPLOADED, left_behind_at + ORPHAN_GAP, sleep)
    now = timezone.now()
    grace = grace_between(now - left_behind_at, now - just_uploaded_at)
    scope = reconciliation.scope_for(grace=grace)
    # ``now`` is the moment the grace was measured at: the ages cannot drift past it.
    run = reconciliation.reconcile(scope, trigger=RunTrigger.COMMAND, now=now)
    if run is None:
        raise DemoSeedingError("another reconciliation run is in progress")
    count_as_this_intervals_run()
    return SeededFindings(run, grace, missing, stuck, lock)


# --- orphans -------------------------------------------------------------------------------


def upload_orphan(key: str) -> datetime:
    """A zip under the prefix that no step owns; its LastModified as S3 keeps it."""
    archive = build_zip({"README.txt": f"Uploaded by the demo; no step owns {key}.\n"})
    storage.put_object(key, archive, content_type="application/zip")
    head = storage.head_object(key)
    if head is None:
        raise DemoSeedingError(f"S3 lost {key} right after it was uploaded")
    return head.last_modified


def upload_orphan_after(
    key: str, not_before: datetime, sleep: Callable[[float], None] = time.sleep
) -> datetime:
    """Upload ``key`` once S3's clock gives it a LastModified of ``not_before`` or later."""
    for _ in range(UPLOAD_TRIES):
        wait = (not_before - timezone.now()).total_seconds()
        if wait > 0:
            sleep(wait + 0.05)
        uploaded_at = upload_orphan(key)
        if uploaded_at >= not_before:
            return uploaded_at
    raise DemoSeedingError(f"S3 dated {key} earlier than {not_before.isoformat()}")


def grace_between(older: timedelta, younger: timedelta) -> timedelta:
    """A whole-second grace strictly between two ages at least two seconds apart."""
    if older - younger < ORPHAN_GAP:
        raise ValueError(f"ages {older} and {younger} are too close for a grace between them")
    return timedelta(seconds=round(((older + younger) / 2).total_seconds()))


# --- a missing object and a stale lock ----------------------------------------------------


def task_with_a_missing_object() -> TaskInstance:
    """A create-zip task run by the engine, here and now; then its zip is deleted from S3."""
    files = {"invoice.txt": "An invoice whose zip was deleted from S3 behind the engine's back."}
    task, _ = services.start("create-zip", {"files": files}, correlation_id=CORRELATION_ID)
    for jid in queued_jobs(task):
        run_here(jid)
    task.refresh_from_db()
    if task.status != TaskStatus.COMPLETED:
        raise DemoSeedingError(
            f"the demo's create-zip task ended {task.status}: {task.error_summary}"
        )
    owned = list(OwnedKey.objects.filter(step__task=task).values_list("key", flat=True))
    if not owned:
        raise DemoSeedingError("the demo's create-zip task owns no object")
    for key in owned:
        storage.remove(key)
    return task


def leave_its_lock_behind(task: TaskInstance) -> str:
    """The task's lock again, holding the token of its finished attempt."""
    attempt = (
        StepAttempt.objects.filter(step__task=task)
        .exclude(outcome=AttemptOutcome.RUNNING)
        .exclude(lock_token="")
        .latest("pk")
    )
    ttl_ms = int(STALE_LOCK_TTL.total_seconds() * 1000)
    if not redis().set(attempt.lock_key, attempt.lock_token, nx=True, px=ttl_ms):
        raise DemoSeedingError(f"the lock {attempt.lock_key} is held")
    return attempt.lock_key


def queued_jobs(task: TaskInstance) -> list[str]:
    """The jobs the engine recorded for the task's steps."""
    steps = StepRecord.objects.filter(task=task).exclude(job_id="").order_by("index")
    return list(steps.values_list("job_id", flat=True))


def run_here(jid: str) -> None:
    """Run one queued step job in this process, as an in-process worker would: the demo's
    workers are not up yet, and this task must be done before the run."""
    job = Job.fetch(jid, connection=redis())
    queue().remove(job)
    job.worker_name = SEEDING_WORKER  # what the attempt records as its worker
    job.perform()
    job.delete()


# --- a stuck task --------------------------------------------------------------------------


def task_whose_job_was_lost() -> TaskInstance:
    """A chaos task whose job Redis lost, unchanged (as far as its row says) for longer
    than ``SAGAS_STUCK_AFTER``."""
    task, _ = services.start("chaos", {}, correlation_id=CORRELATION_ID)
    for jid in queued_jobs(task):
        with contextlib.suppress(NoSuchJobError):  # a job the engine recorded but never queued
            Job.fetch(jid, connection=redis()).delete()
    stuck_after = timedelta(seconds=settings.SAGAS_STUCK_AFTER)
    unchanged_since = apply.database_now() - stuck_after - STUCK_MARGIN
    TaskInstance.objects.filter(pk=task.pk).update(updated_at=unchanged_since)
    task.refresh_from_db()
    return task


# --- the schedule --------------------------------------------------------------------------


def count_as_this_intervals_run() -> bool:
    """Hold the workers' schedule for one interval, as its own run would have."""
    interval = settings.SAGAS_RECONCILE_INTERVAL
    if interval <= 0:
        return False
    held = redis().set(
        reaper.RECONCILE_CADENCE_KEY, "the demo's seeding run", nx=True, px=int(interval * 1000)
    )
    return bool(held)
