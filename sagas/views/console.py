"""Dashboard, inbox, breakers and locks: load, call one function, render (healthchecks'
shape). Reads come from ``sagas.overview``; changes go through ``sagas.services``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from redis.exceptions import RedisError

from sagas import overview, services
from sagas.models import TaskInstance
from sagas.services import OPERATOR_ACTIONS
from sagas.templatetags.sagas_console import clock

VIEW = "sagas.view_taskinstance"


def _require(request: HttpRequest, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied


def _page(request: HttpRequest, template: str, title: str, **context: Any) -> HttpResponse:
    context.update(
        admin.site.each_context(request),
        title=title,
        opts=TaskInstance._meta,
        app_label="sagas",
    )
    return render(request, template, context)


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """Tasks by status, what needs attention, queues, workers and breakers."""
    _require(request, VIEW)
    template = (
        "sagas/_dashboard_panels.html"
        if getattr(request, "htmx", False)
        else "sagas/dashboard.html"
    )
    return _page(request, template, "Dashboard", **_dashboard_numbers(request))


def _dashboard_numbers(request: HttpRequest) -> dict[str, Any]:
    counts = overview.status_counts()
    may_see_findings = request.user.has_perm("sagas.view_finding")
    return {
        "findings": overview.findings_summary() if may_see_findings else None,
        "counts": counts,
        "estimated": any(not c.exact for c in counts),
        "attention": [c for c in counts if c.status in overview.ATTENTION_STATUSES],
        "stuck": overview.stuck_task_ids(overview.DASHBOARD_STUCK_SAMPLE),
        "stuck_sample": overview.DASHBOARD_STUCK_SAMPLE,
        "failures_last_hour": overview.failures_since(timezone.now() - timedelta(hours=1)),
        "queue": overview.queue_summary(),
        "workers": overview.workers(),
        "open_breakers": overview.open_breakers(),
        "bulk_operations": overview.recent_bulk_operations(),
        "refreshed_at": timezone.now(),
    }


@require_GET
def inbox(request: HttpRequest) -> HttpResponse:
    """Parked tasks grouped by saga, step and error type (failure groups)."""
    _require(request, VIEW)
    user = request.user
    return _page(
        request,
        "sagas/inbox.html",
        "Inbox",
        groups=[(group, _group_url(group)) for group in overview.inbox_groups()],
        may={slug: user.has_perm(a.permission) for slug, a in OPERATOR_ACTIONS.items()},
    )


def _group_url(group: overview.InboxGroup) -> str:
    """The task list filtered to one failure group (its tasks and its bulk actions)."""
    query = {"status__exact": group.status, "saga": group.saga, "failing_step": group.step}
    return f"{reverse('admin:sagas_taskinstance_changelist')}?{urlencode(query)}"


@require_GET
def breakers(request: HttpRequest) -> HttpResponse:
    _require(request, VIEW)
    return _page(
        request,
        "sagas/breakers.html",
        "Circuit breakers",
        breakers=overview.breakers(),
        can_reset=request.user.has_perm("sagas.reset_breaker"),
    )


@require_POST
def reset_breaker(request: HttpRequest, name: str) -> HttpResponse:
    _require(request, "sagas.reset_breaker")

    def reset() -> str:
        before = services.reset_breaker(name, request.user)
        return f"Breaker {name} reset to closed ({_was(before)})."

    return _act(request, reset, back="sagas-breakers")


def _was(before: dict[str, Any]) -> str:
    if before["open_until"]:
        until = datetime.fromtimestamp(before["open_until"], UTC)
        return f"it was open until {clock(until)}"
    return f"it had counted {before['failures']} failures in a row"


@require_GET
def locks(request: HttpRequest) -> HttpResponse:
    _require(request, VIEW)
    return _page(
        request,
        "sagas/locks.html",
        "Task locks",
        locks=overview.locks(),
        can_release=request.user.has_perm("sagas.release_lock"),
        sample=overview.LOCK_SAMPLE,
    )


@require_POST
def release_lock(request: HttpRequest) -> HttpResponse:
    _require(request, "sagas.release_lock")
    lock_key, token = request.POST.get("key", ""), request.POST.get("token", "")

    def release() -> str:
        services.release_lock(lock_key, token, request.user)
        return f"Released {lock_key}: its holder was gone."

    return _act(request, release, back="sagas-locks")


def _act(request: HttpRequest, act: Callable[[], str], back: str) -> HttpResponse:
    """Run an operator's change; the message says what it did or why nothing changed."""
    try:
        done = act()
    except (services.NothingToDo, services.InvalidInput) as nothing:
        messages.warning(request, f"Nothing changed: {_text(nothing)}.")
    except RedisError:
        messages.error(request, "Nothing changed: Redis is unreachable; try again.")
    else:
        messages.success(request, done)
    return HttpResponseRedirect(reverse(back))


def _text(error: Exception) -> str:
    return "; ".join(error.messages) if isinstance(error, services.InvalidInput) else str(error)
