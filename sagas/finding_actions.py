"""What an operator can do about a reconciliation finding, each checked again at the moment
it is done: delete or archive an orphan (S3, its age and the owned keys asked again), ignore
or reopen a finding, push a stuck task (still stuck by the one definition), release a stale
lock (its holder still gone, the lock still holding the token the finding saw).

Each returns what it did, or raises ``services.NothingToDo`` with why nothing was done.
The console's bulk operations (``sagas.bulk``) call these one finding at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.utils import timezone
from redis.exceptions import RedisError

from sagas import findings, reconciliation, services
from sagas.definitions import registry
from sagas.models import Finding, FindingKind, FindingState

if TYPE_CHECKING:
    from sagas.services import Actor

ACT_ON_FINDING = "sagas.act_on_finding"

# Why a deletion or archive did not happen (``reconciliation.act_on_orphan``'s outcomes).
KEPT = {
    "gone": "the object is already gone from S3; the finding is resolved",
    "kept_young": "the object is younger than the orphan grace now",
    "kept_owned": "a step owns the key now; the finding is resolved",
    "kept_changed": "the finding changed meanwhile",
    "kept_outside_prefix": "the key is outside the saga's prefix",
}


@dataclass(frozen=True)
class FindingAction:
    """An operator's action on findings: the kinds and states it applies to, its permission."""

    slug: str
    label: str
    permission: str
    kinds: tuple[str, ...]
    states: tuple[str, ...]
    perform: Callable[[Finding, Actor, str], str]
    note_required: bool = False

    def applies(self, kind: str, state: str) -> bool:
        return kind in self.kinds and state in self.states


def _orphan_removal(policy: str) -> Callable[[Finding, Actor, str], str]:
    def remove(finding: Finding, actor: Actor, note: str) -> str:
        saga = _saga_of(finding)
        outcome = reconciliation.act_on_orphan(
            finding, saga, grace_of(finding, saga), actor=_user(actor), policy=policy, note=note
        )
        if outcome in KEPT:
            raise services.NothingToDo(KEPT[outcome])
        return f"{outcome} {finding.key}"

    return remove


def grace_of(finding: Finding, saga: Any) -> timedelta:
    """The grace the run that found the orphan used (the saga's, or the command's
    ``--grace``): the operator acts on what that run showed, its age checked again now."""
    recorded = finding.details.get("grace_s") if isinstance(finding.details, dict) else None
    if isinstance(recorded, int | float) and recorded >= 0:
        return timedelta(seconds=recorded)
    grace: timedelta = saga.orphan_grace
    return grace


def _saga_of(finding: Finding) -> Any:
    if finding.saga not in registry:
        raise services.NothingToDo(f"saga {finding.saga!r} is no longer defined here")
    return registry.get(finding.saga)


def _ignore(finding: Finding, actor: Actor, note: str) -> str:
    _change(finding, FindingState.IGNORED, actor, {"note": note})
    return f"ignored {finding.key}"


def _reopen(finding: Finding, actor: Actor, note: str) -> str:
    _change(finding, FindingState.OPEN, actor, {"note": note, "reason": "reopened by hand"})
    return f"reopened {finding.key}"


def _requeue(finding: Finding, actor: Actor, note: str) -> str:
    try:
        pushed = services.requeue_stuck(finding.task_id or finding.key, actor, note)
    except services.TaskNotFound:
        raise services.NothingToDo("the task no longer exists") from None
    jobs = len(pushed.jobs)
    reason = {"reason": "pushed by an operator", "note": note, "jobs": pushed.jobs}
    _change(finding, FindingState.RESOLVED, actor, reason)
    lost = (
        f", {pushed.lost_attempts} dead attempt(s) settled as lost" if pushed.lost_attempts else ""
    )
    return f"re-enqueued {jobs} job(s){lost}"


def _release(finding: Finding, actor: Actor, note: str) -> str:
    token = str(finding.details.get("token", ""))
    services.release_lock(finding.key, token, actor)
    _change(finding, FindingState.RESOLVED, actor, {"reason": "lock released", "note": note})
    return f"released {finding.key}"


def _change(finding: Finding, to: str, actor: Actor, details: dict[str, Any]) -> None:
    details = {k: v for k, v in details.items() if v not in ("", None)}
    if not findings.change_state(finding, to, actor=_user(actor), details=details, now=_now()):
        raise services.NothingToDo(f"the finding changed meanwhile (it is {finding.state})")


def _user(actor: Actor) -> Any:
    return actor if actor is not None and actor.is_authenticated else None


def _now() -> Any:
    return timezone.now()


ORPHAN = (FindingKind.ORPHAN_OBJECT,)
OPEN = (FindingState.OPEN,)
FINDING_ACTIONS: dict[str, FindingAction] = {
    a.slug: a
    for a in (
        FindingAction(
            "delete_object", "Delete the objects of", ACT_ON_FINDING, ORPHAN, OPEN,
            _orphan_removal("delete"),
        ),
        FindingAction(
            "archive_object", "Archive the objects of", ACT_ON_FINDING, ORPHAN, OPEN,
            _orphan_removal("archive"),
        ),
        FindingAction(
            "ignore_finding", "Ignore", ACT_ON_FINDING, tuple(FindingKind.values), OPEN, _ignore
        ),
        FindingAction(
            "reopen_finding", "Reopen", ACT_ON_FINDING, tuple(FindingKind.values),
            (FindingState.IGNORED,), _reopen,
        ),
        FindingAction(
            "requeue_task", "Re-enqueue the stuck tasks of", "sagas.redrive_taskinstance",
            (FindingKind.STUCK_TASK,), OPEN, _requeue,
        ),
        FindingAction(
            "release_lock", "Release the stale locks of", "sagas.release_lock",
            (FindingKind.STALE_LOCK,), OPEN, _release,
        ),
    )
}  # fmt: skip


def act(slug: str, finding_id: Any, actor: Actor, note: str) -> str:
    """Do ``slug`` to one finding, read again at this moment; what was done, or
    ``NothingToDo`` with the reason."""
    action = FINDING_ACTIONS[slug]
    pk = _int_or_none(finding_id)
    finding = Finding.objects.filter(pk=pk).first() if pk is not None else None
    if finding is None:
        raise services.NothingToDo("no such finding")
    if not action.applies(finding.kind, finding.state):
        raise services.NothingToDo(
            f"the finding is {finding.state}, of kind {finding.kind} (this applies to "
            f"{' or '.join(action.states)} findings of kind {', '.join(action.kinds)})"
        )
    # Its state is compared again where it changes (compare-and-set), so a run or
    # another operator that moved it first wins and this one does nothing.
    return action.perform(finding, actor, note)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def start_run(actor: Actor, *, apply_policies: bool) -> str:
    """Queue a reconciliation run over every saga with a prefix, started by an operator;
    ``NothingToDo`` when one is running already."""
    running = reconciliation.running_run()
    if running is not None:
        raise services.NothingToDo(
            f"run #{running.pk} is in progress (started {running.started_at:%H:%M:%S})"
        )
    try:
        return reconciliation.enqueue_console_run(_user(actor), apply_policies=apply_policies)
    except RedisError as exc:
        raise services.NothingToDo(
            f"could not queue the run: Redis is unavailable ({exc})"
        ) from exc
