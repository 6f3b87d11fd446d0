"""Benchmarks (``manage.py bench``): what reconciliation costs beyond listing S3.

``reconcile_bench`` fills a scratch bucket with objects under a bench saga's prefix (half
of them owned by steps), then times a bare paginated listing of that prefix and a dry
reconciliation run over a scope of just that saga. Everything it creates is removed at
the end, also on error: the objects and the bucket, and the database rows (findings, runs,
owned keys, steps, tasks), all found by the bench saga's name, which is new for each run.
It starts its own embedded S3 server unless ``AWS_ENDPOINT_URL`` names one; on such an
endpoint it creates a fresh bucket and touches nothing outside the bench saga's prefix.
See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from sagas import reconciliation, storage
from sagas.definitions import Saga, registry
from sagas.embedded import S3_CREDENTIALS, S3_REGION, EmbeddedS3, EmbeddedServiceError
from sagas.models import (
    Finding,
    FindingKind,
    OwnedKey,
    ReconciliationRun,
    StepRecord,
    TaskInstance,
)
from sagas.states import StepStatus, TaskStatus

DEFAULT_OBJECTS = 100_000
KEYS_PER_STEP = 10  # each bench step owns this many objects ("Keys" in its data)
PUT_THREADS = 8
PUT_CHUNK = 1000  # objects put (and reported) per round of the thread pool
DB_BATCH = 1000  # owned keys written per transaction (with their steps and tasks)
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
BODY = b"b"
MIB = 1024 * 1024

# (phase, done, total): "put", "rows", "listing", "reconcile", "memory", "cleanup"
Progress = Callable[[str, int, int], None]


class BenchError(Exception):
    """The benchmark could not run; the message is one line."""


@dataclass
class ReconcileFigures:
    objects: int
    listing_s: float
    reconcile_s: float
    peak_rss_mib: float
    python_peak_mib: float
    findings: dict[str, int] = field(default_factory=dict)
    owned: int = 0
    steps: int = 0
    endpoint: str = ""
    embedded: bool = True
    redis_checked: bool = True

    @property
    def ratio(self) -> float:
        """Reconciliation time / bare listing time (the issue's headline): 1.0 means
        reconciling costs nothing beyond the listing; the goal is at most 1.3."""
        return self.reconcile_s / self.listing_s if self.listing_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "listing_s": round(self.listing_s, 3),
            "reconcile_s": round(self.reconcile_s, 3),
            "ratio": round(self.ratio, 4),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "python_peak_mib": round(self.python_peak_mib, 1),
            "findings": dict(self.findings),
        }


def reconcile_bench(
    objects: int = DEFAULT_OBJECTS, progress: Progress | None = None
) -> ReconcileFigures:
    """Run the reconciliation benchmark over ``objects`` objects; ``BenchError`` when S3,
    the database or the embedded server fails, or another run holds the running slot."""
    if objects < 1:
        raise ValueError("objects must be at least 1")
    report = progress or (lambda phase, done, total: None)
    tag = uuid.uuid4().hex[:12]
    name = f"bench-reconcile-{tag}"
    bucket = f"opsconsole-bench-{tag}"
    saga = _bench_saga(name)
    try:
        with contextlib.ExitStack() as stack:
            endpoint, embedded = stack.enter_context(_endpoint(bucket))
            # DEBUG keeps every query in memory: it would count as the run's time and memory.
            overrides = {"AWS_ENDPOINT_URL": endpoint, "SAGAS_S3_BUCKET": bucket, "DEBUG": False}
            stack.enter_context(_settings(**overrides))
            stack.enter_context(_scratch_bucket(bucket, saga.s3_prefix, embedded, report))
            stack.callback(_delete_rows, name)
            stack.enter_context(_registered(saga))
            _put_objects(saga.s3_prefix, objects, report)
            owned, steps = _own_half(name, saga.s3_prefix, objects, report)
            figures = _measure(name, saga, objects, report)
            figures.owned, figures.steps = owned, steps
            figures.endpoint, figures.embedded = endpoint, embedded
            return figures
    except (storage.StorageError, reconciliation.ReconciliationError) as exc:
        raise BenchError(str(exc)) from exc
    except EmbeddedServiceError as exc:
        raise BenchError(_one_line(exc)) from exc
    except DatabaseError as exc:
        raise BenchError(f"database error: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _bench_saga(name: str) -> Saga:
    saga = Saga(
        name,
        s3_prefix=f"{name}/",
        orphan_policy="report",
        description="A benchmark's scratch saga (manage.py bench reconcile).",
    )

    @saga.step
    def upload(ctx: Any) -> dict[str, Any]:  # never run: the bench writes its rows itself
        return {}

    return saga


# --- scratch resources -------------------------------------------------------------------


@contextlib.contextmanager
def _endpoint(bucket: str) -> Iterator[tuple[str, bool]]:
    """(endpoint URL, whether the bench started it): ``AWS_ENDPOINT_URL`` when set, else an
    embedded moto server (with ``bucket``) that is stopped at the end."""
    configured = os.environ.get("AWS_ENDPOINT_URL") or settings.AWS_ENDPOINT_URL
    if configured:
        yield str(configured), False
        return
    logs = tempfile.TemporaryDirectory(prefix="opsconsole-bench-")
    try:
        server = EmbeddedS3(bucket, log_path=Path(logs.name) / "moto-server.log")
    except BaseException:
        logs.cleanup()
        raise
    try:
        with _environ({"AWS_DEFAULT_REGION": S3_REGION, **S3_CREDENTIALS}):
            yield server.endpoint_url, True
    finally:
        server.stop()
        logs.cleanup()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- scratch databases (bench console and bench engine) ----------------------------------------


@contextlib.contextmanager
def database_pointed_at(name: str) -> Iterator[None]:
    """Django's default connection on database ``name``, then back, as Django's test runner
    does. One connection for the whole run (CONN_MAX_AGE None), so nothing measured pays
    for connecting. Content types are cached by connection alias: the cache is emptied both
    ways, so neither database's ids leak into the other's queries."""
    connection = connections[DEFAULT_DB_ALIAS]
    configured = settings.DATABASES[DEFAULT_DB_ALIAS]
    own = connection.settings_dict
    saved = (own["NAME"], own["CONN_MAX_AGE"], configured["NAME"])
    connection.close()
    own["NAME"], own["CONN_MAX_AGE"], configured["NAME"] = name, None, name
    ContentType.objects.clear_cache()
    try:
        yield
    finally:
        connection.close()
        own["NAME"], own["CONN_MAX_AGE"], configured["NAME"] = saved
        ContentType.objects.clear_cache()


def drop_database(name: str) -> None:
    """Drop a scratch database from outside any database; WITH (FORCE) ends the sessions
    still in it (Postgres 13 and later). Raises ``DatabaseError``."""
    connection = connections[DEFAULT_DB_ALIAS]
    force = " WITH (FORCE)" if connection.pg_version >= 130000 else ""  # type: ignore[attr-defined]
    with connection._nodb_cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {connection.ops.quote_name(name)}{force}")


@contextlib.contextmanager
def _settings(**values: Any) -> Iterator[None]:
    before = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(settings, name, value)


def _s3(action: Callable[[], Any]) -> Any:
    """Run one S3 call, turning its failures into a one-line ``StorageError``."""
    try:
        return action()
    except storage.StorageError:
        raise
    except Exception as exc:
        raise storage.StorageError(storage.describe(exc)) from exc


@contextlib.contextmanager
def _scratch_bucket(bucket: str, prefix: str, created: bool, report: Progress) -> Iterator[None]:
    """A fresh bucket (the embedded server made it already); at the end the objects under
    ``prefix`` are deleted, then the bucket (which S3 refuses while anything is left)."""
    client = storage.client()
    if not created:
        _s3(lambda: _create_bucket(client, bucket))
    try:
        yield
    finally:
        _empty_prefix(client, bucket, prefix, report)
        _s3(lambda: client.delete_bucket(Bucket=bucket))


def _create_bucket(client: Any, bucket: str) -> None:
    region = client.meta.region_name
    if region and region != "us-east-1":
        location = {"LocationConstraint": region}
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration=location)
    else:
        client.create_bucket(Bucket=bucket)


def _empty_prefix(client: Any, bucket: str, prefix: str, report: Progress) -> None:
    """Delete the objects under ``prefix``, a listed page at a time (the first page again
    each time: no continuation token over keys being deleted)."""
    deleted = 0
    while page := next(storage.list_pages(prefix, DELETE_BATCH), []):
        keys = [{"Key": o.key} for o in page if o.key.startswith(prefix)]
        if not keys:
            return
        batch: dict[str, Any] = {"Objects": keys, "Quiet": True}
        answer = _s3(functools.partial(client.delete_objects, Bucket=bucket, Delete=batch))
        if errors := answer.get("Errors"):
            first = errors[0]
            raise storage.StorageError(
                f"could not delete {len(errors)} bench objects under {prefix!r}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}"
            )
        deleted += len(keys)
        report("cleanup", deleted, 0)


@contextlib.contextmanager
def _registered(saga: Saga) -> Iterator[None]:
    registry.register(saga, origin="sagas.bench")
    try:
        yield
    finally:
        registry.unregister(saga.name)


def _delete_rows(name: str) -> None:
    """Every row the bench wrote, found by its saga's name (new for each run). Findings
    go first (they protect their run), owned keys before steps, steps before tasks."""
    Finding.objects.filter(saga=name).delete()
    ReconciliationRun.objects.filter(saga=name).delete()
    OwnedKey.objects.filter(saga=name).delete()
    StepRecord.objects.filter(task__saga=name).delete()
    TaskInstance.objects.filter(saga=name).delete()


# --- filling -----------------------------------------------------------------------------


def _key(prefix: str, n: int) -> str:
    return f"{prefix}objects/{n:09d}.bin"


def _put_objects(prefix: str, objects: int, report: Progress) -> None:
    """Tiny objects, put in parallel (boto3 clients are thread-safe; one per thread keeps
    each its own connection pool)."""
    local = threading.local()
    bucket = str(settings.SAGAS_S3_BUCKET)

    def put(n: int) -> None:
        if not hasattr(local, "client"):
            local.client = storage.client()
        client = local.client
        _s3(lambda: client.put_object(Bucket=bucket, Key=_key(prefix, n), Body=BODY))

    with ThreadPoolExecutor(max_workers=PUT_THREADS, thread_name_prefix="bench-put") as pool:
        for start in range(0, objects, PUT_CHUNK):
            end = min(start + PUT_CHUNK, objects)
            list(pool.map(put, range(start, end)))
            report("put", end, objects)


def _own_half(name: str, prefix: str, objects: int, report: Progress) -> tuple[int, int]:
    """Steps (one task each, succeeded) owning every other object, ``KEYS_PER_STEP`` each,
    written with bulk inserts a batch per transaction. (owned keys, steps)."""
    owned_numbers = range(0, objects, 2)
    total, steps = len(owned_numbers), 0
    for start in range(0, total, DB_BATCH):
        batch = [_key(prefix, n) for n in owned_numbers[start : start + DB_BATCH]]
        groups = [batch[i : i + KEYS_PER_STEP] for i in range(0, len(batch), KEYS_PER_STEP)]
        with transaction.atomic():
            _write_owners(name, groups)
        steps += len(groups)
        report("rows", start + len(batch), total)
    return total, steps


def _write_owners(name: str, groups: list[list[str]]) -> None:
    tasks = TaskInstance.objects.bulk_create(
        [TaskInstance(saga=name, status=TaskStatus.COMPLETED, trace_id="0" * 32) for _ in groups]
    )
    steps = StepRecord.objects.bulk_create(
        [
            StepRecord(
                task=task, index=0, name="upload", status=StepStatus.SUCCEEDED, data={"Keys": keys}
            )
            for task, keys in zip(tasks, groups, strict=True)
        ]
    )
    if any(step.pk is None for step in steps):  # a backend that returns no ids
        ids = dict(StepRecord.objects.filter(task__in=tasks).values_list("task_id", "pk"))
        for step in steps:
            step.pk = ids[step.task_id]
    OwnedKey.objects.bulk_create(
        [
            OwnedKey(step=step, saga=name, key=key)
            for step, keys in zip(steps, groups, strict=True)
            for key in keys
        ]
    )


# --- measuring ---------------------------------------------------------------------------


def _measure(name: str, saga: Saga, objects: int, report: Progress) -> ReconcileFigures:
    """Times a bare listing, then a dry run (its findings are the ones reported), then
    measures Python's peak allocation in a second, untimed dry run (tracemalloc slows
    Python down, so it stays out of the timed ones)."""
    scope = reconciliation.scope_for(name)
    next(storage.list_pages(saga.s3_prefix, 1))  # warm-up: a client, a connection

    started = time.perf_counter()
    listed = 0
    for page in storage.list_pages(saga.s3_prefix):
        listed += len(page)
        report("listing", listed, objects)
    listing_s = time.perf_counter() - started
    if listed != objects:
        raise BenchError(f"listed {listed} objects under {saga.s3_prefix!r}, put {objects}")

    started = time.perf_counter()
    run = _dry_run(scope, "reconcile", objects, report)
    reconcile_s = time.perf_counter() - started

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        _dry_run(scope, "memory", objects, report)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()

    counts = run.counts
    found = {str(kind): int(counts.get(kind, 0)) for kind in FindingKind}
    return ReconcileFigures(
        objects=objects,
        listing_s=listing_s,
        reconcile_s=reconcile_s,
        peak_rss_mib=_peak_rss_mib(),
        python_peak_mib=python_peak / MIB,
        findings=found,
        redis_checked="redis_unavailable" not in counts,
    )


def _dry_run(
    scope: reconciliation.Scope, phase: str, objects: int, report: Progress
) -> ReconciliationRun:
    run = reconciliation.reconcile(scope, progress=lambda saga, seen: report(phase, seen, objects))
    if run is None:
        running = reconciliation.running_run()
        which = f" (run #{running.pk})" if running is not None else ""
        raise BenchError(f"another reconciliation run is in progress{which}: try again later")
    return run


def _peak_rss_mib() -> float:
    """The process's peak resident set size (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024
