"""The operator console on the Django admin: tasks (list, page, actions) and the audit
trail. Every change goes through ``sagas.services``, checked against a model permission."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial
from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import ForeignKey, OuterRef, QuerySet, Subquery
from django.forms import ModelChoiceField, ModelForm
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from sagas import overview, services, task_page
from sagas.admin_common import (
    CappedPaginator,
    ReadOnlyMixin,
    SagaFilter,
    details_summary,
    task_link,
)
from sagas.models import ApiToken, AuditEntry, StepRecord, TaskInstance
from sagas.states import ACTIVE_TASK_STATUSES, AuditAction, StepStatus
from sagas.templatetags.sagas_console import clock
from sagas.views import bulk as bulk_actions
from sagas.views import operator_actions

HTMX_STOP_POLLING = 286

admin.site.site_header = "Saga operations console"
admin.site.site_title = "Saga operations"
admin.site.index_title = "Operations"


class AttentionFilter(admin.SimpleListFilter):
    """Tasks that wait for an operator, or that are stuck (the design's one definition)."""

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("parked", "Parked (compensation failed, dead-lettered)"), ("stuck", "Stuck")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "parked":
            return queryset.filter(status__in=overview.ATTENTION_STATUSES)
        if self.value() == "stuck":
            return queryset.filter(pk__in=overview.stuck_task_ids())
        return queryset


class FailingStepFilter(admin.SimpleListFilter):
    """The inbox's group link: parked tasks whose named step (or its undo) failed."""

    title = "failing step"
    parameter_name = "failing_step"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(value, value)] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not self.value():
            return queryset
        failed = (StepStatus.FAILED, StepStatus.COMPENSATION_FAILED)
        return queryset.filter(
            pk__in=StepRecord.objects.filter(name=self.value(), status__in=failed).values("task")
        )


class CreatedFilter(admin.SimpleListFilter):
    """Created within a recent window (an index range on ``created_at``)."""

    title = "created"
    parameter_name = "created"
    WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("1h", "Last hour"), ("24h", "Last 24 hours"), ("7d", "Last 7 days")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        window = self.WINDOWS.get(self.value() or "")
        return queryset.filter(created_at__gte=timezone.now() - window) if window else queryset


RUNNING_PROGRESS = Subquery(
    StepRecord.objects.filter(task=OuterRef("pk"), status=StepStatus.RUNNING, is_group=False)
    .order_by("index")
    .values("progress")[:1]
)


@admin.register(TaskInstance)
class TaskInstanceAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "short_id",
        "saga",
        "live_status",
        "business_key",
        "correlation_id",
        "created",
        "finished",
    )
    list_display_links = ("short_id",)
    list_filter = ("status", SagaFilter, AttentionFilter, CreatedFilter, FailingStepFilter)
    # Exact matches only, so each search is an index lookup even on millions of tasks.
    search_fields = ("business_key__exact", "correlation_id__exact", "trace_id__exact")
    search_help_text = "Exact task id, business key, correlation id or trace id."
    show_full_result_count = False
    paginator = CappedPaginator
    list_per_page = 50
    ordering = ("-created_at", "-id")
    # Bulk cancel, resolve and redrive, each shown only to users with its permission.
    actions = bulk_actions.ACTIONS

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return bulk_actions.may_act(request.user, "cancel")

    def has_resolve_permission(self, request: HttpRequest) -> bool:
        return bulk_actions.may_act(request.user, "resolve")

    def has_redrive_permission(self, request: HttpRequest) -> bool:
        return bulk_actions.may_act(request.user, "redrive")

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "POST" and not self.get_actions(request):
            raise PermissionDenied  # a POST here is an action, and this user has none
        return super().changelist_view(request, extra_context)

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskInstance]:
        tasks: QuerySet[TaskInstance] = super().get_queryset(request)
        return tasks.annotate(running_progress=RUNNING_PROGRESS)

    @admin.display(description="id", ordering="id")
    def short_id(self, task: TaskInstance) -> str:
        return str(task.pk)[:8]

    @admin.display(description="status · current step", ordering="status")
    def live_status(self, task: TaskInstance) -> str:
        """Status, current step and progress; re-fetched every 2 s while the task is active."""
        progress = getattr(task, "running_progress", None)
        return render_to_string("sagas/_task_progress.html", _progress_context(task, progress))

    @admin.display(description="created", ordering="created_at")
    def created(self, task: TaskInstance) -> str:
        return clock(task.created_at)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, task: TaskInstance) -> str:
        return clock(task.finished_at)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[TaskInstance], search_term: str
    ) -> tuple[QuerySet[TaskInstance], bool]:
        task_id = _as_uuid(search_term)
        if task_id is not None:
            return queryset.filter(pk=task_id), False
        return super().get_search_results(request, queryset, search_term.strip())

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        task_views = [
            path("<path:object_id>/progress/", wrap(self.progress_view), name="sagas_task_progress")
        ]
        for slug in services.OPERATOR_ACTIONS:
            view = partial(self.action_view, slug=slug)
            name = _action_url_name(slug)
            task_views.append(path(f"<path:object_id>/{slug}/", wrap(view), name=name))
        return task_views + super().get_urls()

    # --- the task page ----------------------------------------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """Read-only: header, what happens next, timeline, attempts and audit trail; the
        live part is re-fetched by htmx until the task is finished."""
        if request.method not in ("GET", "HEAD"):
            raise PermissionDenied  # nothing on a task is edited; actions have their own URLs
        page = self._page_or_404(request, object_id)
        if getattr(request, "htmx", False):
            response = render(request, "sagas/_task_live.html", self._context(request, page))
            return _stop_polling_when_finished(response, page)
        return render(request, "sagas/task_detail.html", self._context(request, page))

    def progress_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The task list's live cell for one task."""
        page = self._page_or_404(request, object_id)
        context = _progress_context(page.task, page.progress)
        response = render(request, "sagas/_task_progress.html", context)
        return _stop_polling_when_finished(response, page)

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """A task's history is its audit trail, not Django's (empty) change log."""
        self._page_or_404(request, object_id)
        url = reverse("admin:sagas_auditentry_changelist")
        return HttpResponseRedirect(f"{url}?task__id__exact={object_id}")

    def _page_or_404(self, request: HttpRequest, object_id: str) -> task_page.TaskPage:
        if not self.has_view_permission(request):
            raise PermissionDenied
        task_id = _as_uuid(object_id)
        page = task_page.build(task_id) if task_id else None
        if page is None:
            raise Http404(f"No task {object_id}")
        return page

    def _context(self, request: HttpRequest, page: task_page.TaskPage) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{page.task.saga} {page.task.pk}",
            "page": page,
            "task": page.task,
            "actions_available": [
                (action, reverse(f"admin:{_action_url_name(action.slug)}", args=[page.task.pk]))
                for action in services.available_actions(page.task, request.user)
            ],
            "can_cancel": request.user.has_perm("sagas.cancel_taskinstance"),
        }

    # --- operator actions ---------------------------------------------------------------

    def action_view(self, request: HttpRequest, object_id: str, slug: str) -> HttpResponse:
        """Cancel, resolve, retry compensation or redrive: decided under the task's row lock
        at click time; the admin message says what happened or why nothing did."""
        action = services.OPERATOR_ACTIONS[slug]
        if not request.user.has_perm(action.permission):
            raise PermissionDenied
        page = self._page_or_404(request, object_id)
        if slug == "cancel" and request.method == "GET":
            context = self._context(request, page) | {
                "title": f"Cancel {page.task.saga} task?",
                "cancellable": action in services.available_actions(page.task, request.user),
            }
            return render(request, "sagas/task_cancel_confirm.html", context)
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        level, message = operator_actions.perform(slug, page.task, request.user, request.POST)
        messages.add_message(request, level, message)
        return HttpResponseRedirect(reverse("admin:sagas_taskinstance_change", args=[page.task.pk]))


def _action_url_name(slug: str) -> str:
    return f"sagas_task_{slug.replace('-', '_')}"


def _progress_context(task: TaskInstance, progress: int | None) -> dict[str, Any]:
    return {"task": task, "progress": progress, "active": task.status in ACTIVE_TASK_STATUSES}


def _stop_polling_when_finished(response: HttpResponse, page: task_page.TaskPage) -> HttpResponse:
    """htmx stops polling on status 286: a finished task does not change any more."""
    if not page.active:
        response.status_code = HTMX_STOP_POLLING
    return response


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


class ActionFilter(admin.SimpleListFilter):
    """Audit actions come from the code: no DISTINCT over millions of audit entries."""

    title = "action"
    parameter_name = "action"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(a.value, a.value) for a in AuditAction]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(action=self.value()) if self.value() else queryset


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """The whole audit trail, newest first; a task's page shows its latest entries."""

    list_display = ("when", "actor_name", "action", "task_link", "step_name", "change", "summary")
    list_filter = (ActionFilter,)
    list_select_related = ("task", "step")
    show_full_result_count = False
    paginator = CappedPaginator
    ordering = ("-id",)
    fields = readonly_fields = (
        "when",
        "actor_name",
        "action",
        "task_link",
        "step_name",
        "change",
        "pretty_details",
    )

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # A task's "History" link filters the trail by task id.
        return lookup == "task__id__exact" or super().lookup_allowed(lookup, value, request)

    @admin.display(description="when", ordering="created_at")
    def when(self, entry: AuditEntry) -> str:
        return clock(entry.created_at)

    @admin.display(description="task")
    def task_link(self, entry: AuditEntry) -> SafeString | str:
        return task_link(entry.task_id)

    @admin.display(description="step")
    def step_name(self, entry: AuditEntry) -> str:
        return entry.step.name if entry.step else ""

    @admin.display(description="status change")
    def change(self, entry: AuditEntry) -> str:
        if not (entry.from_status or entry.to_status):
            return ""
        return f"{entry.from_status or '-'} → {entry.to_status or '-'}"

    @admin.display(description="details")
    def summary(self, entry: AuditEntry) -> str:
        return details_summary(entry.details)

    @admin.display(description="details")
    def pretty_details(self, entry: AuditEntry) -> SafeString:
        return render_to_string("sagas/_audit_details.html", {"details": entry.details})


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


# The reconciliation runs and findings (their own module, registered with the rest).
from sagas import admin_reconciliation  # noqa: E402, F401
