"""Times and durations as an operator reads them: to the second, local time, no ISO noise."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def clock(moment: datetime | None) -> str:
    """``14:03:07`` today, ``2026-11-30 14:03:07`` on another day (local time)."""
    if not isinstance(moment, datetime):
        return "-"
    local = timezone.localtime(moment)
    if local.date() == timezone.localdate():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


@register.filter
def seconds(value: float | timedelta | None) -> str:
    """A duration: ``850 ms``, ``12.4 s``, ``3 min 05 s``, ``2 h 04 min``."""
    if value is None:
        return "-"
    total = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if total < 1:
        return f"{total * 1000:.0f} ms"
    if total < 60:
        return f"{total:.1f} s"
    minutes, secs = divmod(int(total), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@register.filter
def ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return f"{seconds(timezone.now() - moment)} ago"


@register.filter
def took(attempt: object) -> str:
    """How long an attempt ran (so far, while running)."""
    started = getattr(attempt, "started_at", None)
    if started is None:
        return "-"
    finished = getattr(attempt, "finished_at", None) or timezone.now()
    return seconds(finished - started)


@register.filter
def detail_items(details: object) -> list[tuple[str, str, bool]]:
    """An audit entry's details as (key, text, long) rows; JSON values pretty-printed, stack
    traces and other multi-line text shown as blocks (escaped by the template)."""
    if not isinstance(details, dict):
        return [("value", json.dumps(details, indent=2, default=str), True)]
    rows = []
    for key, value in details.items():
        text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
        rows.append((str(key), text, "\n" in text or len(text) > 200))
    return rows


@register.filter
def tens(percent: int | None) -> int:
    """A percentage rounded to tens, for the progress bar's width class."""
    return max(0, min(100, round((percent or 0) / 10) * 10))
