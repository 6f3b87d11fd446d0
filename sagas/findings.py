"""Reconciliation findings: one per (saga, kind, key) across runs, and their state changes.

A later run updates the finding it sees again (so an ``ignored`` orphan stays ignored),
reopens one that was closed and came back, and closes those it no longer sees. An orphan
is one finding across its two kinds: a ``recent_orphan`` that ages becomes the
``orphan_object`` (and back, with a larger grace) in the state it had. Every change of a
finding's state is a compare-and-set update plus an audit entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import transaction

from sagas import audit
from sagas.models import AuditEntry, Finding, FindingKind, FindingState, ReconciliationRun
from sagas.states import AuditAction

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

_S = FindingState
ALLOWED: dict[str, frozenset[str]] = {
    _S.OPEN: frozenset({_S.DELETED, _S.ARCHIVED, _S.IGNORED, _S.RESOLVED}),
    _S.IGNORED: frozenset({_S.OPEN, _S.RESOLVED}),
    _S.DELETED: frozenset({_S.OPEN}),
    _S.ARCHIVED: frozenset({_S.OPEN}),
    _S.RESOLVED: frozenset({_S.OPEN}),
}
ACTIONS: dict[str, str] = {
    _S.OPEN: AuditAction.FINDING_REOPENED,
    _S.DELETED: AuditAction.ORPHAN_DELETED,
    _S.ARCHIVED: AuditAction.ORPHAN_ARCHIVED,
    _S.IGNORED: AuditAction.FINDING_IGNORED,
    _S.RESOLVED: AuditAction.FINDING_RESOLVED,
}
# Still being looked at: a run that sees one again keeps its state.
LIVE = (_S.OPEN, _S.IGNORED)
# One finding per (saga, key) across these kinds: it changes kind, not identity.
ORPHAN_KINDS: tuple[str, ...] = (FindingKind.ORPHAN_OBJECT, FindingKind.RECENT_ORPHAN)
CLOSE_BATCH = 500


def can_change(state: str, to: str) -> bool:
    return to in ALLOWED.get(state, frozenset())


def _audit_entry(
    finding: Finding, to: str, actor: AbstractBaseUser | None, details: dict[str, Any]
) -> AuditEntry:
    user: Any = actor
    return AuditEntry(
        task_id=finding.task_id,
        actor=user,
        actor_name=audit.actor_name(actor),
        action=ACTIONS[to],
        from_status=finding.state,
        to_status=to,
        details={
            "finding": finding.pk,
            "kind": finding.kind,
            "saga": finding.saga,
            "key": finding.key,
            **details,
        },
    )


def change_state(
    finding: Finding,
    to: str,
    *,
    actor: AbstractBaseUser | None = None,
    details: dict[str, Any] | None = None,
    now: datetime,
) -> bool:
    """Move one finding from the state it was read in; False if it moved meanwhile."""
    if not can_change(finding.state, to):
        return False
    acted = {"acted_by": actor, "acted_by_name": audit.actor_name(actor), "acted_at": now}
    with transaction.atomic():
        won = Finding.objects.filter(pk=finding.pk, state=finding.state).update(state=to, **acted)
        if not won:
            return False
        _audit_entry(finding, to, actor, details or {}).save()
    finding.state = to
    for name, value in acted.items():
        setattr(finding, name, value)
    return True


def see(
    run: ReconciliationRun,
    kind: FindingKind,
    saga: str,
    found: dict[str, dict[str, Any]],
    *,
    now: datetime,
    task_ids: dict[str, Any] | None = None,
) -> None:
    """Record what this run saw of one kind (``found``: key -> details, one page's worth)."""
    if not found:
        return
    task_ids = task_ids or {}
    existing = _existing(saga, kind, list(found))
    new = [
        Finding(
            run=run,
            kind=kind,
            saga=saga,
            key=key,
            task_id=task_ids.get(key),
            details=details,
            first_seen=now,
            last_seen=now,
        )
        for key, details in found.items()
        if key not in existing
    ]
    again = [
        _seen_again(existing[key], run, kind, details, task_ids.get(key), now=now)
        for key, details in found.items()
        if key in existing
    ]
    with transaction.atomic():  # a page's worth in two statements, whatever its size
        Finding.objects.bulk_create(new, batch_size=SEE_BATCH)
        Finding.objects.bulk_update(again, SEEN_FIELDS, batch_size=SEE_BATCH)
        for finding in again:
            if finding.state not in LIVE:
                change_state(finding, _S.OPEN, details={"run": run.pk}, now=now)


SEE_BATCH = 1000
SEEN_FIELDS = ["kind", "run", "last_seen", "details", "task"]


def kinds_of_one_finding(kind: str) -> tuple[str, ...]:
    """The kinds a key's one finding can take: an orphan is young, then old (or young again
    with a larger grace), and stays the same finding."""
    return ORPHAN_KINDS if kind in ORPHAN_KINDS else (kind,)


def _existing(saga: str, kind: str, keys: list[str]) -> dict[str, Finding]:
    """Each key's finding, of this kind if it has one, else of a kind it can take."""
    kinds = kinds_of_one_finding(kind)
    rows = Finding.objects.filter(saga=saga, kind__in=kinds, key__in=keys)
    existing: dict[str, Finding] = {}
    for finding in rows:
        if finding.key not in existing or finding.kind == kind:
            existing[finding.key] = finding
    return existing


def _seen_again(
    finding: Finding,
    run: ReconciliationRun,
    kind: str,
    details: dict[str, Any],
    task_id: Any,
    *,
    now: datetime,
) -> Finding:
    """A finding seen again, its fields updated in memory (written in bulk by ``see``); one
    of another kind takes this kind, keeping its state (``details["was"]`` says what it was
    until which run, and stays on later runs)."""
    if finding.kind != kind:
        details = {**details, "was": {"kind": finding.kind, "until_run": run.pk}}
    elif "was" in finding.details:
        details = {**details, "was": finding.details["was"]}
    finding.kind, finding.run, finding.last_seen = kind, run, now
    finding.details, finding.task_id = details, task_id
    return finding


def close_unseen(
    run: ReconciliationRun, kinds: Iterable[str], sagas: list[str] | None, *, now: datetime
) -> int:
    """Resolve the live findings of these kinds (and sagas; None: all) this run did not see."""
    query = Finding.objects.filter(kind__in=list(kinds), state__in=LIVE).exclude(run=run)
    if sagas is not None:
        query = query.filter(saga__in=sagas)
    closed, after = 0, 0
    while batch := list(query.filter(pk__gt=after).order_by("pk")[:CLOSE_BATCH]):
        reason = {"run": run.pk, "reason": "no longer seen"}
        closed += sum(change_state(f, _S.RESOLVED, details=reason, now=now) for f in batch)
        after = batch[-1].pk
    return closed
