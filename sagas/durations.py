"""Durations as operators write them: ``90s``, ``15m``, ``48h``, ``7d``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def parse_duration(text: str) -> timedelta:
    """Parse ``<integer><s|m|h|d>``; raise ``ValueError`` with the accepted forms otherwise."""
    match = _PATTERN.match(text or "")
    if not match:
        raise ValueError(f"invalid duration {text!r}: write it like 90s, 15m, 48h or 7d")
    amount, unit = match.groups()
    return timedelta(**{_UNITS[unit]: int(amount)})
