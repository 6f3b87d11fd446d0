"""One-off measurement of reaper passes over a big fleet (results in docs/BENCHMARKS.md).

    DATABASE_URL=postgres://.../scratch .venv/bin/python -m tests.engine.measure_reaper 1000000

It migrates the (scratch!) database, builds the fleet with tests/engine/fleet.py, starts a
private redis-server, and prints one JSON object: build time, an idle pass, a pass where
every waiting task was woken early, and EXPLAIN ANALYZE of the candidate queries next to
the query the reaper used before (all active tasks, joined to their steps).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsconsole.settings")
os.environ.setdefault("DJANGO_DEBUG", "1")


def main(count: int) -> dict[str, Any]:
    import django
    from django.conf import settings

    from sagas.embedded import EmbeddedRedis

    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="measure-redis-")))
    os.environ["REDIS_URL"] = server.url
    django.setup()
    settings.RQ_QUEUES["default"]["URL"] = server.url
    try:
        return _measure(count)
    finally:
        server.stop()


def _measure(count: int) -> dict[str, Any]:
    from django.core.management import call_command
    from django.db import connection
    from django.db.models import Q
    from django.db.models.functions import Now
    from django.test.utils import CaptureQueriesContext
    from rq.job import Job

    from sagas.engine import apply, reaper
    from sagas.engine.connection import redis
    from sagas.models import TaskInstance
    from sagas.states import ACTIVE_TASK_STATUSES
    from tests.engine.fleet import build_fleet

    call_command("migrate", verbosity=0)
    results: dict[str, Any] = {"tasks": count, "build_s": round(build_fleet(count), 1)}
    results["active"] = TaskInstance.objects.filter(status__in=ACTIVE_TASK_STATUSES).count()
    now = apply.database_now()
    results["lost_query_ms"] = _explain_ms(reaper.lost_candidates(now, reaper.Cursor()))
    results["woken_query_ms"] = _explain_ms(reaper.woken_candidates(now, reaper.Cursor()))
    old = TaskInstance.objects.filter(
        Q(status__in=ACTIVE_TASK_STATUSES) | Q(steps__compensate_alone=True),
        updated_at__lt=now,
    ).distinct()
    results["old_candidate_query_ms"] = _explain_ms(old)

    def timed_pass() -> dict[str, Any]:
        with CaptureQueriesContext(connection) as queries:
            began = time.perf_counter()
            report = reaper.reap(force=True)
            elapsed = time.perf_counter() - began
        assert report is not None
        return {"seconds": round(elapsed, 3), "statements": len(queries.captured_queries)}

    results["idle_pass"] = [timed_pass() for _ in range(3)]
    waiting = list(TaskInstance.objects.filter(status="waiting_retry").values_list("pk", flat=True))
    TaskInstance.objects.filter(pk__in=waiting).update(wake_at=Now())
    with redis().pipeline(transaction=False) as pipe:
        for pk in waiting:
            pipe.hset(Job.key_for(f"saga-{pk}-charge-a2"), "status", "scheduled")
        pipe.execute()
    results["woken_tasks"] = len(waiting)
    results["woken_pass"] = timed_pass()
    results["pass_after_it"] = timed_pass()
    return results


def _explain_ms(queryset: Any) -> float:
    raw = queryset.explain(format="json", analyze=True)
    return float(json.loads(raw)[0]["Execution Time"])


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000), indent=2))
