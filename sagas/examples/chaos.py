"""``chaos``: reserve, charge, ship; its input scripts failures so every state can be produced.

Input keys (all optional), each step-scripting one an object of step name -> integer:

- ``fail``: fails that step's first n attempts (-1: every attempt);
- ``fail_compensation``: the same for that step's compensation;
- ``sleep_ms``: the step works that long, checking for cancellation every 50 ms and
  reporting its progress (``ctx.progress``) every 10 %;
- ``compensation_sleep_ms``: that step's compensation works that long (checking for its
  own stop every 50 ms), so ``compensating`` and ``cancelling`` can be watched;
- ``on_exhausted``: overrides the action policies' exhaustion behaviour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from django.core.exceptions import ValidationError

from sagas.definitions import ON_EXHAUSTED, RetryPolicy, Saga, StepDefinition

STEPS = ("reserve", "charge", "ship")
# Script key -> the smallest value it accepts (-1 means "every attempt" for failures).
SCRIPTS = {"fail": -1, "fail_compensation": -1, "sleep_ms": 0, "compensation_sleep_ms": 0}
CANCEL_CHECK_S = 0.05
PROGRESS_TENTHS = 10  # progress is reported every 10 %


class ChaosFailure(RuntimeError):
    """The failure the input asked for."""


def validate_script(task_input: dict[str, Any]) -> None:
    errors: list[str] = []
    for key, minimum in SCRIPTS.items():
        errors += _script_errors(key, task_input.get(key, {}), minimum)
    on_exhausted = task_input.get("on_exhausted")
    if on_exhausted is not None and on_exhausted not in ON_EXHAUSTED:
        errors.append(f"on_exhausted must be one of {', '.join(ON_EXHAUSTED)}")
    unknown = set(task_input) - {*SCRIPTS, "on_exhausted"}
    errors += [f"unknown input key {key!r}" for key in sorted(unknown)]
    if errors:
        raise ValidationError(errors)


def _script_errors(key: str, script: Any, minimum: int) -> list[str]:
    if not isinstance(script, dict):
        return [f"{key} must be an object of step name -> integer"]
    errors = [f"{key}: unknown step {name!r}" for name in script if name not in STEPS]
    errors += [
        f"{key}.{name} must be an integer >= {minimum}"
        for name, value in script.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ]
    return errors


def override_on_exhausted(task_input: dict[str, Any], step: StepDefinition) -> RetryPolicy | None:
    on_exhausted = task_input.get("on_exhausted")
    return replace(step.retry, on_exhausted=on_exhausted) if on_exhausted else None


chaos = Saga(
    "chaos",
    cancellable=True,
    lock_expiry_s=10,
    validate_input=validate_script,
    retry_override=override_on_exhausted,
    description="Scripted failures, slow steps and failing compensations on demand.",
)

FAST_RETRY = RetryPolicy(max_retries=3, backoff="exponential", base_delay_ms=20)
FAST_COMPENSATION_RETRY = RetryPolicy(max_retries=2, backoff="constant", base_delay_ms=20)


def perform(ctx: Any, step: str) -> None:
    """Work for the scripted time, reporting progress, then fail if the script says so."""
    milliseconds = scripted(ctx, "sleep_ms", step)
    work_for(ctx, milliseconds, on_tenth=lambda tenths: report(ctx, step, tenths, milliseconds))
    fail_if_scripted(ctx, step, "fail")


def undo(ctx: Any, step: str) -> None:
    """A compensation: work for the scripted time, then fail if the script says so."""
    work_for(ctx, scripted(ctx, "compensation_sleep_ms", step))
    fail_if_scripted(ctx, step, "fail_compensation")


def scripted(ctx: Any, key: str, step: str) -> int:
    return int(ctx.input.get(key, {}).get(step, 0))


def fail_if_scripted(ctx: Any, step: str, key: str) -> None:
    failures = scripted(ctx, key, step)
    if failures == -1 or ctx.attempt <= failures:
        raise ChaosFailure(f"{step}: scripted failure of attempt {ctx.attempt} ({key})")


def report(ctx: Any, step: str, tenths: int, milliseconds: int) -> None:
    seconds = milliseconds / 1000
    done = seconds * tenths / PROGRESS_TENTHS
    ctx.progress(tenths * 100 // PROGRESS_TENTHS, f"{step}: {done:.1f} of {seconds:.1f} s")


def work_for(ctx: Any, milliseconds: int, on_tenth: Callable[[int], None] | None = None) -> None:
    """Work for ``milliseconds``, checking for cancellation every ``CANCEL_CHECK_S``;
    ``on_tenth(n)`` is called once as each tenth of the time has passed (n = 1..10)."""
    total = milliseconds / 1000
    began = time.monotonic()
    reported = 0
    while True:
        ctx.raise_if_cancelled()
        elapsed = time.monotonic() - began
        tenths = min(PROGRESS_TENTHS, int(elapsed * PROGRESS_TENTHS / total)) if total else 0
        if tenths > reported:
            reported = tenths
            if on_tenth is not None:
                on_tenth(tenths)  # a database write: ten per step, whatever its length
        if elapsed >= total:
            return
        next_tenth = (reported + 1) * total / PROGRESS_TENTHS - elapsed
        time.sleep(max(0.0, min(CANCEL_CHECK_S, total - elapsed, next_tenth)))


@chaos.step(retry=FAST_RETRY)
def reserve(ctx: Any) -> dict[str, Any]:
    perform(ctx, "reserve")
    return {"reservation": f"R-{ctx.task_id}", "attempt": ctx.attempt}


@reserve.compensate(retry=FAST_COMPENSATION_RETRY)
def release(ctx: Any) -> None:
    undo(ctx, "reserve")


@chaos.step(retry=FAST_RETRY)
def charge(ctx: Any) -> dict[str, Any]:
    perform(ctx, "charge")
    return {"payment": f"P-{ctx.task_id}", "attempt": ctx.attempt}


@charge.compensate(retry=FAST_COMPENSATION_RETRY)
def refund(ctx: Any) -> None:
    undo(ctx, "charge")


@chaos.step(retry=FAST_RETRY)
def ship(ctx: Any) -> dict[str, Any]:
    perform(ctx, "ship")
    return {"shipment": f"S-{ctx.task_id}", "attempt": ctx.attempt}


@ship.compensate(retry=FAST_COMPENSATION_RETRY)
def recall(ctx: Any) -> None:
    undo(ctx, "ship")
