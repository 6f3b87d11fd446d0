"""``manage.py bench engine`` at a smoke-test size (CI): its JSON figures, and that it leaves
no worker, redis-server, scratch database, saga or setting behind, also when it fails.
No timing is asserted: the machines are noisy (docs/BENCHMARKS.md has the figures)."""

from __future__ import annotations

import contextlib
import json
import os
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from sagas import bench_engine
from sagas.definitions import registry
from sagas.models import AuditEntry, StepRecord, TaskInstance

KEYS = {
    "jobs",
    "sagas",
    "steps",
    "workers",
    "database",
    "jobs_per_s",
    "steps_per_s",
    "ratio",
    "ratio_by_workers",
    "speedup",
    "latency_ms",
    "per_step",
    "per_bare_job",
    "per_start",
    "rss_mib",
    "rss_growth_mib",
    "cpu_busy",
    "cpus",
    "load_average",
    "goals",
    "seconds",
}
COST_KEYS = {
    "sql_queries",
    "redis_commands",
    "redis_commands_engine",
    "redis_commands_rq",
    "redis_round_trips",
}


def bench_processes() -> list[str]:
    """Command lines of live processes a bench run of this process started."""
    mark = f"{bench_engine.PROCESS_MARK}{os.getpid()}-".encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes()
            if mark in text:
                found.append(text.replace(b"\0", b" ").decode(errors="replace"))
    return found


def scratch_prefix() -> str:
    return f"{str(connection.settings_dict['NAME'])[:40]}_bench_"


def scratch_databases(prefix: str = "") -> set[str]:
    """Databases named as the bench names its scratch ones (others may come and go: other
    runs on the same server)."""
    prefix = prefix or scratch_prefix()
    with connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [prefix])
        return {row[0] for row in cursor.fetchall()}


def surroundings() -> dict[str, object]:
    """What the bench must leave as it found it."""
    return {
        "processes": bench_processes(),
        "databases": scratch_databases(),
        "database": connection.settings_dict["NAME"],
        "sagas": registry.names(),
        "queue url": settings.RQ_QUEUES["default"]["URL"],
        "redis url": settings.REDIS_URL,
        "reconcile interval": settings.SAGAS_RECONCILE_INTERVAL,
        "rows": (TaskInstance.objects.count(), StepRecord.objects.count()),
        "audit": AuditEntry.objects.count(),
    }


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_bench_engine_reports_its_figures_and_leaves_nothing_behind():
    before = surroundings()
    out = StringIO()
    call_command("bench", "engine", "--sagas", "30", "--workers", "2", "--json", stdout=out)
    figures = json.loads(out.getvalue())
    assert set(figures) == KEYS
    assert (figures["jobs"], figures["sagas"], figures["steps"], figures["workers"]) == (
        30,
        10,
        30,
        2,
    )
    assert figures["database"] == "postgresql"
    for key in ("jobs_per_s", "steps_per_s", "ratio_by_workers", "rss_mib", "cpu_busy"):
        assert set(figures[key]) == {"1", "2"}, key
    assert all(
        rate > 0 for rate in [*figures["jobs_per_s"].values(), *figures["steps_per_s"].values()]
    )
    assert figures["ratio"] == figures["ratio_by_workers"]["2"] > 0
    assert set(figures["speedup"]) == {"bare", "engine", "engine_vs_bare"}
    latency = figures["latency_ms"]
    assert latency["samples"] == 10 and latency["workers"] == 2
    assert 0 < latency["saga_p50"] <= latency["saga_p95"]
    assert 0 < latency["chain_p50"] <= latency["chain_p95"]
    for key in ("per_step", "per_bare_job", "per_start"):
        assert set(figures[key]) == COST_KEYS, key
    step = figures["per_step"]
    assert step["sql_queries"] > 0 and step["redis_commands_engine"] > 0
    assert step["redis_commands_rq"] > 0 and step["redis_round_trips"] > 0
    assert figures["per_bare_job"]["sql_queries"] == 0
    assert figures["per_start"]["sql_queries"] > 0
    assert [len(figures["rss_mib"][n]["after"]) for n in ("1", "2")] == [1, 2]
    assert all(mib > 0 for mib in figures["rss_mib"]["2"]["before"])
    assert set(figures["goals"]) == {"ratio", "speedup", "latency", "rss_growth_mib"}
    assert all(set(goal) >= {"goal", "value", "met"} for goal in figures["goals"].values())
    assert surroundings() == before


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_failed_run_stops_its_workers_and_drops_its_database(monkeypatch):
    before = surroundings()
    seen: dict[str, int] = {}
    prefix = scratch_prefix()

    def fail(fleet, sagas, report):
        seen["databases"] = len(scratch_databases(prefix))
        seen["workers"] = len(fleet.workers)
        seen["processes"] = len(bench_processes())
        raise bench_engine.BenchError("drain failed")

    monkeypatch.setattr(bench_engine, "_drain_engine", fail)
    with pytest.raises(CommandError, match="drain failed") as raised:
        call_command("bench", "engine", "--sagas", "9", "--workers", "1", stdout=StringIO())
    assert raised.value.returncode == 1
    # One worker, its scheduler and the private redis-server were up when it failed.
    assert seen["workers"] == 1 and seen["processes"] >= 2 and seen["databases"] == 1
    assert surroundings() == before


@pytest.mark.parametrize(
    ("option", "value"),
    [("--sagas", "2"), ("--sagas", "many"), ("--workers", "0"), ("--workers", "17")],
)
def test_bad_arguments_are_a_command_error_with_exit_code_2(option, value):
    with pytest.raises(CommandError, match=f"{option} must be a whole number") as raised:
        call_command("bench", "engine", option, value)
    assert raised.value.returncode == 2
    assert "\n" not in str(raised.value)
