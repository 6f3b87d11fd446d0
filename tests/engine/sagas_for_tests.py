"""Sagas that only the engine tests use (loaded by the test workers through SAGA_MODULES)."""

from __future__ import annotations

from typing import Any

from sagas.definitions import CircuitBreakerPolicy, RetryPolicy, Saga

flaky = Saga("flaky-service", lock_expiry_s=10)


@flaky.step(
    retry=RetryPolicy(max_retries=5, backoff="constant", base_delay_ms=10),
    breaker=CircuitBreakerPolicy("flaky", failure_threshold=2, open_seconds=3),
)
def call_service(ctx: Any) -> dict[str, Any]:
    if ctx.attempt <= ctx.input.get("fail_first", 0):
        raise ConnectionError("service unavailable")
    return {"called": True}


slow_step = Saga("slow-step", lock_expiry_s=10)


@slow_step.step(
    retry=RetryPolicy(max_retries=1, backoff="constant", base_delay_ms=10), timeout_s=0.5
)
def stubborn(ctx: Any) -> dict[str, Any]:
    """Sleeps past its timeout on the first attempt, swallowing every ordinary exception."""
    if ctx.attempt == 1:
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except Exception:
                continue
    return {"attempt": ctx.attempt}


shrinking = Saga("shrinking")


@shrinking.step
def first(ctx: Any) -> None:
    return None


@shrinking.step
def second(ctx: Any) -> None:
    return None


deaf = Saga("deaf", cancellable=True, lock_expiry_s=10)


@deaf.step
def book(ctx: Any) -> dict[str, Any]:
    return {"booked": True}


@book.compensate
def unbook(ctx: Any) -> None:
    return None


@deaf.step
def ignore_cancel(ctx: Any) -> None:
    """Works for 30 s and never looks at ctx.cancelled."""
    import time

    time.sleep(30)


def _work(ctx: Any, milliseconds: int, cooperative: bool = True) -> None:
    import time

    deadline = time.monotonic() + milliseconds / 1000
    while time.monotonic() < deadline:
        if cooperative:
            ctx.raise_if_cancelled()
        time.sleep(0.02)


hotels = Saga("first-hotel", lock_expiry_s=10)
offers = hotels.parallel("offers", mode="any", timeout_s=20)


@offers.branch
def fast_hotel(ctx: Any) -> dict[str, Any]:
    _work(ctx, 800)
    return {"hotel": "fast"}


@offers.branch
def slow_hotel(ctx: Any) -> dict[str, Any]:
    _work(ctx, 5000)  # observes the cancellation when fast_hotel wins
    return {"hotel": "slow"}


@offers.branch
def stubborn_hotel(ctx: Any) -> dict[str, Any]:
    _work(ctx, 1600, cooperative=False)  # finishes after the winner: its booking is undone
    return {"hotel": "stubborn"}


for _branch in (fast_hotel, slow_hotel, stubborn_hotel):
    _branch.compensate(lambda ctx: None)


def _once_running(ctx: Any, sibling: str) -> None:
    """Wait until ``sibling`` of the same task runs, so a failure meets it mid-flight
    (on a loaded machine its worker may not have picked it up yet)."""
    import time

    from sagas.models import StepRecord

    deadline = time.monotonic() + 20
    running = StepRecord.objects.filter(task_id=ctx.task_id, name=sibling, status="running")
    while time.monotonic() < deadline and not running.exists():
        time.sleep(0.05)


fanout = Saga("all-or-nothing", lock_expiry_s=10)


@fanout.step
def prepare(ctx: Any) -> dict[str, Any]:
    return {"prepared": True}


prepare.compensate(lambda ctx: None)
jobs = fanout.parallel("jobs", mode="all")


@jobs.branch
def quick_job(ctx: Any) -> dict[str, Any]:
    _work(ctx, 100)
    return {"done": "quick"}


@jobs.branch(retry=RetryPolicy(max_retries=0))
def broken_job(ctx: Any) -> None:
    _once_running(ctx, "long_job")
    _work(ctx, 300)
    raise RuntimeError("broken_job cannot work")


@jobs.branch
def long_job(ctx: Any) -> dict[str, Any]:
    _work(ctx, 5000)
    return {"done": "long"}


for _branch in (quick_job, broken_job, long_job):
    _branch.compensate(lambda ctx: None)


@fanout.step
def finish(ctx: Any) -> None:
    return None


pair = Saga("pair", lock_expiry_s=10)
both = pair.parallel("both", mode="all")


@both.branch
def left(ctx: Any) -> dict[str, Any]:
    _work(ctx, 1500)
    return {"side": "left"}


@both.branch
def right(ctx: Any) -> dict[str, Any]:
    _work(ctx, 1500)
    return {"side": "right"}


dag = Saga("dag-fail", lock_expiry_s=10)


@dag.step
def base(ctx: Any) -> dict[str, Any]:
    return {"base": True}


base.compensate(lambda ctx: None)


@dag.step(after=["base"], retry=RetryPolicy(max_retries=0))
def breaks(ctx: Any) -> None:
    _once_running(ctx, "sibling")
    _work(ctx, 300)
    raise RuntimeError("breaks for good")


@dag.step(after=["base"])
def sibling(ctx: Any) -> dict[str, Any]:
    _work(ctx, 5000)  # still running when its sibling fails
    return {"sibling": True}


sibling.compensate(lambda ctx: None)


timed = Saga("deadline", deadline_s=2, lock_expiry_s=10)


@timed.step
def early(ctx: Any) -> dict[str, Any]:
    return {"early": True}


early.compensate(lambda ctx: None)


@timed.step
def too_long(ctx: Any) -> None:
    _work(ctx, 20000)


racing = Saga("first-answer", lock_expiry_s=10)


@racing.step
def ask(ctx: Any) -> dict[str, Any]:
    return {"asked": True}


ask.compensate(lambda ctx: None)
answer = racing.parallel("answer", mode="race")


@answer.branch(retry=RetryPolicy(max_retries=0))
def quick(ctx: Any) -> dict[str, Any]:
    """Settles first, with a failure if the input says so: the race follows it either way."""
    _once_running(ctx, "slow")
    _work(ctx, 200)
    if ctx.input.get("quick_fails"):
        raise RuntimeError("quick said no")
    return {"answer": "quick"}


@answer.branch
def slow(ctx: Any) -> dict[str, Any]:
    _work(ctx, 5000)
    return {"answer": "slow"}


for _racer in (quick, slow):
    _racer.compensate(lambda ctx: None)


# --- engine hardening (issue 05) ---------------------------------------------------------

stalled = Saga("redrive-dag", lock_expiry_s=10)


@stalled.step(
    after=[],
    retry=RetryPolicy(
        max_retries=1, backoff="constant", base_delay_ms=300, on_exhausted="dead_letter"
    ),
)
def parks(ctx: Any) -> dict[str, Any]:
    """Fails its first two attempts (parking the task); a redrive's attempt succeeds."""
    if ctx.attempt <= 2:
        raise RuntimeError(f"parks: attempt {ctx.attempt} fails")
    return {"parked": False}


quotes_side = stalled.parallel("side", mode="all_settled", after=[])


@quotes_side.branch
def side_ok(ctx: Any) -> dict[str, Any]:
    return {"side": "ok"}


@quotes_side.branch(retry=RetryPolicy(max_retries=0))
def side_broken(ctx: Any) -> None:
    raise RuntimeError("side_broken always fails (all_settled lets it)")


@stalled.step(after=["parks", "side"])
def wrap_up(ctx: Any) -> dict[str, Any]:
    return {"done": True}


rollout = Saga("branch-rollout", lock_expiry_s=10)
fanned = rollout.parallel("fan", mode="all")


@fanned.branch
def known(ctx: Any) -> dict[str, Any]:
    return {"known": True}


@fanned.branch
def shipped_later(ctx: Any) -> dict[str, Any]:
    """The branch a rolling deploy adds: old workers do not have it."""
    return {"new": True}


settling = Saga("settling", cancellable=True, lock_expiry_s=10)


@settling.step
def book_slowly(ctx: Any) -> dict[str, Any]:
    """Books something in 1.5 s and never looks at ctx.cancelled: its success stands."""
    import time

    time.sleep(1.5)
    return {"booking": f"B-{ctx.task_id}"}


@book_slowly.compensate
def unbook_slowly(ctx: Any) -> None:
    return None


watchful = Saga("watchful", lock_expiry_s=3)


@watchful.step(retry=RetryPolicy(max_retries=0))
def watch_for_stop(ctx: Any) -> None:
    """Works until ctx.cancelled says stop, and notes (in Redis) when it first did."""
    import time

    from sagas.engine.connection import redis

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ctx.cancelled:
            redis().set(f"test:saw-stop:{ctx.task_id}", str(time.time()), ex=600)
            ctx.raise_if_cancelled()
        time.sleep(0.05)


tripwire = Saga("tripwire", cancellable=True, lock_expiry_s=10)


@tripwire.step(breaker=CircuitBreakerPolicy("tripwire", failure_threshold=1, open_seconds=60))
def call_fragile_service(ctx: Any) -> None:
    _work(ctx, 5000)


occupier = Saga("occupier", lock_expiry_s=10)


@occupier.step
def occupy(ctx: Any) -> None:
    """Keeps a worker busy for the number of milliseconds in the input."""
    import time

    time.sleep(ctx.input.get("ms", 3000) / 1000)


from_start = Saga("quotes-from-start", lock_expiry_s=10)
timed_quotes = from_start.parallel("quotes", mode="all", timeout_s=4)


@timed_quotes.branch(retry=RetryPolicy(max_retries=0))
def quote_a(ctx: Any) -> dict[str, Any]:
    _work(ctx, 1000)
    return {"quote": "a"}


@timed_quotes.branch(retry=RetryPolicy(max_retries=0))
def quote_b(ctx: Any) -> dict[str, Any]:
    _work(ctx, 1000)
    return {"quote": "b"}


capped = Saga("quotes-capped", lock_expiry_s=10)
capped_quotes = capped.parallel("quotes", mode="all", timeout_s=10, schedule_to_close_s=2)


@capped_quotes.branch(retry=RetryPolicy(max_retries=0))
def capped_a(ctx: Any) -> dict[str, Any]:
    return {"quote": "a"}


@capped_quotes.branch(retry=RetryPolicy(max_retries=0))
def capped_b(ctx: Any) -> dict[str, Any]:
    return {"quote": "b"}
