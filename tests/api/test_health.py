"""/api/health: a summary for anyone, the operators' detail behind the view permission."""

from __future__ import annotations

import time

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from redis import Redis
from rq import Queue

from sagas import health
from sagas.engine.connection import redis
from sagas.services import start
from sagas.states import TaskStatus
from sagas.transitions import transition

pytestmark = pytest.mark.django_db

HEALTH = "/api/health"


@pytest.fixture
def clean_redis():
    redis().flushdb()
    yield
    redis().flushdb()


@pytest.fixture
def operator_api(make_user, token_client):
    return token_client(make_user("watcher", "view_taskinstance"))


@pytest.fixture
def redis_down(monkeypatch):
    # Port 1: nothing listens there, so the probe fails at once (never the machine's Redis).
    monkeypatch.setattr(health, "redis", lambda: Redis.from_url("redis://127.0.0.1:1/0"))


def test_the_summary_needs_no_login(anonymous):
    response = anonymous.get(HEALTH)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert "no-store" in response["Cache-Control"]


def test_redis_down_is_a_503_naming_it(anonymous, redis_down):
    response = anonymous.get(HEALTH)
    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "failing": ["redis"]}


def test_database_down_is_a_503_naming_it(anonymous, monkeypatch):
    def refuse() -> None:
        raise DatabaseError("connection refused")

    monkeypatch.setitem(health.CHECKS, "database", refuse)
    response = anonymous.get(HEALTH)
    assert (response.status_code, response.json()["failing"]) == (503, ["database"])


def test_detail_without_credentials_is_401(anonymous):
    assert anonymous.get(HEALTH + "?detail=1").status_code == 401


def test_detail_without_the_view_permission_is_403(make_user, token_client):
    client = token_client(make_user("intern", "add_taskinstance"))
    assert client.get(HEALTH + "?detail=1").status_code == 403
    assert client.get(HEALTH).status_code == 200


def test_detail_shows_counts_queues_and_open_breakers(operator_api, clean_redis):
    running, _ = start("chaos", {})
    transition(running, TaskStatus.RUNNING)
    start("chaos", {})
    start("chaos", {})
    Queue("default", connection=redis()).enqueue("builtins.print", "queued by the health test")
    now = time.time()
    redis().hset("sagas:breaker:s3", mapping={"failures": 0, "open_until": now + 30})
    redis().hset("sagas:breaker:mail", mapping={"failures": 1, "open_until": now - 5})
    redis().set("sagas:breaker:s3:trial", "1")

    body = operator_api.get(HEALTH + "?detail=1").json()

    detail = body["detail"]
    assert detail["tasks_by_status"]["pending"] == 2
    assert detail["tasks_by_status"]["running"] == 1
    assert detail["tasks_by_status"]["cancelled"] == 0
    queue = detail["queues"]["default"]
    assert (queue["queued"], queue["scheduled"], queue["workers"]) == (1, 0, 0)
    assert 0 <= queue["oldest_queued_age_s"] < 60
    assert [b["name"] for b in detail["open_breakers"]] == ["s3"]


def test_detail_with_redis_down_still_counts_tasks(operator_api, redis_down):
    start("chaos", {})
    response = operator_api.get(HEALTH + "?detail=1")
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail["tasks_by_status"]["pending"] == 1
    assert (detail["queues"], detail["open_breakers"]) == (None, None)


def test_detail_counts_tasks_with_one_group_by(operator_api, clean_redis):
    with CaptureQueriesContext(connection) as queries:
        health.tasks_by_status()
    assert len(queries) == 1
    assert "GROUP BY" in queries[0]["sql"].upper()
    assert "COUNT" in queries[0]["sql"].upper()
