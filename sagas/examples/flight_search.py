"""``flight-search``: ask several providers at once, go on with whatever came back in time.

The providers are the branches of an ``all_settled`` group with a 5 s timeout: the group
succeeds with each provider's quote or structured error. ``pick_best`` reads the
group's results; ``notify`` is not critical, so its failure never undoes a booking.

Input (all optional): ``{"providers": {"skyways": {"latency_ms": 300, "fail_rate": 0}},
"notify": "fail"}``. With an empty input, two providers answer fast, one fails and one
is slower than the group's timeout.
"""

from __future__ import annotations

import random
import time
import zlib
from typing import Any

from django.core.exceptions import ValidationError

from sagas.definitions import RetryPolicy, Saga

DEFAULT_PROVIDERS: dict[str, dict[str, float]] = {
    "skyways": {"latency_ms": 300, "fail_rate": 0.0},
    "aerofast": {"latency_ms": 900, "fail_rate": 0.0},
    "budgetjet": {"latency_ms": 100, "fail_rate": 1.0},
    "slowair": {"latency_ms": 8000, "fail_rate": 0.0},
}
GROUP_TIMEOUT_S = 5
CHECK_EVERY_S = 0.05


class ProviderError(RuntimeError):
    """The provider answered with an error."""


def validate_search(task_input: dict[str, Any]) -> None:
    providers = task_input.get("providers", {})
    if not isinstance(providers, dict):
        raise ValidationError("providers must be an object of provider name -> settings")
    errors = [f"unknown provider {name!r}" for name in providers if name not in DEFAULT_PROVIDERS]
    for name, options in providers.items():
        if not isinstance(options, dict) or not set(options) <= {"latency_ms", "fail_rate"}:
            errors.append(f"{name}: use latency_ms and fail_rate")
    if task_input.get("notify") not in (None, "ok", "fail"):
        errors.append('notify must be "ok" or "fail"')
    if errors:
        raise ValidationError(errors)


flight_search = Saga(
    "flight-search",
    cancellable=True,
    lock_expiry_s=10,
    validate_input=validate_search,
    description="Ask every provider at once; book the best quote that came back in time.",
)

search = flight_search.parallel("search", mode="all_settled", timeout_s=GROUP_TIMEOUT_S)
PROVIDER_RETRY = RetryPolicy(max_retries=1, backoff="constant", base_delay_ms=100)


def ask(ctx: Any, provider: str) -> dict[str, Any]:
    settings = {**DEFAULT_PROVIDERS[provider], **ctx.input.get("providers", {}).get(provider, {})}
    deadline = time.monotonic() + float(settings["latency_ms"]) / 1000
    while (left := deadline - time.monotonic()) > 0:
        ctx.raise_if_cancelled()
        time.sleep(min(CHECK_EVERY_S, left))
    if random.random() < float(settings["fail_rate"]):  # noqa: S311 - simulated outage
        raise ProviderError(f"{provider} is unavailable")
    price = 80 + zlib.crc32(f"{provider}:{ctx.task_id}".encode()) % 220
    return {"provider": provider, "price": price, "currency": "EUR"}


@search.branch(retry=PROVIDER_RETRY)
def skyways(ctx: Any) -> dict[str, Any]:
    return ask(ctx, "skyways")


@search.branch(retry=PROVIDER_RETRY)
def aerofast(ctx: Any) -> dict[str, Any]:
    return ask(ctx, "aerofast")


@search.branch(retry=PROVIDER_RETRY)
def budgetjet(ctx: Any) -> dict[str, Any]:
    return ask(ctx, "budgetjet")


@search.branch(retry=PROVIDER_RETRY)
def slowair(ctx: Any) -> dict[str, Any]:
    return ask(ctx, "slowair")


@flight_search.step
def pick_best(ctx: Any) -> dict[str, Any]:
    quotes = [q for q in ctx.results["search"].values() if "price" in (q or {})]
    if not quotes:
        raise ProviderError("no provider answered in time")
    best = min(quotes, key=lambda q: q["price"])
    return {**best, "compared": len(quotes)}


@pick_best.compensate
def release_best(ctx: Any) -> None:
    return None  # a quote holds nothing; a real booking would be cancelled here


@flight_search.step(critical=False, retry=RetryPolicy(max_retries=1, base_delay_ms=50))
def notify(ctx: Any) -> dict[str, Any]:
    if ctx.input.get("notify") == "fail":
        raise ConnectionError("mail relay refused the message")
    return {"sent_to": "traveller"}
