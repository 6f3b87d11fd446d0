"""The reaper at scale (Postgres): its candidate queries use their partial indexes, and a
pass costs what the tasks that need help cost, not what the active ones do.

CI builds ~100k tasks (300k steps and attempts); ``FLEET_TASKS`` makes it bigger for the
one-off measurement reported in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from rq.job import Job

from sagas.engine import apply, reaper
from sagas.engine.connection import redis
from sagas.models import TaskInstance
from tests.engine.conftest import reaper_watching
from tests.engine.fleet import build_fleet

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

FLEET_TASKS = int(os.environ.get("FLEET_TASKS", "100000"))


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def explained(queryset: Any) -> list[dict[str, Any]]:
    """The executed plan's nodes (EXPLAIN ANALYZE, so sorts report where they spilled)."""
    raw = queryset.explain(format="json", analyze=True, buffers=True)
    return plan_nodes(json.loads(raw)[0]["Plan"])


def assert_indexed(queryset: Any, index: str) -> None:
    nodes = explained(queryset)
    kinds = {n["Node Type"] for n in nodes}
    assert "Seq Scan" not in kinds, nodes
    assert index in {n.get("Index Name") for n in nodes}, nodes
    for node in nodes:
        assert node.get("Sort Space Type") != "Disk", node


def reaper_statements(**kwargs: Any) -> int:
    with CaptureQueriesContext(connection) as queries:
        report = reap_once(**kwargs)
    assert report is not None
    return len(queries.captured_queries)


def reap_once(**kwargs: Any) -> reaper.ReapReport | None:
    return reaper.reap(force=True, **kwargs)


def test_candidate_queries_use_their_partial_indexes_and_never_spill():
    build_fleet(FLEET_TASKS)
    now = apply.database_now()
    assert_indexed(reaper.lost_candidates(now, reaper.Cursor()), "attempt_running_hb_idx")
    assert_indexed(reaper.woken_candidates(now, reaper.Cursor()), "task_wake_idx")
    # The keyset pages after the first.
    after = reaper.Cursor(reaper.WOKEN, now.isoformat(), "00000000-0000-0000-0000-000000000000")
    assert_indexed(reaper.woken_candidates(now, after), "task_wake_idx")
    # A batch's rows are read by task id (the steps' and attempts' own indexes).
    ids = list(TaskInstance.objects.filter(status="running").values_list("pk", flat=True)[:500])
    step_ids = [step.pk for step in apply.steps_of_tasks(ids)]
    for query in (apply.steps_of_tasks(ids), apply.running_attempts(step_ids)):
        assert "Seq Scan" not in {n["Node Type"] for n in explained(query)}


def test_a_pass_over_an_idle_fleet_costs_the_same_whatever_its_size(settings):
    settings.SAGAS_REAPER_BATCH = 100
    build_fleet(FLEET_TASKS // 2)
    reaper_watching()
    active = TaskInstance.objects.exclude(status="completed").count()
    small = reaper_statements()
    build_fleet(FLEET_TASKS // 2, offset=FLEET_TASKS)
    assert TaskInstance.objects.exclude(status="completed").count() >= 2 * active - 2
    large = reaper_statements()
    assert small == large <= 4  # the clock, the expired heartbeats, the woken tasks


def test_a_pass_grows_with_the_tasks_that_need_a_look_not_with_the_active_ones(settings):
    settings.SAGAS_REAPER_BATCH = 100
    build_fleet(FLEET_TASKS // 2)
    reaper_watching()
    idle = reaper_statements()
    # 250 tasks whose retry job is scheduled, woken early (say a clock moved): each needs
    # a look at Redis, none needs a change.
    woken = list(
        TaskInstance.objects.filter(status="waiting_retry").values_list("pk", flat=True)[:250]
    )
    TaskInstance.objects.filter(pk__in=woken).update(wake_at=Now() - timedelta(minutes=1))
    with redis().pipeline() as pipe:
        for pk in woken:
            pipe.hset(Job.key_for(f"saga-{pk}-charge-a2"), "status", "scheduled")
        pipe.execute()
    looked = reaper_statements()
    batches = math.ceil(len(woken) / settings.SAGAS_REAPER_BATCH)
    # Per batch: the clock, the woken page, its tasks, steps and running attempts, one
    # postponing UPDATE; nothing locked, nothing rewritten task by task.
    assert looked <= idle + 6 * batches
    assert not TaskInstance.objects.filter(pk__in=woken, wake_at__lt=Now()).exists()
    assert reaper_statements() == idle  # postponed: the next pass is idle again
