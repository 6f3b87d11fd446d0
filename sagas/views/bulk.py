"""Bulk actions from the task and findings lists, and the page that follows them.

The actions follow Django's ``delete_selected``: the same view renders the confirmation
page (how many, by status or by kind and state, how many will likely be skipped, the note)
and, on ``post=yes``, freezes the ids and starts the operation (``sagas.bulk``), which
runs in the background; the operator is sent to its progress page, polled by htmx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.views.decorators.http import require_GET

from sagas import bulk, finding_actions, services
from sagas.definitions import registry
from sagas.models import BulkOperation, Finding, TaskInstance

HTMX_STOP_POLLING = 286


# --- the admin actions ------------------------------------------------------------------------


@admin.action(description="Cancel selected tasks…", permissions=["cancel"])
def cancel_tasks(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskInstance]
) -> HttpResponse:
    return confirm_or_start(modeladmin, request, queryset, "cancel")


@admin.action(description="Resolve selected tasks…", permissions=["resolve"])
def resolve_tasks(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskInstance]
) -> HttpResponse:
    return confirm_or_start(modeladmin, request, queryset, "resolve")


@admin.action(description="Redrive selected tasks…", permissions=["redrive"])
def redrive_tasks(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskInstance]
) -> HttpResponse:
    return confirm_or_start(modeladmin, request, queryset, "redrive")


ACTIONS = (cancel_tasks, resolve_tasks, redrive_tasks)


def may_act(user: Any, slug: str) -> bool:
    """The ``has_<slug>_permission`` of the task and findings admins (Django's action
    permissions)."""
    spec = bulk.specs().get(slug)
    return spec is not None and bool(user.has_perm(spec.permission))


@dataclass(frozen=True)
class PreviewRow:
    """One line of the confirmation's breakdown: a status (tasks) or a kind and state
    (findings), how many are selected, how many the action will likely skip."""

    label: str
    css: str
    count: int
    likely_skipped: int


@dataclass(frozen=True)
class Preview:
    rows: list[PreviewRow]
    skip_reason: str  # why the likely skipped ones are (each is decided again when it runs)
    none_skipped: str  # what every selected one is, when none will be skipped


def confirm_or_start(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[Any], slug: str
) -> HttpResponse:
    """The confirmation page, or (confirmed) the frozen ids handed to ``start_bulk``."""
    if not may_act(request.user, slug):
        raise PermissionDenied  # the admin hides the action; a forged POST ends here too
    if request.POST.get("post") == "yes":
        ids = list(queryset.values_list("pk", flat=True)[: bulk.MAX_TASKS + 1])
        try:
            operation = bulk.start_bulk(slug, ids, request.user, request.POST.get("note", ""))
        except services.InvalidInput as refused:
            messages.error(request, f"Nothing changed: {refused.messages[0]}.")
        else:
            spec, total = bulk.spec_of(slug), operation.total
            messages.success(
                request,
                f"Started: {spec.label.lower()} {total:,} {spec.target}{pluralize(total)}, "
                "in the background.",
            )
            return HttpResponseRedirect(reverse("sagas-bulk-progress", args=[operation.pk]))
    return _confirmation(modeladmin, request, queryset, slug)


def _confirmation(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[Any], slug: str
) -> HttpResponse:
    spec = bulk.spec_of(slug)
    # values("pk"): the list's annotations need not be computed to be counted.
    count = queryset.values("pk").order_by()[: bulk.MAX_TASKS + 1].count()
    too_many = count > bulk.MAX_TASKS
    preview = None if too_many else PREVIEWS[spec.target](queryset, slug)
    if too_many:
        messages.error(
            request,
            f"More than {bulk.MAX_TASKS:,} {spec.target}s are selected: narrow the filter "
            "and try again.",
        )
    rows = preview.rows if preview else []
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"{spec.label} {count:,} {spec.target}s?" if not too_many else "Too many",
        "opts": modeladmin.opts,
        "action": spec,
        "noun": spec.target,
        "changelist_url": reverse(
            f"admin:{modeladmin.opts.app_label}_{modeladmin.opts.model_name}_changelist"
        ),
        "action_name": ACTION_NAMES.get(slug, slug),
        "count": count,
        "too_many": too_many,
        "max_tasks": f"{bulk.MAX_TASKS:,}",
        "rows": rows,
        "preview": preview,
        "likely_skipped": sum(r.likely_skipped for r in rows),
        "select_across": request.POST.get("select_across", "0"),
        "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "note": request.POST.get("note", ""),
        "back_url": request.get_full_path(),
    }
    return render(request, "sagas/bulk_confirm.html", context)


def _task_preview(queryset: QuerySet[TaskInstance], slug: str) -> Preview:
    """Tasks by status, and how many the action will likely skip (decided again, task by
    task, under the row lock when it runs)."""
    action = services.OPERATOR_ACTIONS[slug]
    counted: dict[str, list[int]] = {}
    groups = (
        TaskInstance.objects.filter(pk__in=queryset.values("pk"))
        .values("status", "saga")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for group in groups:
        row = counted.setdefault(group["status"], [0, 0])
        row[0] += group["n"]
        if not _applies(action, group["status"], group["saga"]):
            row[1] += group["n"]
    allowed = ", ".join(action.allowed)
    cancellable = " of cancellable sagas" if slug == "cancel" else ""
    return Preview(
        [PreviewRow(status, status, n, skip) for status, (n, skip) in sorted(counted.items())],
        f"{action.label.lower()} applies only to {allowed} tasks{cancellable}",
        f"Every selected task is {' or '.join(action.allowed)} now.",
    )


def _applies(action: services.OperatorAction, status: str, saga: str) -> bool:
    if status not in action.allowed:
        return False
    if action.slug == "cancel" and saga in registry:
        return registry.get(saga).cancellable
    return True


def _finding_preview(queryset: QuerySet[Finding], slug: str) -> Preview:
    """Findings by kind and state; those the action does not apply to will be skipped."""
    action = finding_actions.FINDING_ACTIONS[slug]
    groups = (
        Finding.objects.filter(pk__in=queryset.values("pk"))
        .values("kind", "state")
        .annotate(n=Count("pk"))
        .order_by("kind", "state")
    )
    rows = [
        PreviewRow(
            f"{g['kind']} · {g['state']}",
            g["state"],
            g["n"],
            0 if action.applies(g["kind"], g["state"]) else g["n"],
        )
        for g in groups
    ]
    kinds, states = ", ".join(action.kinds), " or ".join(action.states)
    return Preview(
        rows,
        f"it applies only to {states} findings of kind {kinds}",
        f"Every selected finding is {states} and of kind {kinds} now.",
    )


PREVIEWS: dict[str, Callable[[QuerySet[Any], str], Preview]] = {
    bulk.TASK: _task_preview,
    bulk.FINDING: _finding_preview,
}
# The admin action's name for each bulk action (the form posts it back).
ACTION_NAMES = {"cancel": "cancel_tasks", "resolve": "resolve_tasks", "redrive": "redrive_tasks"}


# --- the progress page ------------------------------------------------------------------------


TARGET_MODELS: dict[str, type[Any]] = {bulk.TASK: TaskInstance, bulk.FINDING: Finding}


@require_GET
def progress(request: HttpRequest, pk: int) -> HttpResponse:
    """What a bulk operation has done so far; re-fetched every second until it ends. A
    stalled operation (its job lost) is re-enqueued from here."""
    operation = get_object_or_404(BulkOperation.objects.defer("target_ids"), pk=pk)
    spec = bulk.specs().get(operation.action)
    opts = TARGET_MODELS[spec.target if spec else bulk.TASK]._meta
    if not request.user.has_perm(f"{opts.app_label}.view_{opts.model_name}"):
        raise PermissionDenied
    if not (operation.actor_id == request.user.pk or may_act(request.user, operation.action)):
        raise PermissionDenied
    if not operation.finished and bulk.rescue_stalled(operation.pk):
        operation.refresh_from_db()
    context = {
        **admin.site.each_context(request),
        "title": f"Bulk {operation.action.replace('_', ' ')} #{operation.pk}",
        "opts": opts,
        "noun": spec.target if spec else bulk.TASK,
        "changelist_url": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
        "operation": operation,
    }
    if not getattr(request, "htmx", False):
        return render(request, "sagas/bulk_progress.html", context)
    response = render(request, "sagas/_bulk_progress.html", context)
    if operation.finished:
        response.status_code = HTMX_STOP_POLLING
    return response
