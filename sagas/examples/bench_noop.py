"""``bench-noop``: three steps that do nothing, and ``noop``, a bare RQ job that does nothing.

``manage.py bench engine`` runs both on the same workers to measure what the engine costs
per step beyond RQ's own work (docs/BENCHMARKS.md). The bench adds this module to the
workers' ``SAGA_MODULES``; a deploy does not need it.
"""

from __future__ import annotations

from typing import Any

from sagas.definitions import Saga

NAME = "bench-noop"
STEPS = ("first", "second", "third")
# The bare job, by dotted path (as RQ imports it in the worker).
NOOP_JOB = f"{__name__}.noop"

bench_noop = Saga(NAME, description="Three no-op steps (manage.py bench engine).")


@bench_noop.step
def first(ctx: Any) -> None:
    return None


@bench_noop.step
def second(ctx: Any) -> None:
    return None


@bench_noop.step
def third(ctx: Any) -> None:
    return None


def noop() -> None:
    """The bare RQ job: no database, no Redis of its own."""
    return None
