"""The database is the source of truth: tasks, their steps, every attempt and the audit trail."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from sagas.states import (
    ACTIVE_TASK_STATUSES,
    AttemptKind,
    AttemptOutcome,
    CompensationReason,
    StepStatus,
    TaskStatus,
)

FENCED_FIELDS = frozenset({"status", "version"})
# Active tasks and those parked for an operator: counted exactly, indexed apart.
OPEN_TASK_STATUSES = ACTIVE_TASK_STATUSES | {
    TaskStatus.COMPENSATION_FAILED,
    TaskStatus.DEAD_LETTERED,
}


def _refuse_status_write(obj: models.Model, update_fields: Any) -> None:
    """A plain save() of an existing row would write back a stale status and version."""
    if obj._state.adding:
        return
    if update_fields is None or FENCED_FIELDS & set(update_fields):
        raise ValueError(
            f"{type(obj).__name__}.save() cannot write status or version: use "
            "sagas.transitions.transition(), or save(update_fields=[...]) for other fields"
        )


class TaskInstance(models.Model):
    """One run of a saga. Its ``status`` changes only through ``sagas.transitions.transition``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    saga = models.CharField(max_length=100)
    status = models.CharField(max_length=32, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    input = models.JSONField(default=dict)
    # NULL, not "": tasks without a key must never collide in the unique constraint.
    business_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    correlation_id = models.CharField(max_length=200, blank=True)
    trace_id = models.CharField(max_length=32, help_text="W3C trace-context trace id (32 hex)")
    version = models.PositiveIntegerField(
        default=0, help_text="Fencing token: bumped by every transition."
    )
    compensation_reason = models.CharField(
        max_length=16, choices=CompensationReason.choices, blank=True
    )
    current_step = models.CharField(max_length=100, blank=True)
    error_summary = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    cancel_reason = models.TextField(blank=True)
    # When the current undo (a cancel, or compensating a failure) began: running actions
    # were asked to stop then, and are stopped outright a grace period later.
    undo_started_at = models.DateTimeField(null=True, blank=True)
    # The saga's deadline_s, on the database's clock (the reaper compares on that clock only).
    deadline_at = models.DateTimeField(null=True, blank=True)
    # When the reaper should look at this task if nothing else happens first: the earliest
    # expected job plus its grace, a cancel or group stop overdue, or the deadline. NULL
    # while only attempts with live heartbeats run, and for tasks that need nothing.
    wake_at = models.DateTimeField(null=True, blank=True, editable=False)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    resolution_note = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["saga", "business_key"],
                condition=Q(business_key__isnull=False),
                name="task_business_key_unique_per_saga",
            ),
        ]
        indexes = [
            # Keyset pagination of the console and the API: newest first.
            models.Index(fields=["-created_at", "-id"], name="task_created_idx"),
            models.Index(fields=["status", "-created_at", "-id"], name="task_status_created_idx"),
            models.Index(fields=["saga", "-created_at", "-id"], name="task_saga_created_idx"),
            models.Index(
                fields=["saga", "status", "-created_at", "-id"], name="task_saga_status_idx"
            ),
            models.Index(fields=["business_key"], name="task_business_key_idx"),
            models.Index(fields=["correlation_id"], name="task_correlation_idx"),
            # The search box's third exact match: without it an OR of the three scans.
            models.Index(fields=["trace_id"], name="task_trace_idx"),
            # The dashboard's exact counts: only the tasks the engine or an operator still has
            # to move (a few percent of the table), so counting them never scans the rest.
            models.Index(
                fields=["status", "updated_at"],
                condition=Q(status__in=sorted(OPEN_TASK_STATUSES)),
                name="task_open_status_idx",
            ),
            # The reaper's only way in to tasks: those whose wake-up time has passed.
            models.Index(
                fields=["wake_at", "id"],
                condition=Q(wake_at__isnull=False),
                name="task_wake_idx",
            ),
        ]
        # The console's action permissions (design: Console). `view_*` lets one see.
        permissions = [
            ("cancel_taskinstance", "Can cancel a running task"),
            ("resolve_taskinstance", "Can resolve a task or retry its compensation"),
            ("redrive_taskinstance", "Can redrive a dead-lettered task"),
            ("reset_breaker", "Can reset a circuit breaker"),
            ("release_lock", "Can release a stale task lock"),
        ]

    def __str__(self) -> str:
        return f"{self.saga} {self.id} ({self.status})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        _refuse_status_write(self, kwargs.get("update_fields"))
        super().save(*args, **kwargs)


class StepRecord(models.Model):
    """A step of one task as recorded at the task's start."""

    task = models.ForeignKey(TaskInstance, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=100)
    status = models.CharField(max_length=32, choices=StepStatus.choices, default=StepStatus.PENDING)
    critical = models.BooleanField(default=True)
    # Dependency level (0 runs first), the nodes this one waits for, and for parallel
    # groups: the group row itself (is_group, mode, deadline) and its branches (group).
    level = models.PositiveSmallIntegerField(default=0)
    after = models.JSONField(default=list, blank=True)
    is_group = models.BooleanField(default=False)
    group = models.CharField(max_length=100, blank=True)
    group_mode = models.CharField(max_length=16, blank=True)
    # A group's timeout_s counts from its first branch's start (deadline_at); its
    # schedule-to-close cap counts from the group's start, queue time included.
    group_timeout_s = models.FloatField(null=True, blank=True)
    group_schedule_to_close_s = models.FloatField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    schedule_deadline_at = models.DateTimeField(null=True, blank=True)
    # A branch that succeeded after its group had decided without it: undo it on its own.
    compensate_alone = models.BooleanField(default=False)
    version = models.PositiveIntegerField(default=0)
    attempt_count = models.PositiveIntegerField(default=0)
    compensation_attempt_count = models.PositiveIntegerField(default=0)
    data = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    compensation_error = models.TextField(blank=True)
    trace_id = models.CharField(max_length=32, blank=True)
    span_id = models.CharField(max_length=16, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    progress_message = models.CharField(max_length=300, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    job_id = models.CharField(
        max_length=200, blank=True, help_text="The RQ job expected to run this step next."
    )
    # Attempts made before the last redrive / retry_compensation: a fresh budget starts here.
    attempt_budget_base = models.PositiveIntegerField(default=0)
    compensation_budget_base = models.PositiveIntegerField(default=0)

    class Meta:
        # By the column, not by "task": that would join the tasks table to order by theirs.
        ordering = ["task_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["task", "index"], name="step_index_unique"),
            models.UniqueConstraint(fields=["task", "name"], name="step_name_unique"),
            models.CheckConstraint(
                condition=Q(progress__gte=0, progress__lte=100), name="step_progress_0_100"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.index}. {self.name} ({self.status})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        _refuse_status_write(self, kwargs.get("update_fields"))
        super().save(*args, **kwargs)


class StepAttempt(models.Model):
    """One attempt of an action or a compensation: answers "why did this run twice?"."""

    step = models.ForeignKey(StepRecord, on_delete=models.CASCADE, related_name="attempts")
    kind = models.CharField(max_length=16, choices=AttemptKind.choices)
    number = models.PositiveIntegerField()
    outcome = models.CharField(
        max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING
    )
    worker = models.CharField(max_length=200, blank=True)
    job_id = models.CharField(max_length=200, blank=True)
    lock_token = models.CharField(max_length=64, blank=True)
    lock_key = models.CharField(max_length=300, blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # heartbeat_at plus the saga's lock expiry, on the database's clock: past it, with no
    # newer beat, the attempt counts as lost.
    heartbeat_expires_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    traceback = models.TextField(blank=True)

    class Meta:
        ordering = ["step_id", "kind", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["step", "kind", "number"], name="attempt_number_unique"
            ),
            # The final judge of exactly-once effect: at most one success per step and kind.
            models.UniqueConstraint(
                fields=["step", "kind"],
                condition=Q(outcome=AttemptOutcome.SUCCEEDED),
                name="attempt_one_success_per_kind",
            ),
        ]
        indexes = [
            # The reaper looks for running attempts whose heartbeat expired.
            models.Index(
                fields=["heartbeat_expires_at", "id"],
                condition=Q(outcome=AttemptOutcome.RUNNING),
                name="attempt_running_hb_idx",
            ),
            # The worker's parent finds the attempt of a killed or stopped job.
            models.Index(fields=["job_id"], name="attempt_job_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.number} ({self.outcome})"


class AuditEntry(models.Model):
    """Append-only history. On Postgres a trigger refuses UPDATE, DELETE and TRUNCATE."""

    # PROTECT everywhere: deleting a task, step or user must never take its history along.
    # Null only for entries about things no task owns (e.g. an orphan S3 object deleted).
    task = models.ForeignKey(
        TaskInstance, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_entries"
    )
    step = models.ForeignKey(
        StepRecord, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_entries"
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    actor_name = models.CharField(
        max_length=150, help_text="Who acted, as named at the time; 'system' for the engine."
    )
    action = models.CharField(max_length=64)
    from_status = models.CharField(max_length=32, blank=True)
    to_status = models.CharField(max_length=32, blank=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "audit entries"
        indexes = [
            models.Index(fields=["task", "created_at"], name="audit_task_created_idx"),
            models.Index(fields=["action", "-created_at"], name="audit_action_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action}"


TOKEN_SCHEME_PREFIX = "sgs_"  # noqa: S105 - a marker that helps secret scanners, not a secret
TOKEN_DISPLAY_CHARS = 12
# Recording every use would be a write per API call; once a minute is precise enough.
TOKEN_USE_RESOLUTION = timedelta(minutes=1)


def token_digest(plain: str) -> str:
    """The SHA-256 hex digest stored for a token (the token itself is never stored)."""
    return hashlib.sha256(plain.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token for the HTTP API; it acts as its user, with that user's permissions."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'billing CI'.")
    prefix = models.CharField(max_length=TOKEN_DISPLAY_CHARS, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def generate_key(self) -> str:
        """Give this token a new secret and return it: the only time it is ever readable."""
        plain = TOKEN_SCHEME_PREFIX + secrets.token_urlsafe(32)
        self.prefix = plain[:TOKEN_DISPLAY_CHARS]
        self.key_hash = token_digest(plain)
        return plain

    def revoke(self) -> bool:
        """Revoke the token now; False if it was already revoked."""
        now = timezone.now()
        won = ApiToken.objects.filter(pk=self.pk, revoked_at=None).update(revoked_at=now)
        if won:
            self.revoked_at = now
        return bool(won)

    def record_use(self) -> None:
        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= TOKEN_USE_RESOLUTION:
            ApiToken.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now

    @classmethod
    def find_active(cls, plain: str) -> ApiToken | None:
        """The unrevoked token with this secret whose user is active, or None."""
        token = (
            cls.objects.select_related("user")
            .filter(key_hash=token_digest(plain), revoked_at=None, user__is_active=True)
            .first()
        )
        return token


class BulkAction(models.TextChoices):
    """The operator actions a bulk operation can apply: to tasks (``services.OPERATOR_ACTIONS``
    slugs) or to findings (``finding_actions.FINDING_ACTIONS`` slugs)."""

    CANCEL = "cancel"
    RESOLVE = "resolve"
    REDRIVE = "redrive"
    DELETE_OBJECT = "delete_object"
    ARCHIVE_OBJECT = "archive_object"
    IGNORE_FINDING = "ignore_finding"
    REOPEN_FINDING = "reopen_finding"
    REQUEUE_TASK = "requeue_task"
    RELEASE_LOCK = "release_lock"


class BulkStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class BulkOperation(models.Model):
    """One operator's action on many tasks or findings (its targets), run in the background
    by ``sagas.bulk``.

    The target ids are frozen at confirmation; ``position`` is the next one to act on and
    advances in the transaction that acts on a task, so a lost job's successor resumes
    exactly there. ``run`` numbers the jobs: only the job of the current run may write.
    """

    action = models.CharField(max_length=16, choices=BulkAction.choices)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    actor_name = models.CharField(max_length=150)
    note = models.TextField(blank=True)
    target_ids = models.JSONField(default=list)
    total = models.PositiveIntegerField(default=0)
    position = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    skipped_examples = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=BulkStatus.choices, default=BulkStatus.QUEUED)
    run = models.PositiveIntegerField(default=1)
    resumes = models.PositiveIntegerField(default=0)
    # Where the last resume started: a job lost twice at one task gives up on that task.
    resumed_from = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    progressed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"bulk {self.action} #{self.pk} ({self.position}/{self.total}, {self.status})"

    @property
    def percent(self) -> int:
        return self.position * 100 // self.total if self.total else 100

    @property
    def finished(self) -> bool:
        return self.status in (BulkStatus.DONE, BulkStatus.FAILED)


class OwnedKey(models.Model):
    """An S3 key a step owns (its ``data`` names it as ``"Key"`` or ``"Keys"``): the
    engine writes it with the step's data and removes it when the step is compensated, so
    reconciliation asks an index whether a key is owned instead of reading step data."""

    step = models.ForeignKey(StepRecord, on_delete=models.CASCADE, related_name="owned_keys")
    saga = models.CharField(max_length=100)
    key = models.CharField(max_length=1024)
    created_at = models.DateTimeField(auto_now_add=True)
    # The last reconciliation run whose S3 listing contained the key: the keys a run did
    # not see are the candidates for missing objects (one indexed query, no set in memory).
    seen_by_run = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["key", "step_id"]
        constraints = [
            models.UniqueConstraint(fields=["key", "step"], name="owned_key_unique_per_step"),
        ]
        indexes = [
            models.Index(fields=["saga", "seen_by_run"], name="owned_key_saga_seen_idx"),
        ]

    def __str__(self) -> str:
        return self.key


class RunTrigger(models.TextChoices):
    SCHEDULE = "schedule"
    COMMAND = "command"
    CONSOLE = "console"


class RunStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReconciliationRun(models.Model):
    """One reconciliation pass over one saga (or every saga with a prefix: ``saga`` empty)."""

    saga = models.CharField(max_length=100, blank=True)
    trigger = models.CharField(max_length=16, choices=RunTrigger.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    applied = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING)
    holder = models.CharField(max_length=200, blank=True, help_text="host:pid running it.")
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    counts = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        constraints = [
            # At most one run at a time, across all workers and hosts.
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status=RunStatus.RUNNING),
                name="reconciliation_one_running",
            ),
        ]

    def __str__(self) -> str:
        return f"reconciliation #{self.pk} {self.saga or 'all sagas'} ({self.status})"


class FindingKind(models.TextChoices):
    ORPHAN_OBJECT = "orphan_object"
    RECENT_ORPHAN = "recent_orphan"
    MISSING_OBJECT = "missing_object"
    STUCK_TASK = "stuck_task"
    STALE_LOCK = "stale_lock"


class FindingState(models.TextChoices):
    OPEN = "open"
    DELETED = "deleted"
    ARCHIVED = "archived"
    IGNORED = "ignored"
    RESOLVED = "resolved"


class Finding(models.Model):
    """Something reconciliation found; one per (saga, kind, key) across runs."""

    run = models.ForeignKey(
        ReconciliationRun,
        on_delete=models.PROTECT,
        related_name="findings",
        help_text="The latest run that saw it.",
    )
    kind = models.CharField(max_length=32, choices=FindingKind.choices)
    saga = models.CharField(max_length=100)
    key = models.CharField(max_length=1024)
    task = models.ForeignKey(
        TaskInstance, null=True, blank=True, on_delete=models.SET_NULL, related_name="findings"
    )
    state = models.CharField(max_length=16, choices=FindingState.choices, default=FindingState.OPEN)
    details = models.JSONField(default=dict, blank=True)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    acted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    acted_by_name = models.CharField(max_length=150, blank=True)
    acted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["saga", "kind", "key"], name="finding_unique_key"),
        ]
        indexes = [
            models.Index(fields=["state", "saga", "kind"], name="finding_state_idx"),
        ]
        permissions = [("act_on_finding", "Can delete, archive or ignore findings and start a run")]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} ({self.state})"
