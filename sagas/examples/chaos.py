"""``chaos``: reserve, charge, ship; its input scripts failures so every state can be produced.

Input keys (all optional): ``fail`` {step: n} fails that step's first n attempts (-1: all),
``fail_compensation`` {step: n} the same for compensations, ``sleep_ms`` {step: ms} makes the
step work that long while checking for cancellation every 50 ms, and ``on_exhausted``
overrides the action policies' exhaustion behaviour.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from django.core.exceptions import ValidationError

from sagas.definitions import ON_EXHAUSTED, RetryPolicy, Saga, StepDefinition

STEPS = ("reserve", "charge", "ship")
CANCEL_CHECK_S = 0.05


class ChaosFailure(RuntimeError):
    """The failure the input asked for."""


def validate_script(task_input: dict[str, Any]) -> None:
    errors: list[str] = []
    for key in ("fail", "fail_compensation", "sleep_ms"):
        errors += _script_errors(key, task_input.get(key, {}))
    on_exhausted = task_input.get("on_exhausted")
    if on_exhausted is not None and on_exhausted not in ON_EXHAUSTED:
        errors.append(f"on_exhausted must be one of {', '.join(ON_EXHAUSTED)}")
    unknown = set(task_input) - {"fail", "fail_compensation", "sleep_ms", "on_exhausted"}
    errors += [f"unknown input key {key!r}" for key in sorted(unknown)]
    if errors:
        raise ValidationError(errors)


def _script_errors(key: str, script: Any) -> list[str]:
    if not isinstance(script, dict):
        return [f"{key} must be an object of step name -> integer"]
    errors = [f"{key}: unknown step {name!r}" for name in script if name not in STEPS]
    errors += [
        f"{key}.{name} must be an integer >= -1"
        for name, value in script.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < -1
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


def perform(ctx: Any, step: str, script_key: str = "fail") -> None:
    """Work for the scripted time, then fail if the script says this attempt fails."""
    work_for(ctx, ctx.input.get("sleep_ms", {}).get(step, 0) if script_key == "fail" else 0)
    failures = ctx.input.get(script_key, {}).get(step, 0)
    if failures == -1 or ctx.attempt <= failures:
        raise ChaosFailure(f"{step}: scripted failure of attempt {ctx.attempt} ({script_key})")


def work_for(ctx: Any, milliseconds: int) -> None:
    deadline = time.monotonic() + milliseconds / 1000
    while (left := deadline - time.monotonic()) > 0:
        ctx.raise_if_cancelled()
        time.sleep(min(CANCEL_CHECK_S, left))
    ctx.raise_if_cancelled()


@chaos.step(retry=FAST_RETRY)
def reserve(ctx: Any) -> dict[str, Any]:
    perform(ctx, "reserve")
    return {"reservation": f"R-{ctx.task_id}", "attempt": ctx.attempt}


@reserve.compensate(retry=FAST_COMPENSATION_RETRY)
def release(ctx: Any) -> None:
    perform(ctx, "reserve", "fail_compensation")


@chaos.step(retry=FAST_RETRY)
def charge(ctx: Any) -> dict[str, Any]:
    perform(ctx, "charge")
    return {"payment": f"P-{ctx.task_id}", "attempt": ctx.attempt}


@charge.compensate(retry=FAST_COMPENSATION_RETRY)
def refund(ctx: Any) -> None:
    perform(ctx, "charge", "fail_compensation")


@chaos.step(retry=FAST_RETRY)
def ship(ctx: Any) -> dict[str, Any]:
    perform(ctx, "ship")
    return {"shipment": f"S-{ctx.task_id}", "attempt": ctx.attempt}


@ship.compensate(retry=FAST_COMPENSATION_RETRY)
def recall(ctx: Any) -> None:
    perform(ctx, "ship", "fail_compensation")
