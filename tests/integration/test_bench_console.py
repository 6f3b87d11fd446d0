"""``manage.py bench console`` at a small size (CI's smoke test; no timing is asserted): its
figures, and that the scratch database is gone and the configured one untouched after."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from sagas import bench_console
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance

PAGES = [
    "dashboard",
    "task list",
    "tasks by status",
    "tasks by saga",
    "task search",
    "task page",
    "inbox",
    "findings",
]
PAGE_KEYS = [
    "url",
    "p50_ms",
    "p95_ms",
    "max_ms",
    "sql_p50_ms",
    "queries",
    "queries_min",
    "slowest_query",
]


def database_exists(name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        return cursor.fetchone() is not None


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_redis")
def test_bench_console_reports_every_page_and_drops_its_database():
    configured = connection.settings_dict["NAME"]
    scratch = bench_console.scratch_name(configured)
    assert not database_exists(scratch)
    out = StringIO()
    call_command("bench", "console", "--tasks", "500", "--repeat", "3", "--json", stdout=out)
    figures = json.loads(out.getvalue())

    assert figures["tasks"] == 500
    rows = figures["rows"]
    assert rows["tasks"] == 500 and rows["steps"] == 1500
    assert rows["attempts"] >= 1500 + 47  # the task page's task alone has 50
    assert rows["audit_entries"] >= 2000 and rows["findings"] == 2
    assert sum(figures["statuses"].values()) == 500
    assert all(n > 0 for n in figures["statuses"].values())  # every status, even at 500
    assert sorted(figures["pages"]) == sorted(PAGES)
    for name, page in figures["pages"].items():
        assert sorted(page) == sorted(PAGE_KEYS), name
        assert 0 < page["p50_ms"] <= page["p95_ms"] <= page["max_ms"], name
        # The same page runs the same queries every time.
        assert page["queries"] == page["queries_min"] > 0, name
    worst = figures["pages"][figures["worst_page"]]["p95_ms"]
    assert figures["ratio"] == pytest.approx(worst / 150, rel=1e-3)
    assert figures["goal_ms"] == 150
    assert figures["repeat"] == 3 and figures["redis"] is True
    # The paginators' counts are capped; what is left is named, with the rows it read.
    for count in figures["uncapped_counts"]:
        assert count["page"] in PAGES and "COUNT(" in count["sql"].upper()
    assert figures["database"] == scratch and figures["kept"] is False

    assert not database_exists(scratch)
    assert connection.settings_dict["NAME"] == configured
    assert TaskInstance.objects.count() == StepRecord.objects.count() == 0
    assert StepAttempt.objects.count() == AuditEntry.objects.count() == 0


def test_uncapped_counts_are_told_from_capped_ones():
    capped = (
        'SELECT COUNT(*) AS "__count" FROM (SELECT "sagas_taskinstance"."id" AS "col1" '
        'FROM "sagas_taskinstance" WHERE "sagas_taskinstance"."status" = \'failed\' '
        "LIMIT 10001) subquery"
    )
    uncapped = (
        'SELECT COUNT(*) AS "__count" FROM "sagas_auditentry" '
        'WHERE "sagas_auditentry"."task_id" = \'0b7c\''
    )
    other_table = 'SELECT COUNT(*) AS "__count" FROM "sagas_finding"'
    assert not bench_console.uncapped_count(capped)
    assert bench_console.uncapped_count(uncapped)
    assert not bench_console.uncapped_count(other_table)
    assert not bench_console.uncapped_count('SELECT "sagas_taskinstance"."id" FROM x')


def test_percentile_is_the_nearest_rank():
    samples = [float(n) for n in range(1, 21)]
    assert bench_console.percentile(samples, 0.95) == 19.0
    assert bench_console.percentile(samples, 0.5) == 10.0
    assert bench_console.percentile([7.0], 0.95) == 7.0


def test_without_postgres_it_exits_2_with_one_line(monkeypatch):
    monkeypatch.setattr(connection, "vendor", "sqlite")
    with pytest.raises(CommandError, match="bench console needs Postgres") as raised:
        call_command("bench", "console", "--tasks", "500", "--json")
    assert raised.value.returncode == 2
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("option", "value"), [("--tasks", "99"), ("--tasks", "many"), ("--repeat", "0")]
)
def test_bad_sizes_are_a_command_error_with_exit_code_2(option, value):
    with pytest.raises(CommandError, match=f"{option} must be a whole number") as raised:
        call_command("bench", "console", option, value)
    assert raised.value.returncode == 2
