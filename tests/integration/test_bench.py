"""``manage.py bench reconcile`` against the suite's moto server: its figures, and that it
leaves the database, the bucket list and the settings as it found them."""

from __future__ import annotations

import json
from io import StringIO

import boto3
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from sagas import bench
from sagas.definitions import registry
from sagas.models import (
    AuditEntry,
    Finding,
    OwnedKey,
    ReconciliationRun,
    StepRecord,
    TaskInstance,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_redis")]

KEYS = ["objects", "listing_s", "reconcile_s", "ratio", "peak_rss_mib", "python_peak_mib"]


@pytest.fixture
def endpoint(s3_server, monkeypatch):
    """AWS_ENDPOINT_URL and credentials point at the suite's server, as a user would set
    them; a bench must make its own bucket there and leave the suite's alone."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.put_object(Bucket=s3_server.bucket, Key="not-the-bench/keep.txt", Body=b"keep")
    return client


def bucket_names(client) -> set[str]:
    return {b["Name"] for b in client.list_buckets()["Buckets"]}


def bench_rows() -> dict[str, int]:
    return {
        "findings": Finding.objects.count(),
        "runs": ReconciliationRun.objects.count(),
        "owned keys": OwnedKey.objects.count(),
        "steps": StepRecord.objects.count(),
        "tasks": TaskInstance.objects.count(),
        "audit entries": AuditEntry.objects.count(),
    }


def test_bench_reconcile_reports_its_figures_and_leaves_nothing_behind(endpoint, s3_server):
    buckets, sagas = bucket_names(endpoint), registry.names()
    configured = (settings.SAGAS_S3_BUCKET, settings.AWS_ENDPOINT_URL)
    out = StringIO()
    call_command("bench", "reconcile", "--objects", "300", "--json", stdout=out)
    figures = json.loads(out.getvalue())
    assert sorted(figures) == sorted([*KEYS, "findings"])
    assert figures["objects"] == 300
    assert figures["ratio"] > 0
    assert figures["listing_s"] > 0 and figures["reconcile_s"] > 0
    assert figures["peak_rss_mib"] > 0 and figures["python_peak_mib"] > 0
    found = figures["findings"]
    # Every object was just put: the 150 not owned are orphans within the grace.
    assert found["orphan_object"] + found["recent_orphan"] == 150
    assert found["missing_object"] == found["stuck_task"] == found["stale_lock"] == 0
    assert bench_rows() == dict.fromkeys(bench_rows(), 0)
    assert bucket_names(endpoint) == buckets
    suite_keys = endpoint.list_objects_v2(Bucket=s3_server.bucket, Prefix="not-the-bench/")
    assert [o["Key"] for o in suite_keys["Contents"]] == ["not-the-bench/keep.txt"]
    assert registry.names() == sagas
    assert (settings.SAGAS_S3_BUCKET, settings.AWS_ENDPOINT_URL) == configured


def test_the_human_output_is_a_short_table(endpoint):
    out = StringIO()
    call_command("bench", "reconcile", "--objects", "20", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("bench reconcile: 20 objects (10 owned by 1 steps)")
    assert lines[2].split()[0] == "listing" and lines[3].split()[0] == "reconcile"
    assert any(line.startswith("ratio (reconcile / listing): ") for line in lines)
    assert TaskInstance.objects.count() == 0


def test_rows_and_objects_are_removed_when_the_measurement_fails(endpoint, monkeypatch):
    buckets = bucket_names(endpoint)
    seen: dict[str, int] = {}

    def fail(name, saga, objects, report):
        seen.update(bench_rows())
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "_measure", fail)
    with pytest.raises(RuntimeError, match="measurement failed"):
        call_command("bench", "reconcile", "--objects", "40", "--json", stdout=StringIO())
    assert seen["owned keys"] == 20 and seen["tasks"] == seen["steps"] == 2
    assert bench_rows() == dict.fromkeys(bench_rows(), 0)
    assert bucket_names(endpoint) == buckets


@pytest.mark.parametrize("objects", ["0", "-5", "many", "1.5"])
def test_bad_objects_is_a_command_error_with_exit_code_2(objects):
    with pytest.raises(CommandError, match="--objects must be a whole number") as raised:
        call_command("bench", "reconcile", "--objects", objects)
    assert raised.value.returncode == 2
    assert "\n" not in str(raised.value)
