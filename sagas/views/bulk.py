"""Bulk cancel, resolve and redrive from the task list, and the page that follows them.

The actions follow Django's ``delete_selected``: the same view renders the confirmation
page (how many tasks, by status, how many will likely be skipped, the note) and, on
``post=yes``, freezes the task ids and starts the operation (``sagas.bulk``), which runs in
the background; the operator is sent to its progress page, polled by htmx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from sagas import bulk, services
from sagas.definitions import registry
from sagas.models import BulkOperation, TaskInstance

HTMX_STOP_POLLING = 286
VIEW = "sagas.view_taskinstance"


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
    """The ``has_<slug>_permission`` of the task admin (Django's action permissions)."""
    return bool(user.has_perm(services.OPERATOR_ACTIONS[slug].permission))


def confirm_or_start(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskInstance], slug: str
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
            messages.success(
                request, f"Started: {slug} of {operation.total:,} tasks, in the background."
            )
            return HttpResponseRedirect(reverse("sagas-bulk-progress", args=[operation.pk]))
    return _confirmation(modeladmin, request, queryset, slug)


@dataclass(frozen=True)
class StatusRow:
    status: str
    count: int
    likely_skipped: int


def _confirmation(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[TaskInstance], slug: str
) -> HttpResponse:
    # values("pk"): the task list's annotations need not be computed to be counted.
    count = queryset.values("pk").order_by()[: bulk.MAX_TASKS + 1].count()
    too_many = count > bulk.MAX_TASKS
    rows = [] if too_many else _by_status(queryset, slug)
    if too_many:
        messages.error(
            request,
            f"More than {bulk.MAX_TASKS:,} tasks are selected: narrow the filter and try again.",
        )
    action = services.OPERATOR_ACTIONS[slug]
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"{action.label} {count:,} tasks?" if not too_many else "Too many tasks",
        "opts": modeladmin.opts,
        "action": action,
        "action_name": f"{slug}_tasks",
        "count": count,
        "too_many": too_many,
        "max_tasks": f"{bulk.MAX_TASKS:,}",
        "rows": rows,
        "likely_skipped": sum(r.likely_skipped for r in rows),
        "select_across": request.POST.get("select_across", "0"),
        "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "note": request.POST.get("note", ""),
        "back_url": request.get_full_path(),
    }
    return render(request, "sagas/bulk_confirm.html", context)


def _by_status(queryset: QuerySet[TaskInstance], slug: str) -> list[StatusRow]:
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
    return [StatusRow(status, n, skip) for status, (n, skip) in sorted(counted.items())]


def _applies(action: services.OperatorAction, status: str, saga: str) -> bool:
    if status not in action.allowed:
        return False
    if action.slug == "cancel" and saga in registry:
        return registry.get(saga).cancellable
    return True


# --- the progress page ------------------------------------------------------------------------


@require_GET
def progress(request: HttpRequest, pk: int) -> HttpResponse:
    """What a bulk operation has done so far; re-fetched every second until it ends. A
    stalled operation (its job lost) is re-enqueued from here."""
    if not request.user.has_perm(VIEW):
        raise PermissionDenied
    operation = get_object_or_404(BulkOperation.objects.defer("task_ids"), pk=pk)
    if not (operation.actor_id == request.user.pk or may_act(request.user, operation.action)):
        raise PermissionDenied
    if not operation.finished and bulk.rescue_stalled(operation.pk):
        operation.refresh_from_db()
    context = {
        **admin.site.each_context(request),
        "title": f"Bulk {operation.action} #{operation.pk}",
        "opts": TaskInstance._meta,
        "operation": operation,
    }
    if not getattr(request, "htmx", False):
        return render(request, "sagas/bulk_progress.html", context)
    response = render(request, "sagas/_bulk_progress.html", context)
    if operation.finished:
        response.status_code = HTMX_STOP_POLLING
    return response
