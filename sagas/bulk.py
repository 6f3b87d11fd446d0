"""Bulk actions: one operator's action on many tasks (cancel, resolve, redrive) or many
reconciliation findings (delete, archive, ignore, reopen, re-enqueue, release), in the
background.

Each target goes through the same service call as a single click would, so each gets its
own audit entry with the user as actor and the note. The target ids are frozen when the
operator confirms. Like a reaper pass, a job acts on one batch and hands the rest on as a
new job at the front of the queue, with an explicit job timeout: no worker is busy with it
for more than a batch, and a warm shutdown waits for one batch at most.

Resuming: a target's action and the operation's progress (``position`` and the counters)
commit in one transaction, so whenever a job dies the row says exactly which tasks were
acted on, and the next job starts at ``position``: no task is acted on or counted twice.
``run`` fences the jobs (each carries its run and writes only while the row still has it).
An active operation whose job is gone from Redis and that has not moved for
``STALL_AFTER`` is re-enqueued as the next run by ``rescue_stalled``, which its progress
page and every new bulk operation call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import DuplicateJobError
from rq.timeouts import BaseTimeoutException

from sagas import audit, finding_actions, services
from sagas.engine import dispatch
from sagas.engine.connection import queue
from sagas.engine.rescue import MISSING
from sagas.models import BulkAction, BulkOperation, BulkStatus

logger = logging.getLogger("sagas.bulk")

RUN_BULK = "sagas.bulk.run_bulk"
BATCH_SIZE = 200
MAX_TASKS = 50_000
JOB_TIMEOUT_S = 600
STALL_AFTER = timedelta(seconds=15)
SKIPPED_EXAMPLES = 10
ACTIVE = (BulkStatus.QUEUED, BulkStatus.RUNNING)
JOB_OPTIONS: dict[str, Any] = {
    "result_ttl": 0,
    "failure_ttl": dispatch.FAILED_JOB_TTL_S,
    "job_timeout": JOB_TIMEOUT_S,
    # Operators wait for it, and it only queues other work: ahead of the backlog.
    "at_front": True,
}

SUCCEEDED, SKIPPED, FAILED = "succeeded", "skipped", "failed"


@dataclass(frozen=True)
class Result:
    """What happened to one task: ``succeeded``, ``skipped`` (and why) or ``failed``."""

    outcome: str
    reason: str = ""


class Superseded(Exception):
    """A newer run of the operation took over: this job must not write."""


def job_id(operation_id: int, run: int) -> str:
    """The deterministic RQ job id of one run of an operation."""
    return f"sagas-bulk-{operation_id}-{run}"


# --- starting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BulkSpec:
    """A bulk action: what it acts on (``task`` or ``finding``), its permission and note."""

    slug: str
    label: str
    target: str
    permission: str
    note_required: bool


TASK, FINDING = "task", "finding"


def specs() -> dict[str, BulkSpec]:
    """Every bulk action by slug: the task actions, then the finding actions."""
    found = {
        slug: BulkSpec(slug, spec.label, TASK, spec.permission, spec.note_required)
        for slug, spec in services.OPERATOR_ACTIONS.items()
        if slug in BulkAction.values
    }
    found.update(
        (slug, BulkSpec(slug, spec.label, FINDING, spec.permission, spec.note_required))
        for slug, spec in finding_actions.FINDING_ACTIONS.items()
    )
    return found


def spec_of(action: str) -> BulkSpec:
    spec = specs().get(action)
    if spec is None:
        raise services.InvalidInput(f"no bulk action {action!r}")
    return spec


def start_bulk(action: str, target_ids: Iterable[Any], actor: Any, note: str) -> BulkOperation:
    """Freeze the target ids and enqueue the first batch once this transaction commits.

    Raises ``services.InvalidInput`` for an unknown action, a missing note (where the
    action requires one), an empty selection or more than ``MAX_TASKS`` targets.
    """
    spec = spec_of(action)
    note = (note or "").strip()
    if spec.note_required and not note:
        raise services.InvalidInput("a note is required (say what you did and why)")
    ids = list(dict.fromkeys(str(target_id) for target_id in target_ids))
    if not ids:
        raise services.InvalidInput(f"no {spec.target} is selected")
    if len(ids) > MAX_TASKS:
        raise services.InvalidInput(
            f"at most {MAX_TASKS:,} {spec.target}s at once; narrow the filter"
        )
    rescue_stalled()
    with transaction.atomic():
        operation = BulkOperation.objects.create(
            action=action,
            actor=actor,
            actor_name=audit.actor_name(actor),
            note=note,
            target_ids=ids,
            total=len(ids),
            progressed_at=timezone.now(),
        )
        _enqueue_after_commit(operation.pk, operation.run)
    logger.info("bulk %s #%s of %s %ss by %s", action, operation.pk, len(ids), spec.target, actor)
    return operation


def _enqueue_after_commit(operation_id: int, run: int) -> None:
    transaction.on_commit(partial(_enqueue, operation_id, run))


def _enqueue(operation_id: int, run: int) -> None:
    """Redis trouble is logged, never raised: ``rescue_stalled`` enqueues it later."""
    try:
        queue().enqueue(
            RUN_BULK,
            operation_id,
            run,
            job_id=job_id(operation_id, run),
            unique=True,
            description=f"bulk operation {operation_id} (run {run})",
            **JOB_OPTIONS,
        )
    except DuplicateJobError:
        logger.debug("bulk job %s is already queued", job_id(operation_id, run))
    except RedisError as exc:
        logger.warning("could not enqueue bulk operation %s (%s); rescued later", operation_id, exc)


# --- the job ----------------------------------------------------------------------------------


def run_bulk(operation_id: int, run: int | None = None) -> None:
    """The RQ job: act on the next batch of tasks, then hand the rest on as the next run.

    A job of a run that has been replaced does nothing; ``run=None`` (a direct call from
    a shell or a test) takes the current run.
    """
    operation = BulkOperation.objects.select_related("actor").filter(pk=operation_id).first()
    if operation is None or operation.finished:
        return
    if run is not None and run != operation.run:
        logger.info("bulk job %s superseded by run %s", job_id(operation_id, run), operation.run)
        return
    if not _begin(operation):
        return
    batch = operation.target_ids[operation.position : operation.position + BATCH_SIZE]
    try:
        for target_id in batch:
            _act_and_advance(operation, str(target_id))
    except Superseded:
        logger.warning("bulk operation %s: another job moved it on; this one stops", operation_id)
        return
    if operation.position >= operation.total:
        _finish(operation)
    else:
        _hand_on(operation)


def _begin(operation: BulkOperation) -> bool:
    """Queued becomes running; an actor who can no longer act ends the operation."""
    if operation.status == BulkStatus.QUEUED:
        now = timezone.now()
        started = _current(operation).filter(status=BulkStatus.QUEUED)
        if not started.update(status=BulkStatus.RUNNING, started_at=now, progressed_at=now):
            return False
        operation.status, operation.started_at = BulkStatus.RUNNING, now
    if not operation.actor.is_active:
        _fail(operation, f"{operation.actor_name}'s account is deactivated: stopped")
        return False
    return True


def _current(operation: BulkOperation) -> QuerySet[BulkOperation]:
    """The operation's row, only while this job's run is the current one."""
    return BulkOperation.objects.filter(pk=operation.pk, run=operation.run)


def _act_and_advance(operation: BulkOperation, target_id: str) -> None:
    """Act on one target and move ``position`` past it in one transaction: a job that dies
    at any point has either done both or neither."""
    with transaction.atomic():
        result = _act(operation, target_id)
        if not _advance(operation, target_id, result):
            raise Superseded  # rolls the target's action back with the rest


def _act(operation: BulkOperation, target_id: str) -> Result:
    try:
        with transaction.atomic():  # an unexpected error undoes this target only
            return ACTIONS[operation.action](target_id, operation.actor, operation.note)
    except BaseTimeoutException:
        raise  # the job's timeout ends the job (resumed later), not just this task
    except Exception as exc:
        logger.exception("bulk operation %s: %s failed", operation.pk, target_id)
        return Result(FAILED, f"{type(exc).__name__}: {exc}")


def _advance(operation: BulkOperation, target_id: str, result: Result) -> bool:
    counts = {
        SUCCEEDED: operation.succeeded,
        SKIPPED: operation.skipped,
        FAILED: operation.failed,
    }
    counts[result.outcome] += 1
    fields: dict[str, Any] = {
        **counts,
        "position": operation.position + 1,
        "progressed_at": timezone.now(),
    }
    if result.outcome != SUCCEEDED and len(operation.skipped_examples) < SKIPPED_EXAMPLES:
        fields["skipped_examples"] = [*operation.skipped_examples, f"{target_id}: {result.reason}"]
    if result.outcome == FAILED:
        fields["last_error"] = f"{target_id}: {result.reason}"
    if not _current(operation).filter(position=operation.position).update(**fields):
        return False
    for name, value in fields.items():
        setattr(operation, name, value)
    return True


def _finish(operation: BulkOperation) -> None:
    now = timezone.now()
    _current(operation).filter(status=BulkStatus.RUNNING).update(
        status=BulkStatus.DONE, finished_at=now, progressed_at=now
    )
    logger.info(
        "bulk %s #%s done: %s succeeded, %s skipped, %s failed",
        operation.action,
        operation.pk,
        operation.succeeded,
        operation.skipped,
        operation.failed,
    )


def _fail(operation: BulkOperation, error: str) -> None:
    now = timezone.now()
    _current(operation).filter(status__in=ACTIVE).update(
        status=BulkStatus.FAILED, finished_at=now, progressed_at=now, last_error=error
    )
    logger.warning("bulk operation %s failed: %s", operation.pk, error)


def _hand_on(operation: BulkOperation) -> None:
    """The next batch is the next run's job, enqueued once the row says so."""
    with transaction.atomic():
        if (
            _current(operation)
            .filter(status__in=ACTIVE)
            .update(run=F("run") + 1, progressed_at=timezone.now())
        ):
            _enqueue_after_commit(operation.pk, operation.run + 1)


# --- one task, through the services -------------------------------------------------------

CANCEL_SKIPS = {
    "already_cancelled": "already {status}",
    "already_completed": "already completed",
    "already_finished": "already {status}, too late to cancel",
    "not_cancellable": "its saga is not cancellable",
    "not_found": "no such task",
}


def _cancel(task_id: str, actor: Any, note: str) -> Result:
    outcome = services.cancel(task_id, actor=actor, reason=note)
    if outcome.outcome == "cancelled":
        return Result(SUCCEEDED)
    return Result(SKIPPED, CANCEL_SKIPS[outcome.outcome].format(status=outcome.status))


def _operate(
    operation: Callable[[Any, Any, str], Any], task_id: str, actor: Any, note: str
) -> Result:
    try:
        operation(task_id, actor, note)
    except services.ActionNotAllowed as refused:
        return Result(SKIPPED, str(refused).replace(f" task {refused.task.pk}", ""))
    except services.TaskNotFound:
        return Result(SKIPPED, "no such task")
    return Result(SUCCEEDED)


def _on_finding(slug: str, finding_id: str, actor: Any, note: str) -> Result:
    try:
        finding_actions.act(slug, finding_id, actor, note)
    except services.NothingToDo as nothing:
        return Result(SKIPPED, str(nothing))
    return Result(SUCCEEDED)


ACTIONS: dict[str, Callable[[str, Any, str], Result]] = {
    BulkAction.CANCEL: _cancel,
    BulkAction.RESOLVE: partial(_operate, services.resolve),
    BulkAction.REDRIVE: partial(_operate, services.redrive),
    **{slug: partial(_on_finding, slug) for slug in finding_actions.FINDING_ACTIONS},
}


# --- rescue -----------------------------------------------------------------------------------


def rescue_stalled(operation_id: int | None = None) -> list[int]:
    """Re-enqueue active operations whose job is gone (a killed worker, a flushed Redis)
    and that have not moved for ``STALL_AFTER``; returns their ids. The new run resumes at
    ``position``. Redis being unreachable only postpones it."""
    stalled = BulkOperation.objects.filter(
        status__in=ACTIVE, progressed_at__lt=timezone.now() - STALL_AFTER
    )
    if operation_id is not None:
        stalled = stalled.filter(pk=operation_id)
    rows = list(stalled.values("pk", "run", "position", "status", "resumed_from"))
    try:
        states = dispatch.job_states(job_id(row["pk"], row["run"]) for row in rows)
    except RedisError as exc:
        logger.warning("could not look for stalled bulk operations: %s", exc)
        return []
    return [
        row["pk"]
        for row in rows
        if states.get(job_id(row["pk"], row["run"])) == MISSING and _resume(row)
    ]


def _resume(row: Mapping[str, Any]) -> bool:
    position = row["position"]
    fields: dict[str, Any] = {
        "run": F("run") + 1,
        "resumes": F("resumes") + 1,
        "resumed_from": position,
        "progressed_at": timezone.now(),
        "last_error": f"its job was lost; resumed at task {position + 1}",
    }
    if row["status"] == BulkStatus.RUNNING and row["resumed_from"] == position:
        # Lost twice at this task (nothing about it committed): give up on it, go on.
        targets = BulkOperation.objects.values_list("target_ids", flat=True).get(pk=row["pk"])
        error = f"{targets[position]}: its job was lost twice while at it; not acted on"
        fields.update(position=position + 1, failed=F("failed") + 1, last_error=error)
    with transaction.atomic():
        won = BulkOperation.objects.filter(
            pk=row["pk"], run=row["run"], position=position, status__in=ACTIVE
        ).update(**fields)
        if won:
            _enqueue_after_commit(row["pk"], row["run"] + 1)
    if won:
        logger.warning("bulk operation %s: job lost, resumed at %s", row["pk"], position)
    return bool(won)
