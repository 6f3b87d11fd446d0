"""Read-only operator console over tasks, steps, attempts and the audit trail."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db.models import ForeignKey, QuerySet
from django.forms import ModelChoiceField, ModelForm
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from sagas.definitions import registry
from sagas.models import ApiToken, AuditEntry, StepAttempt, StepRecord, TaskInstance

admin.site.site_header = "Saga operations console"
admin.site.site_title = "Saga operations"
admin.site.index_title = "Operations"


class ReadOnlyMixin:
    """Nothing here is edited by hand: changes go through the services and are audited."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TaskChildInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    """Rows that belong to a task are visible to whoever may view the task."""

    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("sagas.view_taskinstance")


class StepRecordInline(TaskChildInline):
    model = StepRecord
    fields = readonly_fields = (
        "index",
        "name",
        "status",
        "critical",
        "attempt_count",
        "compensation_attempt_count",
        "progress",
        "error",
        "compensation_error",
        "started_at",
        "finished_at",
        "next_attempt_at",
    )
    ordering = ("index",)


class AuditEntryInline(TaskChildInline):
    model = AuditEntry
    fk_name = "task"
    verbose_name_plural = "audit trail"
    fields = readonly_fields = (
        "created_at",
        "actor_name",
        "action",
        "step",
        "from_status",
        "to_status",
        "details",
    )
    ordering = ("created_at", "id")

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEntry]:
        return super().get_queryset(request).select_related("step")


class SagaFilter(admin.SimpleListFilter):
    """Saga names come from the registry: no DISTINCT over the whole task table."""

    title = "saga"
    parameter_name = "saga"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in registry.names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(saga=self.value()) if self.value() else queryset


@admin.register(TaskInstance)
class TaskInstanceAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "short_id",
        "saga",
        "status",
        "current_step",
        "business_key",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", SagaFilter)
    # Exact matches only, so each search is an index lookup even on millions of tasks.
    search_fields = ("business_key__exact", "correlation_id__exact")
    search_help_text = "Task id, business key or correlation id (exact)."
    show_full_result_count = False
    list_per_page = 50
    ordering = ("-created_at", "-id")
    inlines = (StepRecordInline, AuditEntryInline)
    fieldsets = (
        (None, {"fields": ("id", "saga", "status", "current_step", "error_summary")}),
        ("Keys", {"fields": ("business_key", "correlation_id", "trace_id", "version")}),
        ("Input", {"fields": ("input",)}),
        (
            "Timeline",
            {
                "fields": (
                    "created_at",
                    "started_at",
                    "finished_at",
                    "cancel_requested_at",
                    "cancelled_at",
                )
            },
        ),
        (
            "Operator actions",
            {
                "fields": (
                    "compensation_reason",
                    "cancelled_by",
                    "cancel_reason",
                    "resolved_by",
                    "resolution_note",
                )
            },
        ),
        ("Attempts", {"fields": ("attempts",)}),
    )
    readonly_fields = (
        "id",
        "saga",
        "status",
        "current_step",
        "error_summary",
        "business_key",
        "correlation_id",
        "trace_id",
        "version",
        "input",
        "created_at",
        "started_at",
        "finished_at",
        "cancel_requested_at",
        "cancelled_at",
        "compensation_reason",
        "cancelled_by",
        "cancel_reason",
        "resolved_by",
        "resolution_note",
        "attempts",
    )

    @admin.display(description="id", ordering="id")
    def short_id(self, task: TaskInstance) -> str:
        return str(task.pk)[:8]

    @admin.display(description="attempts (why did this run twice?)")
    def attempts(self, task: TaskInstance) -> SafeString:
        rows = (
            StepAttempt.objects.filter(step__task=task)
            .select_related("step")
            .order_by("step__index", "kind", "number")
        )
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td></tr>",
            (
                (
                    a.step.name,
                    a.kind,
                    a.number,
                    a.outcome,
                    a.worker,
                    a.started_at,
                    a.finished_at or "",
                    a.error,
                )
                for a in rows
            ),
        )
        return format_html(
            "<table><thead><tr><th>step</th><th>kind</th><th>#</th><th>outcome</th>"
            "<th>worker</th><th>started</th><th>finished</th><th>error</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            body or format_html('<tr><td colspan="8">{}</td></tr>', "No attempt yet."),
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[TaskInstance], search_term: str
    ) -> tuple[QuerySet[TaskInstance], bool]:
        task_id = _as_uuid(search_term)
        if task_id is not None:
            return queryset.filter(pk=task_id), False
        return super().get_search_results(request, queryset, search_term.strip())


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created_at",
        "actor_name",
        "action",
        "task",
        "step",
        "from_status",
        "to_status",
    )
    list_filter = ("action",)
    list_select_related = ("task", "step")
    show_full_result_count = False
    ordering = ("-id",)
    readonly_fields = (
        "task",
        "step",
        "actor",
        "actor_name",
        "action",
        "from_status",
        "to_status",
        "details",
        "created_at",
    )


TOKEN_DETAILS = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Create (the token is shown once, then only its hash is kept) and revoke API tokens.

    A token acts with its user's permissions, so only superusers create tokens for others.
    Tokens are revoked, never deleted: the list stays a record of who had access.
    """

    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    list_select_related = ("user",)
    search_fields = ("name", "prefix", "user__username")
    actions = ("revoke_tokens",)

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        return ("user", "name") if obj is None else TOKEN_DETAILS

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiToken | None = None
    ) -> tuple[str, ...]:
        return () if obj is None else TOKEN_DETAILS

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        tokens = super().get_queryset(request)
        return tokens if request.user.is_superuser else tokens.filter(user_id=request.user.pk)

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField | None:  # type: ignore[type-arg]
        user = request.user
        if db_field.name == "user" and not user.is_superuser and user.pk is not None:
            kwargs["queryset"] = get_user_model().objects.filter(pk=user.pk)
            kwargs["initial"] = user.pk
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The change permission is what the revoke action needs; a token itself never changes.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(
        self, request: HttpRequest, obj: ApiToken, form: ModelForm[ApiToken], change: bool
    ) -> None:
        plain = obj.generate_key() if not change else ""
        super().save_model(request, obj, form, change)
        if plain:
            messages.warning(
                request,
                f"API token for {obj.name!r}: {plain}  Copy it now: only its hash is kept, "
                "it will not be shown again.",
            )

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        revoked = [token for token in queryset if token.revoke()]
        for token in revoked:
            self.log_change(request, token, "Revoked")
        self.message_user(request, f"Revoked {len(revoked)} token(s).")
