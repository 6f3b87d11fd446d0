"""Reconciliation in the console: the runs (and "start a run now") and the findings, with
the operator's actions on them (delete, archive, ignore, reopen, re-enqueue, release).

Both lists are read-only: a finding changes only through an action, checked again when it
runs and audited (``sagas.finding_actions``, in the background through ``sagas.bulk``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from sagas import finding_actions, services
from sagas.admin_common import (
    CappedPaginator,
    ReadOnlyMixin,
    SagaFilter,
    details_summary,
    task_link,
)
from sagas.models import Finding, FindingKind, ReconciliationRun
from sagas.templatetags.sagas_console import clock
from sagas.views import bulk as bulk_actions


def _finding_action(slug: str) -> Any:
    """The admin action for one ``finding_actions`` entry: confirmation, then a bulk job."""
    spec = finding_actions.FINDING_ACTIONS[slug]

    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Finding]) -> HttpResponse:
        return bulk_actions.confirm_or_start(modeladmin, request, queryset, slug)

    action.__name__ = slug
    return admin.action(description=f"{spec.label} selected findings…", permissions=[slug])(action)


def _may(slug: str) -> Any:
    def has_permission(self: Any, request: HttpRequest) -> bool:
        return bulk_actions.may_act(request.user, slug)

    return has_permission


def _redirect_to_list(opts: Any, query: str) -> HttpResponseRedirect:
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return HttpResponseRedirect(f"{url}?{query}")


@admin.register(Finding)
class FindingAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every finding, newest seen first; filters from the code (no DISTINCT over the table)."""

    list_display = (
        "kind_name",
        "saga",
        "key_text",
        "task_link",
        "state_badge",
        "summary",
        "seen",
        "acted",
    )
    list_display_links = None  # no change form: a finding changes only through an action
    list_filter = ("state", "kind", SagaFilter)
    list_select_related = ("run",)
    search_fields = ("key__startswith",)
    search_help_text = "The start of an S3 key or lock key, or an exact task id."
    show_full_result_count = False
    paginator = CappedPaginator
    list_per_page = 50  # as the task list: rendering rows is most of the page's time
    ordering = ("-last_seen", "-id")
    actions = [_finding_action(slug) for slug in finding_actions.FINDING_ACTIONS]

    # Django asks ``has_<name>_permission`` for each action's permission.
    has_delete_object_permission = _may("delete_object")
    has_archive_object_permission = _may("archive_object")
    has_ignore_finding_permission = _may("ignore_finding")
    has_reopen_finding_permission = _may("reopen_finding")
    has_requeue_task_permission = _may("requeue_task")
    has_release_lock_permission = _may("release_lock")

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "POST" and not self.get_actions(request):
            raise PermissionDenied  # a POST here is an action, and this user has none
        extra = {
            "can_start_run": request.user.has_perm(finding_actions.ACT_ON_FINDING),
            "title": "Reconciliation findings",
        }
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """No change form: the list, narrowed to this finding, says all there is."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        pk = object_id if object_id.isdigit() else "0"
        return _redirect_to_list(self.opts, f"id__exact={pk}")

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # A run's findings, a task's findings, one finding.
        allowed = ("run__id__exact", "task__id__exact", "id__exact")
        return lookup in allowed or super().lookup_allowed(lookup, value, request)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Finding], search_term: str
    ) -> tuple[QuerySet[Finding], bool]:
        try:
            return queryset.filter(task_id=uuid.UUID(search_term.strip())), False
        except ValueError:
            return super().get_search_results(request, queryset, search_term.strip())

    @admin.display(description="kind", ordering="kind")
    def kind_name(self, finding: Finding) -> str:
        return finding.kind

    @admin.display(description="key", ordering="key")
    def key_text(self, finding: Finding) -> SafeString:
        return format_html('<span class="mono sagas-key">{}</span>', finding.key)

    @admin.display(description="task")
    def task_link(self, finding: Finding) -> SafeString | str:
        return task_link(finding.task_id)

    @admin.display(description="state", ordering="state")
    def state_badge(self, finding: Finding) -> SafeString:
        return format_html(
            '<span class="sagas-status sagas-status-{}">{}</span>', finding.state, finding.state
        )

    @admin.display(description="details")
    def summary(self, finding: Finding) -> str:
        return finding_summary(finding)

    @admin.display(description="seen", ordering="last_seen")
    def seen(self, finding: Finding) -> SafeString:
        """First and last seen, and the run that saw it last (its findings)."""
        url = reverse("admin:sagas_finding_changelist")
        return format_html(
            '{} to {} <a href="{}?run__id__exact={}">run #{}</a>',
            clock(finding.first_seen),
            clock(finding.last_seen),
            url,
            finding.run_id,
            finding.run_id,
        )

    @admin.display(description="acted")
    def acted(self, finding: Finding) -> str:
        if not finding.acted_at:
            return ""
        return f"{finding.acted_by_name or 'system'} · {clock(finding.acted_at)}"


def finding_summary(finding: Finding) -> str:
    """What an operator needs to judge a finding, in a few words per kind."""
    details = finding.details if isinstance(finding.details, dict) else {}
    kind = finding.kind
    if kind in (FindingKind.ORPHAN_OBJECT, FindingKind.RECENT_ORPHAN):
        modified = details.get("last_modified", "")[:19].replace("T", " ")
        return f"{details.get('size', '?')} bytes, modified {modified} UTC"
    if kind == FindingKind.MISSING_OBJECT:
        return f"owned by step {details.get('step', '?')}, absent from S3"
    if kind == FindingKind.STUCK_TASK:
        changed = details.get("updated_at", "")[:19].replace("T", " ")
        return f"{details.get('status', '?')}, unchanged since {changed} UTC"
    if kind == FindingKind.STALE_LOCK:
        return str(details.get("reason") or "its holder is gone")
    return details_summary(details)


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every run, newest first, with its counts; "start a run now" for operators."""

    list_display = (
        "run_id",
        "scope",
        "trigger_name",
        "actor",
        "applied",
        "status_badge",
        "started",
        "took",
        "counted",
        "error_line",
    )
    list_display_links = None
    list_filter = ("status", "trigger", "applied")
    list_select_related = ("actor",)
    show_full_result_count = False
    paginator = CappedPaginator
    ordering = ("-started_at", "-id")

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        return lookup == "id__exact" or super().lookup_allowed(lookup, value, request)

    def get_urls(self) -> list[URLPattern]:
        start = self.admin_site.admin_view(require_POST(self.start_view))
        return [path("start/", start, name="sagas_reconciliation_start"), *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {
            "can_start_run": request.user.has_perm(finding_actions.ACT_ON_FINDING),
            "title": "Reconciliation runs",
        }
        return super().changelist_view(request, {**extra, **(extra_context or {})})

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """A run's page is its findings."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        pk = object_id if object_id.isdigit() else "0"
        return _redirect_to_list(Finding._meta, f"run__id__exact={pk}")

    def start_view(self, request: HttpRequest) -> HttpResponse:
        """Start a run now (every saga with a prefix), as a job; with "apply", each saga's
        orphan policy is applied as a scheduled run would."""
        if not request.user.has_perm(finding_actions.ACT_ON_FINDING):
            raise PermissionDenied
        apply_policies = request.POST.get("apply") == "on"
        try:
            finding_actions.start_run(request.user, apply_policies=apply_policies)
        except services.NothingToDo as nothing:
            messages.warning(request, f"No run started: {nothing}.")
        else:
            what = "applying each saga's policy" if apply_policies else "a dry run"
            messages.success(
                request, f"A reconciliation run ({what}) is queued; it appears here when it starts."
            )
        return HttpResponseRedirect(reverse("admin:sagas_reconciliationrun_changelist"))

    @admin.display(description="run", ordering="id")
    def run_id(self, run: ReconciliationRun) -> SafeString:
        url = reverse("admin:sagas_finding_changelist")
        return format_html('<a href="{}?run__id__exact={}">#{}</a>', url, run.pk, run.pk)

    @admin.display(description="trigger", ordering="trigger")
    def trigger_name(self, run: ReconciliationRun) -> str:
        return run.trigger

    @admin.display(description="saga")
    def scope(self, run: ReconciliationRun) -> str:
        return run.saga or "all sagas"

    @admin.display(description="status", ordering="status")
    def status_badge(self, run: ReconciliationRun) -> SafeString:
        return format_html(
            '<span class="sagas-status sagas-status-run-{}">{}</span>', run.status, run.status
        )

    @admin.display(description="started", ordering="started_at")
    def started(self, run: ReconciliationRun) -> str:
        return clock(run.started_at)

    @admin.display(description="took")
    def took(self, run: ReconciliationRun) -> str:
        if run.finished_at is None:
            return "running" if run.status == "running" else "-"
        seconds = (run.finished_at - run.started_at).total_seconds()
        return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    @admin.display(description="counts")
    def counted(self, run: ReconciliationRun) -> str:
        counts = run.counts if isinstance(run.counts, dict) else {}
        return ", ".join(f"{name} {value:,}" for name, value in counts.items() if value) or "-"

    @admin.display(description="error")
    def error_line(self, run: ReconciliationRun) -> SafeString | str:
        if not run.error:
            return ""
        return format_html('<span class="sagas-error">{}</span>', run.error[:200])
