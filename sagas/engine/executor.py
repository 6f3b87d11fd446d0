"""The RQ job: one attempt of one step's action or compensation, fenced end to end.

It reads top to bottom: lock the task (or branch), admit the delivery, run the body with
a heartbeat and a timeout, settle the outcome, and let ``decisions`` say what comes
next, which ``apply`` writes. A result reaches the database whatever Redis does, and a
settle keeps trying through a database restart while the heartbeat goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    connections,
    transaction,
)
from django.db.models import Exists
from django.db.models.functions import Now
from redis.exceptions import RedisError
from rq import get_current_job

from sagas.definitions import Saga, StepDefinition, UnknownSaga, registry
from sagas.engine import apply, decisions, horse
from sagas.engine.apply import Loaded
from sagas.engine.breaker import Admission, CircuitBreaker
from sagas.engine.connection import redis
from sagas.engine.context import StepCancelled, StepContext
from sagas.engine.decisions import Outcome
from sagas.engine.idempotency import claim, claim_name, idempotency_key
from sagas.engine.locks import Heartbeat, TaskLock, lock_key, release_if_held_by
from sagas.engine.logs import engine_logger
from sagas.engine.plan import Plan, StepRow
from sagas.engine.stopping import AttemptAddress, signal_attempt
from sagas.engine.timeouts import StepTimedOut, exceeded, step_deadline
from sagas.models import StepAttempt, TaskInstance
from sagas.states import AttemptKind, AttemptOutcome, AuditAction, StepStatus

logger = logging.getLogger("sagas.engine")
Log = logging.LoggerAdapter[logging.Logger] | logging.Logger

SETTLE_FIRST_DELAY_S = 0.2
SETTLE_MAX_DELAY_S = 5.0
# What a breaker counts: the body's own failures, never a cancel or a stop.
FAILURES = (AttemptOutcome.FAILED, AttemptOutcome.TIMED_OUT)

__all__ = ["Outcome", "run_step", "settle_attempt", "settle_dead_attempt"]


@dataclass(frozen=True)
class Delivery:
    """One delivery of a step job, as RQ handed it to this worker."""

    task_id: str
    step_name: str
    kind: str
    attempt: int
    job_id: str
    worker: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_action(self) -> bool:
        return self.kind == AttemptKind.ACTION


@dataclass
class Started:
    """An admitted attempt, its running row and what its body needs."""

    delivery: Delivery
    saga: Saga
    definition: StepDefinition
    attempt: StepAttempt
    lock: TaskLock
    trial: bool
    ctx: StepContext
    timeout_s: float | None
    log: Log = field(repr=False)
    lock_released: bool = False
    settled: bool = False


def run_step(task_id: str, step_name: str, kind: str, attempt: int) -> None:
    """The job RQ runs. Step errors are recorded, never raised to RQ."""
    delivery = _delivery(task_id, step_name, kind, attempt)
    task = TaskInstance.objects.filter(pk=task_id).first()
    if task is None:
        engine_logger(task_id, step=step_name).warning("job for a task that does not exist")
        return
    log = engine_logger(task, step=step_name, kind=kind, attempt=attempt)
    saga, definition = _definitions(task.saga, step_name)
    if saga is None or definition is None:
        _code_missing(delivery, log)
        return
    lock = TaskLock(redis(), task.pk, saga.lock_expiry_s, scope=lock_scope(saga, step_name))
    if not lock.acquire():
        _requeue_for_lock(delivery, log)
        return
    started = None
    try:
        started = _admit(delivery, saga, definition, lock, log)
        if started is not None:
            _run_and_settle(started)
    finally:
        if started is None or not started.lock_released:
            _release(lock, log)


def lock_scope(saga: Saga, step_name: str) -> str:
    """A linear saga locks the whole task; steps that may run side by side lock themselves."""
    return "" if saga.is_linear else step_name


def _delivery(task_id: str, step_name: str, kind: str, attempt: int) -> Delivery:
    job = get_current_job()
    worker = (getattr(job, "worker_name", None) if job else None) or os.environ.get(
        "RQ_WORKER_ID", f"{socket.gethostname()}.{os.getpid()}"
    )
    meta = dict(job.meta) if job is not None and job.meta else {}
    jid = job.id if job else ""
    return Delivery(
        str(task_id), step_name, AttemptKind(kind), int(attempt), jid, str(worker), meta
    )


def _definitions(saga_name: str, step_name: str) -> tuple[Saga | None, StepDefinition | None]:
    try:
        saga = registry.get(saga_name)
    except UnknownSaga:
        return None, None
    return saga, saga.get_step(step_name)


def _release(lock: TaskLock, log: Log) -> None:
    """A failed release is logged: the lock expires on its own, the result is in the database."""
    try:
        lock.release()
    except RedisError as exc:
        log.warning("could not release the task lock (%s); it expires on its own", exc)


# --- admission -----------------------------------------------------------------------------


def _admit(
    delivery: Delivery, saga: Saga, definition: StepDefinition, lock: TaskLock, log: Log
) -> Started | None:
    """With the task row locked: may this delivery run? Then record its attempt running."""
    with transaction.atomic():
        loaded = apply.load(delivery.task_id)
        plan = loaded.plan
        step = plan.step(delivery.step_name)
        verdict = decisions.admissible(plan, step, delivery.kind, delivery.attempt)
        if verdict:
            _refuse(loaded, step, delivery, verdict, log)
            apply.apply(loaded)
            return None
        if delivery.is_action and decisions.group_expired(plan, step):
            reason = "the group's deadline passed before it could run"
            decisions.give_up_before_start(plan, step, reason)
            apply.apply(loaded)
            return None
        admission = _breaker_admission(definition, delivery)
        if not admission.allowed:
            _defer_for_breaker(loaded, step, definition, admission, log)
            return None
        if not _claim_attempt(step, delivery, log):
            _refuse(loaded, step, delivery, "duplicate", log)
            apply.apply(loaded)
            return None
        decisions.start_attempt(plan, step, delivery.kind, delivery.attempt)
        apply.apply(loaded)
        attempt = _attempt_row(loaded, delivery, lock, saga)
    return _started(delivery, saga, definition, attempt, lock, admission, loaded, log)


def _refuse(loaded: Loaded, step: StepRow, delivery: Delivery, verdict: str, log: Log) -> None:
    log.info("delivery not run: %s", verdict)
    if verdict == "duplicate":
        details = {
            "kind": delivery.kind,
            "attempt": delivery.attempt,
            "job_id": delivery.job_id,
            "worker": delivery.worker,
        }
        loaded.plan.audit(AuditAction.DUPLICATE_DELIVERY, step, details)


def _breaker_admission(definition: StepDefinition, delivery: Delivery) -> Admission:
    if not delivery.is_action or definition.breaker is None:
        return Admission(True)
    return CircuitBreaker(redis(), definition.breaker).admit()


def _defer_for_breaker(
    loaded: Loaded, step: StepRow, definition: StepDefinition, admission: Admission, log: Log
) -> None:
    """Open breaker: no attempt, no retry used; back when it half-opens (plus jitter)."""
    # The breaker's clock is the workers'; the plan's is the database's.
    wait_s = admission.retry_at - time.time() + random.uniform(0, 1)  # noqa: S311
    at = loaded.plan.after(max(wait_s, 0))
    name = definition.breaker.name if definition.breaker else ""
    decisions.defer_for_breaker(loaded.plan, step, at, name)
    apply.apply(loaded)
    log.info("breaker open; step deferred to %s", at.isoformat())


def _claim_attempt(step: StepRow, delivery: Delivery, log: Log) -> bool:
    """The per-attempt claim. Claims are only taken with the task row locked, and the
    attempt row is written in the same transaction: a claim without its attempt row is
    an orphan of a transaction that rolled back or died, and is taken over."""
    name = claim_name(delivery.task_id, step.name, delivery.kind, delivery.attempt)
    owner = delivery.job_id or delivery.worker
    if claim(redis(), name, owner):
        return True
    started = StepAttempt.objects.filter(
        step_id=step.pk, kind=delivery.kind, number=delivery.attempt
    )
    if started.exists():
        return False
    log.warning("claim %s had no attempt behind it (a rolled-back start); taken over", name)
    claim(redis(), name, owner, force=True)
    return True


def _attempt_row(loaded: Loaded, delivery: Delivery, lock: TaskLock, saga: Saga) -> StepAttempt:
    return StepAttempt.objects.create(
        step=loaded.steps[delivery.step_name],
        kind=delivery.kind,
        number=delivery.attempt,
        worker=delivery.worker[:200],
        job_id=delivery.job_id,
        lock_token=lock.token,
        lock_key=lock.key,
        # The database's clock, which the reaper judges by.
        heartbeat_at=Now(),
        heartbeat_expires_at=Now() + timedelta(seconds=saga.lock_expiry_s),
    )


def _started(
    delivery: Delivery,
    saga: Saga,
    definition: StepDefinition,
    attempt: StepAttempt,
    lock: TaskLock,
    admission: Admission,
    loaded: Loaded,
    log: Log,
) -> Started:
    plan = loaded.plan
    step = plan.step(delivery.step_name)
    timeout = definition.timeout_s
    if delivery.is_action:  # an undo is never cut short by its group's deadline
        timeout = decisions.effective_timeout(
            timeout, decisions.group_deadline(plan, step), plan.now
        )
    ctx = _context(plan, step, delivery, attempt, log)
    log.info("attempt started")
    return Started(delivery, saga, definition, attempt, lock, admission.trial, ctx, timeout, log)


def _context(
    plan: Plan, step: StepRow, delivery: Delivery, attempt: StepAttempt, log: Log
) -> StepContext:
    results = {s.name: s.data for s in plan.steps if s.status == StepStatus.SUCCEEDED}
    return StepContext(
        task_id=str(plan.task.pk),
        step_name=step.name,
        kind=delivery.kind,
        attempt=delivery.attempt,
        attempt_id=attempt.pk,
        input=plan.task.input,
        results=results,
        idempotency_key=idempotency_key(plan.task.pk, step.name, delivery.kind),
        trace_id=plan.task.trace_id,
        correlation_id=plan.task.correlation_id,
        data=step.data,
        logger=log,
        _redis=redis(),
    )


# --- running the body, then settling -------------------------------------------------------


def _run_and_settle(started: Started) -> None:
    """The heartbeat runs from the body's start until its outcome is in the database."""
    interval = max(0.5, started.saga.lock_expiry_s / 3)
    with Heartbeat(interval, lambda: _keep_alive(started), on_exit=connections.close_all):
        outcome = _perform(started)
        if not horse.current().begin_settle():
            started.log.warning("stopped as the body returned; the worker records the stop")
            horse.wait_to_be_stopped()
            return
        # Free the lock for the next step's job (enqueued when the settle commits).
        _release(started.lock, started.log)
        started.lock_released = True
        _settle_durably(started, outcome)
        started.settled = True  # the heartbeat has nothing left to keep alive
        horse.current().end_settle()
    _record_breaker(started, outcome)


def _perform(started: Started) -> Outcome:
    definition, ctx = started.definition, started.ctx
    body = definition.action if started.delivery.is_action else definition.compensation
    began = time.monotonic()
    outcome = _call(body, ctx, started.timeout_s)
    elapsed = time.monotonic() - began
    if outcome.status == AttemptOutcome.SUCCEEDED and exceeded(started.timeout_s, elapsed):
        return Outcome(AttemptOutcome.TIMED_OUT, error="step returned after its timeout")
    return outcome


def _call(body: Any, ctx: StepContext, timeout_s: float | None) -> Outcome:
    try:
        with step_deadline(timeout_s):
            result = body(ctx) if body is not None else None
        return Outcome(AttemptOutcome.SUCCEEDED, data=_json_safe(result))
    except StepTimedOut as exc:
        return Outcome(AttemptOutcome.TIMED_OUT, error=str(exc), traceback=traceback.format_exc())
    except StepCancelled as exc:
        return Outcome(AttemptOutcome.CANCELLED, error=str(exc))
    except Exception as exc:
        return Outcome(
            AttemptOutcome.FAILED,
            error=f"{type(exc).__name__}: {exc}"[:4000],
            traceback=traceback.format_exc(),
        )


def _json_safe(result: Any) -> Any:
    try:
        return json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"step result is not JSON-serialisable: {exc}") from None


def _keep_alive(started: Started) -> None:
    """One beat; a failing beat is logged and the next one tries again (never dies)."""
    if started.settled:
        return
    if not started.lock_released:
        try:
            if not started.lock.renew():
                started.log.warning("task lock lost while the step runs; the database fences")
        except RedisError as exc:
            started.log.warning("could not renew the task lock: %s", exc)
    try:
        alive = StepAttempt.objects.filter(
            pk=started.attempt.pk, outcome=AttemptOutcome.RUNNING
        ).update(
            heartbeat_at=Now(),
            heartbeat_expires_at=Now() + timedelta(seconds=started.saga.lock_expiry_s),
        )
    except DatabaseError as exc:
        started.log.warning("heartbeat not written (%s); reconnecting for the next beat", exc)
        connections.close_all()
        return
    if not alive and not started.settled:
        _superseded(started)


def _superseded(started: Started) -> None:
    """The reaper declared this attempt lost: tell the body to stop (``ctx.cancelled``)."""
    started.log.warning("attempt was superseded while running; asking it to stop")
    started.ctx.stop_requested.set()
    d = started.delivery
    with contextlib.suppress(RedisError):
        signal_attempt(redis(), AttemptAddress(d.task_id, d.step_name, d.kind, d.attempt))


def _settle_durably(started: Started, outcome: Outcome) -> None:
    """Record the outcome, retrying with backoff while the database is unreachable (a
    restart, a failover) for up to ``SAGAS_SETTLE_RETRY_FOR``; the heartbeat goes on."""
    give_up_at = time.monotonic() + settings.SAGAS_SETTLE_RETRY_FOR
    delay = SETTLE_FIRST_DELAY_S
    close_old_connections()  # a long step may outlive its connection
    while True:
        try:
            d = started.delivery
            ref = AttemptRef(d.task_id, d.step_name, d.kind, d.attempt)
            settle_attempt(
                started.attempt.pk, outcome, token=started.lock.token, log=started.log, ref=ref
            )
            return
        except (OperationalError, InterfaceError) as exc:
            connection.close()
            if time.monotonic() + delay > give_up_at:
                started.log.error("could not record the outcome (%s); the reaper will", exc)
                return
            started.log.warning(
                "database unreachable while settling (%s); retry in %.1fs", exc, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, SETTLE_MAX_DELAY_S)


def _record_breaker(started: Started, outcome: Outcome) -> None:
    """Only what the body did counts: cancelled or stopped attempts are no failures."""
    policy = started.definition.breaker
    if policy is None or not started.delivery.is_action:
        return
    try:
        breaker = CircuitBreaker(redis(), policy)
        if outcome.status == AttemptOutcome.SUCCEEDED:
            breaker.record_success()
        elif outcome.status in FAILURES and breaker.record_failure(started.trial):
            started.log.warning("breaker %s opened", policy.name)
    except RedisError as exc:
        started.log.warning("breaker not updated: %s", exc)


# --- settling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRef:
    """Where an attempt belongs: what a settle needs besides its id."""

    task_id: str
    step_name: str
    kind: str
    number: int

    def as_row(self) -> dict[str, Any]:
        return {
            "step__task_id": self.task_id,
            "step__name": self.step_name,
            "kind": self.kind,
            "number": self.number,
        }


def settle_attempt(
    attempt_id: int,
    outcome: Outcome,
    *,
    token: str | None = None,
    log: Log = logger,
    ref: AttemptRef | None = None,
) -> bool:
    """Record how an attempt ended and decide what comes next; False if it was superseded.

    ``token`` fences the write to the attempt's owner; the reaper and the worker's parent
    (which know the attempt is dead) settle without it. ``ref``: the caller knows where
    the attempt belongs (its executor does), so it need not be read first.
    """
    row = (
        ref.as_row()
        if ref is not None
        else StepAttempt.objects.values("step__task_id", "step__name", "kind", "number").get(
            pk=attempt_id
        )
    )

    def decide(loaded: Loaded) -> bool:
        plan = loaded.plan
        step = plan.step(row["step__name"])
        ended = decisions.classify(plan, step, row["kind"], outcome)
        if not _fence(loaded, step, attempt_id, row["kind"], ended, token, log):
            return False
        plan.attempt_ended(step, row["kind"], row["number"], ended.status)
        if row["kind"] == AttemptKind.ACTION:
            decisions.action_ended(plan, step, ended)
        else:
            decisions.compensation_ended(plan, step, ended)
        log.info("attempt settled: %s", ended.status)
        return True

    return apply.decide(row["step__task_id"], decide)


def _fence(
    loaded: Loaded,
    step: StepRow,
    attempt_id: int,
    kind: str,
    outcome: Outcome,
    token: str | None,
    log: Log,
) -> bool:
    """Write the outcome only if this attempt is still the running, current one.

    A second success of one step and kind is refused (the unique constraint is the final
    judge). Settles hold the task's row lock, so another attempt's success is committed
    and visible here before this one writes: asked for in the same UPDATE, it costs no
    savepoint. Only when nothing was written is it asked which of the two it was.
    """
    current = StepAttempt.objects.filter(pk=attempt_id, outcome=AttemptOutcome.RUNNING)
    if token is not None:
        current = current.filter(lock_token=token)
    changes = {
        "outcome": outcome.status,
        "finished_at": loaded.plan.now,
        "error": outcome.error,
        "traceback": outcome.traceback,
    }
    writes = current
    if outcome.status == AttemptOutcome.SUCCEEDED:
        writes = current.exclude(
            Exists(
                StepAttempt.objects.filter(
                    step_id=step.pk, kind=kind, outcome=AttemptOutcome.SUCCEEDED
                ).exclude(pk=attempt_id)
            )
        )
    if writes.update(**changes):
        return True
    if outcome.status == AttemptOutcome.SUCCEEDED and current.exists():
        # The database is the final judge: this step already has a success of this kind.
        refused = "result refused: another attempt already succeeded"
        current.update(**{**changes, "outcome": AttemptOutcome.FAILED, "error": refused})
        number = StepAttempt.objects.values_list("number", flat=True).get(pk=attempt_id)
        details = {"kind": kind, "attempt": number, "refused": "second success"}
        loaded.plan.audit(AuditAction.DUPLICATE_DELIVERY, step, details)
        return False
    log.warning("superseded attempt %s wrote nothing", attempt_id)
    return False


def settle_dead_attempt(attempt: StepAttempt, outcome: Outcome) -> bool:
    """Settle an attempt whose worker is gone (reaper, worker's parent): free the lock it
    held, then record the outcome without a token (we know the holder is dead)."""
    held = attempt.lock_key or lock_key(attempt.step.task_id)
    with contextlib.suppress(RedisError):  # otherwise the lock expires on its own
        release_if_held_by(redis(), held, attempt.lock_token)
    return settle_attempt(attempt.pk, outcome)


# --- deliveries that cannot run here -------------------------------------------------------


def _code_missing(delivery: Delivery, log: Log) -> None:
    """This worker lacks the step's code (an old worker in a rolling deploy, or a deploy
    that removed it): hand the job back for a worker that has it, a bounded number of
    times with growing delays, then park the task (or fail the compensation) for good."""
    handed_back = int(delivery.meta.get("code_requeues", 0))

    def decide(loaded: Loaded) -> None:
        plan = loaded.plan
        step = plan.step(delivery.step_name)
        if decisions.admissible(plan, step, delivery.kind, delivery.attempt):
            return  # a stale delivery: nothing to hand on
        if handed_back >= settings.SAGAS_CODE_REQUEUES:
            log.error(decisions.missing_message(plan.task.saga, step.name))
            decisions.code_missing_for_good(plan, step, delivery.kind)
            return
        if handed_back == 0:
            details = {
                "kind": delivery.kind,
                "attempt": delivery.attempt,
                "worker": delivery.worker,
            }
            plan.audit(AuditAction.CODE_MISSING, step, details)
        delay = min(2**handed_back, 30) + random.uniform(0, 1)  # noqa: S311
        meta = {**delivery.meta, "code_requeues": handed_back + 1}
        suffix = f"d{handed_back + 1}"
        plan.schedule(
            step, delivery.kind, delivery.attempt, at=plan.after(delay), suffix=suffix, meta=meta
        )
        log.warning("this worker does not have step %s; handed back for %.0fs", step.name, delay)

    apply.decide(delivery.task_id, decide)


def _requeue_for_lock(delivery: Delivery, log: Log) -> None:
    """Someone holds the task lock: come back shortly, a bounded number of times. Decided
    with the task row locked, and only for a delivery the task still expects, so a late
    delivery can never overwrite the job id of the work that replaced it."""
    tries = int(delivery.meta.get("lock_requeues", 0)) + 1

    def decide(loaded: Loaded) -> None:
        plan = loaded.plan
        step = plan.step(delivery.step_name)
        verdict = decisions.admissible(plan, step, delivery.kind, delivery.attempt)
        if verdict:
            _refuse(loaded, step, delivery, verdict, log)
            return
        if tries > settings.SAGAS_LOCK_REQUEUES:
            log.warning("task lock still busy after %s re-queues; left to the reaper", tries - 1)
            details = {"step": step.name, "kind": delivery.kind, "attempt": delivery.attempt}
            plan.audit(AuditAction.LOCK_BUSY, details=details)
            return
        at = plan.after(random.uniform(0.2, 1.5))  # noqa: S311
        meta = {**delivery.meta, "lock_requeues": tries}
        jid = plan.schedule(
            step, delivery.kind, delivery.attempt, at=at, suffix=f"l{tries}", meta=meta
        )
        log.info("task lock busy; re-queued as %s", jid)

    apply.decide(delivery.task_id, decide)
