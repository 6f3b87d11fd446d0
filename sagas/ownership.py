"""Which S3 keys steps own: written with a step's data, released when it is compensated.

A step owns the objects its ``data`` names (a ``"Key"`` string or a ``"Keys"`` list).
The engine keeps ``OwnedKey`` in step with that, in the transaction that writes the step,
so reconciliation can ask an index whether a key is owned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sagas.models import OwnedKey, StepRecord

MAX_KEY_LENGTH = 1024


def keys_in(data: Any) -> list[str]:
    """The S3 keys a step's data names, in order, without duplicates or blanks."""
    if not isinstance(data, dict):
        return []
    found: list[Any] = [data.get("Key")]
    listed = data.get("Keys")
    if isinstance(listed, list | tuple):
        found += list(listed)
    keys = [k for k in found if isinstance(k, str) and 0 < len(k) <= MAX_KEY_LENGTH]
    return list(dict.fromkeys(keys))


def record(step: StepRecord, saga: str, data: Any) -> None:
    """Make the step own exactly the keys its new data names."""
    keys = keys_in(data)
    OwnedKey.objects.filter(step=step).exclude(key__in=keys).delete()
    OwnedKey.objects.bulk_create(
        [OwnedKey(step=step, saga=saga, key=k) for k in keys], ignore_conflicts=True
    )


def release(step: StepRecord) -> None:
    """The step was compensated: it owns nothing any more."""
    OwnedKey.objects.filter(step=step).delete()


def owned(keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` (one page of them) some step owns: one indexed query."""
    return set(OwnedKey.objects.filter(key__in=list(keys)).values_list("key", flat=True))
