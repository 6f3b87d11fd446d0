"""Reconciliation: compare S3 and Redis with the database, record findings, apply policies.

For each saga with an ``s3_prefix`` the objects under the prefix are streamed page by page
(never a key outside it); each page's keys are looked up in the owned-keys index
(``sagas.ownership``) in one query, and the owned ones are marked seen by this run, so
the owned keys a run did not see (missing objects) are one indexed query too. Memory
stays one page, whatever the bucket or the tasks table holds. See docs/reconciliation.md.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from sagas import findings, ownership, storage
from sagas.definitions import Saga, UnknownSaga, registry
from sagas.engine import apply, dispatch, rescue
from sagas.engine.connection import queue, redis
from sagas.engine.locks import lock_names, task_of_lock
from sagas.models import (
    Finding,
    FindingKind,
    FindingState,
    OwnedKey,
    ReconciliationRun,
    RunStatus,
    RunTrigger,
    StepAttempt,
    TaskInstance,
)
from sagas.states import ACTIVE_TASK_STATUSES, AttemptOutcome, StepStatus

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

logger = logging.getLogger("sagas.reconciliation")

# A running run that has not beaten for this long is taken for crashed.
RUN_STALE_AFTER = timedelta(minutes=10)
TASK_BATCH = 500
LOCK_BATCH = 500
NO_EXPIRY = -1  # Redis PTTL of a key that never expires
S3_KINDS = (FindingKind.ORPHAN_OBJECT, FindingKind.RECENT_ORPHAN, FindingKind.MISSING_OBJECT)
JOB = "sagas.reconciliation.scheduled_run"

Progress = Callable[[str, int], None]


class ReconciliationError(Exception):
    """Storage or the database failed; the run is recorded as failed (if it could be)."""

    def __init__(self, message: str, run: ReconciliationRun | None = None) -> None:
        super().__init__(message)
        self.run = run


class BadRequest(ValueError):
    """The caller asked for something that cannot be run (unknown saga, no prefix)."""


@dataclass
class Scope:
    """What a run looks at: the sagas whose prefixes it lists, and whose tasks it checks."""

    sagas: list[Saga]
    only: str = ""  # one saga asked for by name ("" means every saga)
    grace: timedelta | None = None  # overrides each saga's orphan_grace

    def grace_of(self, saga: Saga) -> timedelta:
        return self.grace if self.grace is not None else saga.orphan_grace


@dataclass
class Counts:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n


# --- scope and runs ------------------------------------------------------------------------


def scope_for(saga: str | None = None, grace: timedelta | None = None) -> Scope:
    """The sagas a run covers; ``BadRequest`` for an unknown saga or one without a prefix."""
    if not saga:
        return Scope(
            [registry.get(n) for n in registry.names() if registry.get(n).s3_prefix], "", grace
        )
    try:
        definition = registry.get(saga)
    except UnknownSaga:
        raise BadRequest(f"unknown saga {saga!r}; known: {', '.join(registry.names())}") from None
    if not definition.s3_prefix:
        raise BadRequest(f"saga {saga!r} has no s3_prefix: there is nothing to reconcile")
    return Scope([definition], saga, grace)


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_gone(holder: str) -> bool:
    """A holder on this host whose process is gone (other hosts: judged by heartbeat)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def fail_crashed_runs(now: datetime) -> int:
    """Mark failed the running runs whose holder is gone or stopped beating."""
    crashed = [
        run.pk
        for run in ReconciliationRun.objects.filter(status=RunStatus.RUNNING)
        if _holder_gone(run.holder) or (run.heartbeat_at or run.started_at) < now - RUN_STALE_AFTER
    ]
    return ReconciliationRun.objects.filter(pk__in=crashed, status=RunStatus.RUNNING).update(
        status=RunStatus.FAILED, finished_at=now, error="crashed: its holder is gone"
    )


def start_run(
    scope: Scope, *, trigger: str, applied: bool, actor: AbstractBaseUser | None = None
) -> ReconciliationRun | None:
    """The new running run, or None when another run holds the one running slot."""
    now = timezone.now()
    fail_crashed_runs(now)
    user: Any = actor
    try:
        with transaction.atomic():
            return ReconciliationRun.objects.create(
                saga=scope.only,
                trigger=trigger,
                actor=user,
                applied=applied,
                holder=_holder(),
                heartbeat_at=now,
            )
    except IntegrityError:
        return None


def running_run() -> ReconciliationRun | None:
    return ReconciliationRun.objects.filter(status=RunStatus.RUNNING).first()


def _beat(run: ReconciliationRun) -> None:
    ReconciliationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())


def _finish(run: ReconciliationRun, status: str, counts: Counts, error: str = "") -> None:
    run.status, run.finished_at = status, timezone.now()
    run.counts, run.error = counts.values, error
    ReconciliationRun.objects.filter(pk=run.pk).update(
        status=status, finished_at=run.finished_at, counts=run.counts, error=error
    )


# --- the whole run -------------------------------------------------------------------------


def reconcile(
    scope: Scope,
    *,
    apply_policies: bool = False,
    trigger: str = RunTrigger.COMMAND,
    actor: AbstractBaseUser | None = None,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> ReconciliationRun | None:
    """Record a run and its findings; with ``apply_policies`` act on each saga's policy.
    None when another run is in progress; ``ReconciliationError`` when storage or the
    database fails (the run recorded as failed)."""
    try:
        run = start_run(scope, trigger=trigger, applied=apply_policies, actor=actor)
    except DatabaseError as exc:
        raise ReconciliationError(f"database unavailable: {_one_line(exc)}") from exc
    if run is None:
        return None
    counts = Counts()
    try:
        _run(run, scope, counts, apply_policies, now, progress)
    except storage.StorageError as exc:
        _fail(run, counts, str(exc))
        raise ReconciliationError(str(exc), run) from exc
    except DatabaseError as exc:
        message = f"database error: {_one_line(exc)}"
        _fail(run, counts, message)
        raise ReconciliationError(message, run) from exc
    except BaseException as exc:
        _fail(run, counts, f"{type(exc).__name__}: {_one_line(exc)}")
        raise
    _finish(run, RunStatus.SUCCEEDED, counts)
    return run


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(run: ReconciliationRun, counts: Counts, message: str) -> None:
    try:
        _finish(run, RunStatus.FAILED, counts, message)
    except DatabaseError:
        logger.exception("reconciliation run %s: could not record its failure", run.pk)


def _run(
    run: ReconciliationRun,
    scope: Scope,
    counts: Counts,
    apply_policies: bool,
    now: datetime | None,
    progress: Progress | None,
) -> None:
    for saga in scope.sagas:
        scan_objects(run, saga, scope, counts, now=now, progress=progress)
        find_missing(run, saga, counts)
    names = [s.name for s in scope.sagas]
    findings.close_unseen(run, S3_KINDS, names, now=timezone.now())
    check_tasks_and_locks(run, scope, counts)
    if apply_policies:
        for saga in scope.sagas:
            act_on_orphans(run, saga, scope, counts, now=now)


# --- S3: orphans and missing objects ---------------------------------------------------------


def _age(obj: storage.StoredObject, now: datetime) -> timedelta:
    return now - obj.last_modified


def scan_objects(
    run: ReconciliationRun,
    saga: Saga,
    scope: Scope,
    counts: Counts,
    *,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> None:
    """List the saga's prefix page by page; record orphans and mark owned keys seen."""
    grace = scope.grace_of(saga)
    seen = 0
    for page in storage.list_pages(saga.s3_prefix):
        objects = [o for o in page if o.key.startswith(saga.s3_prefix)]
        seen += len(objects)
        _scan_page(run, saga, objects, grace, now or timezone.now(), counts)
        _beat(run)
        if progress is not None:
            progress(saga.name, seen)


def _scan_page(
    run: ReconciliationRun,
    saga: Saga,
    objects: list[storage.StoredObject],
    grace: timedelta,
    now: datetime,
    counts: Counts,
) -> None:
    keys = [o.key for o in objects]
    owned = ownership.owned(keys)
    OwnedKey.objects.filter(key__in=list(owned)).update(seen_by_run=run.pk)
    counts.add("objects", len(objects))
    counts.add("owned", len(owned))
    old: dict[str, dict[str, Any]] = {}
    young: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if obj.key in owned:
            continue
        details = {
            "size": obj.size,
            "last_modified": obj.last_modified.isoformat(),
            "grace_s": grace.total_seconds(),  # the one a deletion from the console honours
        }
        (old if _age(obj, now) > grace else young)[obj.key] = details
    findings.see(run, FindingKind.ORPHAN_OBJECT, saga.name, old, now=timezone.now())
    findings.see(run, FindingKind.RECENT_ORPHAN, saga.name, young, now=timezone.now())
    counts.add(FindingKind.ORPHAN_OBJECT, len(old))
    counts.add(FindingKind.RECENT_ORPHAN, len(young))


def missing_candidates(run: ReconciliationRun, saga: Saga) -> Iterator[OwnedKey]:
    """Keys succeeded steps own under the prefix that this run's listing did not contain
    (owned since before the run started: a newer one may have been listed before it was)."""
    return (
        OwnedKey.objects.filter(
            Q(seen_by_run__isnull=True) | Q(seen_by_run__lt=run.pk),
            saga=saga.name,
            key__startswith=saga.s3_prefix,
            step__status=StepStatus.SUCCEEDED,
            created_at__lt=run.started_at,
        )
        .select_related("step")
        .order_by("pk")
        .iterator(chunk_size=TASK_BATCH)
    )


def find_missing(run: ReconciliationRun, saga: Saga, counts: Counts) -> None:
    """Owned but absent: each candidate is asked of S3 again before it is recorded."""
    batch: dict[str, dict[str, Any]] = {}
    tasks: dict[str, Any] = {}
    for n, owned_key in enumerate(missing_candidates(run, saga), start=1):
        if n % TASK_BATCH == 0:
            _beat(run)
        if storage.head_object(owned_key.key) is not None:
            continue
        batch[owned_key.key] = {"step": owned_key.step.name, "step_id": owned_key.step_id}
        tasks[owned_key.key] = owned_key.step.task_id
        if len(batch) >= TASK_BATCH:
            _see_missing(run, saga, batch, tasks, counts)
            batch, tasks = {}, {}
    _see_missing(run, saga, batch, tasks, counts)


def _see_missing(
    run: ReconciliationRun,
    saga: Saga,
    batch: dict[str, dict[str, Any]],
    tasks: dict[str, Any],
    counts: Counts,
) -> None:
    findings.see(
        run, FindingKind.MISSING_OBJECT, saga.name, batch, now=timezone.now(), task_ids=tasks
    )
    counts.add(FindingKind.MISSING_OBJECT, len(batch))
    _beat(run)


# --- policies --------------------------------------------------------------------------------


def act_on_orphans(
    run: ReconciliationRun, saga: Saga, scope: Scope, counts: Counts, *, now: datetime | None
) -> None:
    """Apply the saga's orphan policy to the open old orphans this run saw."""
    if saga.orphan_policy == "report":
        return
    open_orphans = Finding.objects.filter(
        run=run, saga=saga.name, kind=FindingKind.ORPHAN_OBJECT, state=FindingState.OPEN
    ).order_by("pk")
    for finding in open_orphans.iterator(chunk_size=TASK_BATCH):
        outcome = act_on_orphan(finding, saga, scope.grace_of(saga), now=now, actor=run.actor)
        counts.add(outcome)
    _beat(run)


def act_on_orphan(
    finding: Finding,
    saga: Saga,
    grace: timedelta,
    *,
    now: datetime | None = None,
    actor: AbstractBaseUser | None = None,
    policy: str | None = None,
    note: str = "",
) -> str:
    """Delete or archive one orphan after checking it again, at this moment, against S3
    and the database; what happened (``deleted``, ``archived``, ``kept_*``, ``gone``)."""
    policy = policy or saga.orphan_policy
    key = finding.key
    if not saga.s3_prefix or not key.startswith(saga.s3_prefix):
        return "kept_outside_prefix"
    obj = storage.head_object(key)
    at = now or timezone.now()
    if obj is None:
        findings.change_state(finding, FindingState.RESOLVED, details={"reason": "gone"}, now=at)
        return "gone"
    if _age(obj, at) <= grace:
        return "kept_young"
    if ownership.owned([key]):
        reason = {"reason": "owned by a step now"}
        findings.change_state(finding, FindingState.RESOLVED, details=reason, now=at)
        return "kept_owned"
    return _remove(finding, policy, actor, at, note)


def _remove(
    finding: Finding, policy: str, actor: AbstractBaseUser | None, at: datetime, note: str = ""
) -> str:
    """The finding's state changes first (compare-and-set, so an operator's ignore wins),
    in the transaction that S3's failure rolls back."""
    to = FindingState.ARCHIVED if policy == "archive" else FindingState.DELETED
    details: dict[str, Any] = {"policy": policy, **({"note": note} if note else {})}
    if policy == "archive":
        details["archived_as"] = settings.SAGAS_ARCHIVE_PREFIX + finding.key
    with transaction.atomic():
        if not findings.change_state(finding, to, actor=actor, details=details, now=at):
            return "kept_changed"
        if policy == "archive":
            storage.copy_object(finding.key, details["archived_as"])
        storage.remove(finding.key)
    return str(to)


# --- tasks and locks -------------------------------------------------------------------------


def check_tasks_and_locks(run: ReconciliationRun, scope: Scope, counts: Counts) -> None:
    """Stuck tasks and stale locks; skipped (and their findings left as they are) without
    Redis, since nobody can tell a queued job from a missing one then."""
    sagas = [scope.only] if scope.only else None
    try:
        find_stuck_tasks(run, sagas, counts)
        find_stale_locks(run, sagas, counts)
    except RedisError as exc:
        counts.add("redis_unavailable")
        logger.warning("reconciliation: stuck tasks and stale locks skipped: %s", exc)
        return
    kinds = (FindingKind.STUCK_TASK, FindingKind.STALE_LOCK)
    findings.close_unseen(run, kinds, sagas, now=timezone.now())


def _stuck_candidates(sagas: list[str] | None, cutoff: datetime) -> Any:
    query = TaskInstance.objects.filter(status__in=ACTIVE_TASK_STATUSES, updated_at__lt=cutoff)
    if sagas is not None:
        query = query.filter(saga__in=sagas)
    return query.order_by("updated_at", "pk").values_list("pk", "updated_at", "saga")


def find_stuck_tasks(run: ReconciliationRun, sagas: list[str] | None, counts: Counts) -> None:
    """Tasks stuck by the design's one definition (``rescue.stuck``), batch by batch."""
    timing = apply.timing()
    now = apply.database_now()
    query = _stuck_candidates(sagas, now - timing.stuck_after)
    after: Q = Q()
    while batch := list(query.filter(after)[:TASK_BATCH]):
        plans = apply.load_plans([pk for pk, _, _ in batch], now)
        states = dispatch.job_states([j for p in plans for j in rescue.jobs_to_check(p)])
        stuck = [p.task for p in plans if rescue.stuck(p, states, timing)]
        for saga in {t.saga for t in stuck}:
            found = {
                str(t.pk): {"status": t.status, "updated_at": t.updated_at.isoformat()}
                for t in stuck
                if t.saga == saga and t.updated_at is not None
            }
            ids = {str(t.pk): t.pk for t in stuck if t.saga == saga}
            findings.see(run, FindingKind.STUCK_TASK, saga, found, now=now, task_ids=ids)
        counts.add(FindingKind.STUCK_TASK, len(stuck))
        _, last_updated, _ = batch[-1]
        last_pk = batch[-1][0]
        after = Q(updated_at__gt=last_updated) | Q(updated_at=last_updated, pk__gt=last_pk)
        _beat(run)


@dataclass(frozen=True)
class HeldLock:
    """A task lock in Redis: its key, its holder's token, and whether it expires."""

    name: str
    token: str
    expires: bool  # False (PTTL -1): nobody will release it but an operator


def _lock_batches() -> Iterator[list[HeldLock]]:
    """Held task locks, a batch at a time (SCAN, never KEYS)."""
    client = redis()
    names: list[str] = []
    for name in lock_names(client, LOCK_BATCH):
        names.append(name)
        if len(names) >= LOCK_BATCH:
            yield _held_locks(client, names)
            names = []
    if names:
        yield _held_locks(client, names)


def _held_locks(client: Any, names: list[str]) -> list[HeldLock]:
    """The tokens and expiries of a batch in one round trip (MGET and a PTTL each, piped);
    a lock released meanwhile is left out."""
    pipe = client.pipeline(transaction=False)
    pipe.mget(names)
    for name in names:
        pipe.pttl(name)
    values, *ttls = pipe.execute()
    return [
        HeldLock(name, value.decode(), ttl != NO_EXPIRY)
        for name, value, ttl in zip(names, values, ttls, strict=True)
        if value is not None
    ]


def _live_tokens(tokens: list[str]) -> set[str]:
    return set(
        StepAttempt.objects.filter(
            lock_token__in=tokens,
            outcome=AttemptOutcome.RUNNING,
        )
        .filter(Q(heartbeat_expires_at__isnull=True) | Q(heartbeat_expires_at__gt=timezone.now()))
        .values_list("lock_token", flat=True)
    )


def _known_tokens(tokens: list[str]) -> set[str]:
    return set(
        StepAttempt.objects.filter(lock_token__in=tokens).values_list("lock_token", flat=True)
    )


def find_stale_locks(run: ReconciliationRun, sagas: list[str] | None, counts: Counts) -> None:
    """Locks no live attempt holds: see ``stale_reason``."""
    for batch in _lock_batches():
        live = _live_tokens([lock.token for lock in batch])
        _record_stale(run, [lock for lock in batch if lock.token not in live], sagas, counts)
        _beat(run)


def stale_reason(lock: HeldLock, known_tokens: set[str]) -> str | None:
    """Why a lock no live attempt holds is stale, or None to leave it alone. The engine takes
    a lock (with an expiry) before it writes its attempt, so an unknown token on a lock that
    expires is a brand-new lock, or one that goes by itself; without an expiry it stays."""
    if lock.token in known_tokens:
        return "its attempt is no longer running or stopped beating"
    if not lock.expires:
        return "no expiry and no attempt holds its token"
    return None


def _record_stale(
    run: ReconciliationRun, held: list[HeldLock], sagas: list[str] | None, counts: Counts
) -> None:
    if not held:
        return
    known = _known_tokens([lock.token for lock in held])
    task_ids = {lock.name: task_of_lock(lock.name) for lock in held}
    saga_of = _sagas_of_tasks(list(task_ids.values()))
    by_saga: dict[str, dict[str, dict[str, Any]]] = {}
    for lock in held:
        task, reason = task_ids[lock.name], stale_reason(lock, known)
        saga = saga_of.get(task, "")  # "": a lock on no known task
        if reason is None or (sagas is not None and saga not in sagas):
            continue
        by_saga.setdefault(saga, {})[lock.name] = {
            "token": lock.token,
            "task": task,
            "reason": reason,
        }
    for saga, found in by_saga.items():
        ids = {name: task_ids[name] for name in found if task_ids[name] in saga_of}
        findings.see(run, FindingKind.STALE_LOCK, saga, found, now=timezone.now(), task_ids=ids)
        counts.add(FindingKind.STALE_LOCK, len(found))


def _sagas_of_tasks(task_ids: list[str]) -> dict[str, str]:
    """Task id -> saga, for the ids that name a task."""
    rows = TaskInstance.objects.filter(pk__in=[t for t in task_ids if _is_uuid(t)])
    return {str(pk): saga for pk, saga in rows.values_list("pk", "saga")}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# --- the schedule ----------------------------------------------------------------------------


def scheduled_run() -> None:
    """The RQ job the workers enqueue every ``SAGAS_RECONCILE_INTERVAL``: every saga, each
    saga's policy applied."""
    try:
        run = reconcile(scope_for(), apply_policies=True, trigger=RunTrigger.SCHEDULE)
    except ReconciliationError as exc:
        logger.error("scheduled reconciliation failed: %s", exc)
        return
    if run is None:
        logger.info("scheduled reconciliation skipped: another run is in progress")
    else:
        logger.info("scheduled reconciliation #%s: %s", run.pk, run.counts)


CONSOLE_JOB = "sagas.reconciliation.console_run"
CONSOLE_JOB_TIMEOUT_S = 3600


def enqueue_console_run(actor: AbstractBaseUser | None, *, apply_policies: bool) -> str:
    """Queue a run an operator started (every saga with a prefix), ahead of the backlog;
    the job's id. The run itself still takes the one running slot when it begins. (Inside
    a transaction django-rq enqueues at commit, so the id is ours, not the queue's answer.)"""
    job_id = f"sagas-reconcile-console-{uuid.uuid4().hex[:16]}"
    queue().enqueue(
        CONSOLE_JOB,
        actor.pk if actor is not None else None,
        apply_policies,
        job_id=job_id,
        at_front=True,
        job_timeout=CONSOLE_JOB_TIMEOUT_S,
        result_ttl=0,
        description="reconciliation started from the console",
    )
    return job_id


def console_run(actor_id: int | None, apply_policies: bool) -> None:
    """The RQ job of a run an operator started."""
    from django.contrib.auth import get_user_model

    actor = get_user_model().objects.filter(pk=actor_id).first() if actor_id else None
    try:
        run = reconcile(
            scope_for(), apply_policies=apply_policies, trigger=RunTrigger.CONSOLE, actor=actor
        )
    except ReconciliationError as exc:
        logger.error("reconciliation started from the console failed: %s", exc)
        return
    if run is None:
        logger.info("reconciliation started from the console skipped: another run is in progress")


def summary(run: ReconciliationRun) -> dict[str, Any]:
    """The machine-readable summary of a run (``reconcile --json``)."""
    return {
        "run": run.pk,
        "saga": run.saga or None,
        "status": run.status,
        "applied": run.applied,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "counts": run.counts,
        "error": run.error or None,
    }
