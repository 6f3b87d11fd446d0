"""A task's rows as plain data, and the plan of changes a decision makes to them.

Decisions (``sagas.engine.decisions`` and the modules above it) are pure: they read a
``Plan``'s rows, change them in memory and append an ``Effect`` for every change, so the
rest of a decision sees what came before it. ``sagas.engine.apply`` is the one place that
turns a plan's effects into fenced transitions, audit entries and, after commit, jobs.
Every time in a plan is on the database's clock (``Plan.now`` is read with the rows).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sagas.definitions import Saga, StepDefinition
from sagas.states import (
    AttemptKind,
    StepStatus,
    TaskStatus,
    can_transition_step,
    can_transition_task,
)

FORWARD = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING_RETRY)
UNDOING = (TaskStatus.COMPENSATING, TaskStatus.CANCELLING)


class IllegalMove(ValueError):
    """A decision asked for a change the allowed-transitions table refuses (a bug)."""


def job_id(task_id: object, step_name: str, kind: str, attempt: int, suffix: str = "") -> str:
    """``saga-<task>-<step>-a<n>`` (action) or ``-c<n>`` (compensation): [A-Za-z0-9_-] only."""
    letter = "c" if kind == AttemptKind.COMPENSATION else "a"
    base = f"saga-{task_id}-{step_name}-{letter}{attempt}"
    return f"{base}-{suffix}" if suffix else base


def is_job_for(jid: str, task_id: object, step_name: str, kind: str, attempt: int) -> bool:
    """Whether ``jid`` is a job (any re-queue of it) of exactly this attempt."""
    base = job_id(task_id, step_name, kind, attempt)
    return jid == base or jid.startswith(base + "-")


# --- rows ----------------------------------------------------------------------------------


@dataclass
class AttemptRow:
    """A running attempt of a step."""

    pk: int
    kind: str
    number: int
    worker: str = ""
    job_id: str = ""
    heartbeat_expires_at: datetime | None = None


@dataclass
class StepRow:
    pk: int
    name: str
    index: int
    status: str
    critical: bool = True
    level: int = 0
    after: tuple[str, ...] = ()
    is_group: bool = False
    group: str = ""
    group_mode: str = ""
    group_timeout_s: float | None = None
    group_schedule_to_close_s: float | None = None
    deadline_at: datetime | None = None
    schedule_deadline_at: datetime | None = None
    compensate_alone: bool = False
    attempt_count: int = 0
    compensation_attempt_count: int = 0
    attempt_budget_base: int = 0
    compensation_budget_base: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    job_id: str = ""
    data: Any = None
    error: str = ""
    compensation_error: str = ""
    trace_id: str = ""
    last_action_outcome: str = ""
    running: list[AttemptRow] = field(default_factory=list)

    def running_of(self, kind: str) -> list[AttemptRow]:
        return [a for a in self.running if a.kind == kind]


@dataclass
class TaskRow:
    pk: UUID | str
    saga: str
    status: str
    input: dict[str, Any] = field(default_factory=dict)
    trace_id: str = ""
    correlation_id: str = ""
    compensation_reason: str = ""
    started_at: datetime | None = None
    updated_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    undo_started_at: datetime | None = None
    deadline_at: datetime | None = None
    wake_at: datetime | None = None


# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveTask:
    to: str
    action: str
    fields: dict[str, Any]
    details: dict[str, Any] | None = None
    actor: Any = None
    step: str = ""


@dataclass(frozen=True)
class MoveStep:
    step: str
    to: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class UpdateStep:
    step: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class UpdateTask:
    fields: dict[str, Any]


@dataclass(frozen=True)
class Schedule:
    """Hand ``attempt`` of ``step`` to a worker (at ``at``, database clock) after commit."""

    step: str
    kind: str
    attempt: int
    job_id: str
    at: datetime | None = None
    timeout_s: float | None = None
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Audit:
    action: str
    step: str = ""
    details: dict[str, Any] | None = None
    actor: Any = None


@dataclass(frozen=True)
class SignalTask:
    """Ask every running action attempt of the task to stop (``ctx.cancelled``)."""


@dataclass(frozen=True)
class SignalAttempt:
    step: str
    kind: str
    number: int


@dataclass(frozen=True)
class StopAttempt:
    """Stop a running attempt's work horse outright (its worker's parent records it)."""

    step: str
    kind: str
    number: int
    worker: str
    job_id: str


@dataclass(frozen=True)
class PromoteJob:
    """Move a scheduled job whose time has long passed onto the queue (a dead scheduler)."""

    job_id: str


@dataclass(frozen=True)
class NotifyCompensationFailed:
    """Tell the humans (signal, mail, webhook) once the plan has committed."""


Effect = (
    MoveTask
    | MoveStep
    | UpdateStep
    | UpdateTask
    | Schedule
    | Audit
    | SignalTask
    | SignalAttempt
    | StopAttempt
    | PromoteJob
    | NotifyCompensationFailed
)


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Plan:
    """A task's rows, the clock they were read at, and the changes decided so far."""

    task: TaskRow
    steps: list[StepRow]
    now: datetime
    saga: Saga | None
    effects: list[Effect] = field(default_factory=list)
    rand: Callable[[], float] = random.random

    # reading

    def step(self, name: str) -> StepRow:
        return next(s for s in self.steps if s.name == name)

    def work(self) -> list[StepRow]:
        """Steps that run code (everything but group rows)."""
        return [s for s in self.steps if not s.is_group]

    def nodes(self) -> list[StepRow]:
        """Top-level steps and groups (the dependency graph's nodes)."""
        return [s for s in self.steps if not s.group]

    def branches(self, group: StepRow) -> list[StepRow]:
        return [s for s in self.steps if s.group == group.name]

    def group_of(self, step: StepRow) -> StepRow | None:
        if not step.group:
            return None
        return next(s for s in self.steps if s.is_group and s.name == step.group)

    def definition(self, step: StepRow) -> StepDefinition | None:
        return self.saga.get_step(step.name) if self.saga else None

    def expects(self, step: StepRow, kind: str, attempt: int) -> bool:
        """Whether a job for exactly this attempt has been handed to the queue."""
        return bool(step.job_id) and is_job_for(step.job_id, self.task.pk, step.name, kind, attempt)

    @property
    def changed(self) -> bool:
        return bool(self.effects)

    # changing

    def move_task(
        self,
        to: str,
        action: str,
        *,
        actor: Any = None,
        step: StepRow | None = None,
        details: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        if not can_transition_task(self.task.status, to):
            raise IllegalMove(f"task {self.task.pk}: {self.task.status} -> {to} is not allowed")
        self.effects.append(MoveTask(to, action, fields, details, actor, step.name if step else ""))
        self.task.status = to
        _assign(self.task, fields)

    def update_task(self, **fields: Any) -> None:
        self.effects.append(UpdateTask(fields))
        _assign(self.task, fields)

    def move_step(self, step: StepRow, to: str, **fields: Any) -> None:
        if not can_transition_step(step.status, to):
            raise IllegalMove(f"step {step.name}: {step.status} -> {to} is not allowed")
        self.effects.append(MoveStep(step.name, to, fields))
        step.status = to
        _assign(step, fields)

    def update_step(self, step: StepRow, **fields: Any) -> None:
        self.effects.append(UpdateStep(step.name, fields))
        _assign(step, fields)

    def schedule(
        self,
        step: StepRow,
        kind: str,
        attempt: int,
        *,
        at: datetime | None = None,
        suffix: str = "",
        meta: dict[str, Any] | None = None,
    ) -> str:
        jid = job_id(self.task.pk, step.name, kind, attempt, suffix)
        if at is not None and step.next_attempt_at != at:
            # A delayed job's due time is what tells the reaper its scheduler is late.
            self.update_step(step, next_attempt_at=at)
        definition = self.definition(step)
        timeout = definition.timeout_s if definition else None
        self.effects.append(Schedule(step.name, kind, attempt, jid, at, timeout, meta))
        step.job_id = jid
        return jid

    def audit(
        self,
        action: str,
        step: StepRow | None = None,
        details: dict[str, Any] | None = None,
        actor: Any = None,
    ) -> None:
        self.effects.append(Audit(action, step.name if step else "", details, actor))

    def signal_task(self) -> None:
        self.effects.append(SignalTask())

    def signal_attempt(self, step: StepRow, attempt: AttemptRow) -> None:
        self.effects.append(SignalAttempt(step.name, attempt.kind, attempt.number))

    def stop_attempt(self, step: StepRow, attempt: AttemptRow) -> None:
        self.effects.append(
            StopAttempt(step.name, attempt.kind, attempt.number, attempt.worker, attempt.job_id)
        )

    def promote(self, jid: str) -> None:
        self.effects.append(PromoteJob(jid))

    def notify_compensation_failed(self) -> None:
        self.effects.append(NotifyCompensationFailed())

    # attempts (their rows are written by the executor, fenced; the plan only follows)

    def attempt_started(self, step: StepRow, kind: str, number: int) -> None:
        step.running.append(AttemptRow(0, kind, number))

    def attempt_ended(self, step: StepRow, kind: str, number: int, outcome: str) -> None:
        step.running = [a for a in step.running if (a.kind, a.number) != (kind, number)]
        if kind == AttemptKind.ACTION:
            step.last_action_outcome = outcome

    def after(self, seconds: float) -> datetime:
        return self.now + timedelta(seconds=seconds)


def _assign(row: TaskRow | StepRow, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if hasattr(row, name):
            setattr(row, name, value)


def is_running(step: StepRow) -> bool:
    return step.status == StepStatus.RUNNING
