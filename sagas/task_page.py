"""One task as the console shows it: header, what happens next, the step timeline with
every attempt, and the latest audit entries. A fixed number of queries per task."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Prefetch
from django.utils import timezone

from sagas.definitions import Saga, StepDefinition, registry
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.states import (
    ACTIVE_TASK_STATUSES,
    AttemptKind,
    AttemptOutcome,
    AuditAction,
    StepStatus,
    TaskStatus,
)

AUDIT_ROWS = 50
UNDOING = (TaskStatus.COMPENSATING, TaskStatus.CANCELLING)


@dataclass
class StepView:
    record: StepRecord
    attempts: list[StepAttempt]
    definition: StepDefinition | None
    branches: list[StepView] = field(default_factory=list)
    breaker_waiting: bool = False

    @property
    def data_json(self) -> str:
        return pretty_json(self.record.data) if self.record.data not in (None, {}, []) else ""

    @property
    def has_compensation(self) -> bool:
        return self.definition is not None and self.definition.compensation is not None


@dataclass
class TaskPage:
    task: TaskInstance
    saga: Saga | None
    steps: list[StepView]
    audit: list[AuditEntry]
    audit_total: int

    @property
    def active(self) -> bool:
        return self.task.status in ACTIVE_TASK_STATUSES

    @property
    def input_json(self) -> str:
        return pretty_json(self.task.input)

    @property
    def flat_steps(self) -> list[StepView]:
        return [v for s in self.steps for v in (s, *s.branches)]

    @property
    def any_attempts(self) -> bool:
        return any(s.attempts for s in self.flat_steps)

    @property
    def running(self) -> list[StepView]:
        return [s for s in self.flat_steps if _running(s)]

    @property
    def progress(self) -> int | None:
        """The running step's progress, for the list's live column."""
        running = [s.record.progress for s in self.running if not s.record.is_group]
        return min(running) if running else None

    def next_lines(self) -> list[str]:
        """What happens next, in an operator's words."""
        return what_happens_next(self)

    def undo_order(self) -> list[list[str]]:
        """What a cancel would undo now, level by level (a level's steps run in parallel)."""
        return undo_plan(self)


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def build(task_id: Any) -> TaskPage | None:
    task = (
        TaskInstance.objects.select_related("cancelled_by", "resolved_by")
        .filter(pk=task_id)
        .first()
    )
    return None if task is None else page_of(task)


def page_of(task: TaskInstance) -> TaskPage:
    saga = registry.get(task.saga) if task.saga in registry else None
    records = list(
        StepRecord.objects.filter(task=task)
        .order_by("index")
        .prefetch_related(
            Prefetch("attempts", queryset=StepAttempt.objects.order_by("kind", "number"))
        )
    )
    breaker_steps = set(
        AuditEntry.objects.filter(
            task=task, action=AuditAction.BREAKER_OPEN, step__status=StepStatus.WAITING_RETRY
        ).values_list("step_id", flat=True)
    )
    entries = AuditEntry.objects.filter(task=task).select_related("step")
    latest = list(entries.order_by("-created_at", "-id")[:AUDIT_ROWS])
    total = entries.count() if len(latest) == AUDIT_ROWS else len(latest)
    return TaskPage(task, saga, _tree(records, saga, breaker_steps), latest, total)


def _tree(records: list[StepRecord], saga: Saga | None, breakers: set[int]) -> list[StepView]:
    views: dict[str, StepView] = {}
    top: list[StepView] = []
    for record in records:
        definition = saga.get_step(record.name) if saga else None
        view = StepView(record, list(record.attempts.all()), definition)
        view.breaker_waiting = record.pk in breakers
        views[record.name] = view
        parent = views.get(record.group) if record.group else None
        (parent.branches if parent else top).append(view)
    return top


def _running(view: StepView) -> bool:
    return any(a.outcome == AttemptOutcome.RUNNING for a in view.attempts)


# --- what happens next ---------------------------------------------------------------------


def what_happens_next(page: TaskPage) -> list[str]:
    status = page.task.status
    if status == TaskStatus.COMPENSATION_FAILED:
        return [
            "Needs a human: " + (page.task.error_summary or "a compensation failed for good") + ".",
            "Undo by hand what the failed compensation left, then resolve with a note; or retry "
            "the compensation once its cause is fixed.",
        ]
    if status == TaskStatus.DEAD_LETTERED:
        return [
            "Parked for an operator: "
            + (page.task.error_summary or "a step exhausted its retries")
            + ".",
            "Redrive retries exactly the work that parked it with a fresh retry budget; cancel "
            "undoes what succeeded.",
        ]
    if status not in ACTIVE_TASK_STATUSES:
        return [f"Nothing: the task is {status.replace('_', ' ')}."]
    lines = [line for view in page.flat_steps if (line := _step_next(page, view))]
    if status in UNDOING and not page.running:
        order = page.undo_order()
        if order:
            lines.append("Then undo: " + " → ".join(", ".join(level) for level in order) + ".")
    return lines or ["Waiting for a worker to pick up the next job."]


def _step_next(page: TaskPage, view: StepView) -> str:
    step, status = view.record, view.record.status
    if step.is_group:
        return ""
    if _running(view):
        return _running_line(page, view)
    when = _time(step.next_attempt_at)
    if status == StepStatus.WAITING_RETRY and view.breaker_waiting:
        name = view.definition.breaker.name if view.definition and view.definition.breaker else "?"
        return f"{step.name}: waiting for breaker {name} to half-open at {when}."
    if status == StepStatus.WAITING_RETRY:
        return f"{step.name}: attempt {step.attempt_count + 1} at {when}, {_left(page, view)}."
    if status == StepStatus.COMPENSATING and step.next_attempt_at:
        number = step.compensation_attempt_count + 1
        return f"{step.name}: undo attempt {number} at {when}."
    if status == StepStatus.PENDING and page.task.status not in UNDOING and _ready(page, view):
        return f"{step.name}: waiting for a worker to start it."
    return ""


def _running_line(page: TaskPage, view: StepView) -> str:
    attempt = next(a for a in view.attempts if a.outcome == AttemptOutcome.RUNNING)
    what = "undo" if attempt.kind == AttemptKind.COMPENSATION else "attempt"
    if page.task.status == TaskStatus.CANCELLING and attempt.kind == AttemptKind.ACTION:
        asked = _time(page.task.cancel_requested_at)
        return f"cancelling: waiting for {view.record.name} to stop (asked at {asked})."
    progress = f", {view.record.progress}%" if view.record.progress else ""
    message = f" ({view.record.progress_message})" if view.record.progress_message else ""
    return (
        f"{view.record.name}: {what} {attempt.number} running on {attempt.worker or 'a worker'} "
        f"since {_time(attempt.started_at)}{progress}{message}."
    )


def _left(page: TaskPage, view: StepView) -> str:
    if page.saga is None or view.definition is None:
        return "retries unknown (step not in this deploy)"
    policy = page.saga.action_policy(view.definition, page.task.input)
    used = view.record.attempt_count - view.record.attempt_budget_base
    left = max(0, policy.max_retries + 1 - used - 1)
    return f"{left} {'retry' if left == 1 else 'retries'} left after it"


def _ready(page: TaskPage, view: StepView) -> bool:
    """Pending and every node it waits for has finished (so a job should exist for it)."""
    by_name = {v.record.name: v for v in page.flat_steps}
    if view.record.group:
        parent = by_name.get(view.record.group)
        return parent is not None and parent.record.status == StepStatus.RUNNING
    done = (StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED)
    return all(
        by_name[name].record.status in done for name in view.record.after or () if name in by_name
    )


def undo_plan(page: TaskPage) -> list[list[str]]:
    """Succeeded (or running) steps with a compensation, highest level first."""
    undoable = (StepStatus.SUCCEEDED, StepStatus.RUNNING, StepStatus.COMPENSATING)
    levels: dict[int, list[str]] = {}
    for view in page.flat_steps:
        step = view.record
        if not step.is_group and step.status in undoable and view.has_compensation:
            running = step.status == StepStatus.RUNNING
            levels.setdefault(step.level, []).append(
                f"{step.name} (if it finishes)" if running else step.name
            )
    return [levels[level] for level in sorted(levels, reverse=True)]


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "an unknown time"
    return timezone.localtime(moment).strftime("%H:%M:%S")
