"""Pieces every console changelist shares: read-only models, a capped count, the saga filter."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from sagas.definitions import registry


class ReadOnlyMixin:
    """Nothing here is edited by hand: changes go through the services and are audited."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CappedPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``COUNT_CAP`` + 1 rows: an exact total over millions of tasks costs a
    scan for a number nobody reads; the page says "10,000+" instead."""

    COUNT_CAP = 10_000

    @cached_property
    def count(self) -> int:
        rows: Any = self.object_list
        # Only the keys: annotations (the running step's progress) are not needed to count.
        return int(rows.order_by().values("pk")[: self.COUNT_CAP + 1].count())

    @property
    def capped(self) -> bool:
        return self.count > self.COUNT_CAP


class SagaFilter(admin.SimpleListFilter):
    """Saga names come from the registry: no DISTINCT over the whole task table."""

    title = "saga"
    parameter_name = "saga"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in registry.names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(saga=self.value()) if self.value() else queryset


def details_summary(details: Any, limit: int = 160) -> str:
    """One line of an entry's details for lists (stack traces are on the entry's page)."""
    if not isinstance(details, dict):
        return str(details)[:limit]
    parts = [f"{k}: {v}" for k, v in details.items() if k != "stack_trace" and v not in ("", None)]
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def task_link(task_id: Any) -> SafeString | str:
    """A task's short id, linked to its page ("-" for none)."""
    if task_id is None:
        return "-"
    url = reverse("admin:sagas_taskinstance_change", args=[task_id])
    return format_html('<a href="{}" class="mono">{}</a>', url, str(task_id)[:8])
