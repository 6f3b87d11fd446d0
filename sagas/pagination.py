"""Keyset pagination over tasks, newest first: cursors on (created_at, id), no COUNT, no OFFSET."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q, QuerySet

from sagas.models import TaskInstance

NEWEST_FIRST = ("-created_at", "-id")


class InvalidCursor(ValueError):
    """The cursor was not one this API handed out."""


@dataclass(frozen=True)
class Cursor:
    """The last task of a page; the next page starts strictly after it."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps({"c": self.created_at.isoformat(), "i": str(self.id)})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            created_at = datetime.fromisoformat(raw["c"])
            cursor = cls(created_at, uuid.UUID(raw["i"]))
        except (binascii.Error, ValueError, TypeError, KeyError, AttributeError):
            raise InvalidCursor(f"invalid cursor {text[:40]!r}") from None
        if created_at.tzinfo is None:
            raise InvalidCursor(f"invalid cursor {text[:40]!r}")
        return cursor


@dataclass(frozen=True)
class Page:
    tasks: list[TaskInstance]
    next: Cursor | None


def newest_first(tasks: QuerySet[TaskInstance], after: Cursor | None, limit: int) -> Page:
    """One page of ``tasks``, newest first, starting after ``after``; one query."""
    if after is not None:
        tasks = tasks.filter(
            Q(created_at__lt=after.created_at) | Q(created_at=after.created_at, id__lt=after.id)
        )
    rows = list(tasks.order_by(*NEWEST_FIRST)[: limit + 1])
    if len(rows) <= limit:
        return Page(rows, None)
    last = rows[limit - 1]
    return Page(rows[:limit], Cursor(last.created_at, last.pk))
