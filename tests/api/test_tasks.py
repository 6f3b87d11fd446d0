"""Start, read, list and cancel through the HTTP API: the happy paths and pinned outcomes."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sagas.engine.connection import redis
from sagas.models import AuditEntry, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import TaskStatus
from sagas.transitions import transition
from tests.api.conftest import row_counts, task_url, tasks_url
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db


# --- start ---------------------------------------------------------------------------


def test_post_starts_a_task_as_the_calling_user(api):
    response = api.post(
        tasks_url(),
        {"input": {"fail": {"charge": 1}}, "business_key": "order-1", "correlation_id": "c-1"},
    )
    assert response.status_code == 201
    body = response.json()
    task = TaskInstance.objects.get(pk=body["id"])
    assert body == {"id": str(task.pk), "status": "pending"}
    assert response["Location"] == task_url(task)
    assert (task.input, task.business_key, task.correlation_id) == (
        {"fail": {"charge": 1}},
        "order-1",
        "c-1",
    )
    started = AuditEntry.objects.get(task=task, action="started")
    assert started.actor_name == "integrator"


def test_a_business_key_replay_returns_the_same_task_with_200(api):
    first = api.post(tasks_url(), {"input": {}, "business_key": "order-2"}).json()
    counts = row_counts()
    replay = api.post(tasks_url(), {"input": {}, "business_key": "order-2"})
    assert replay.status_code == 200
    assert replay.json() == first
    assert row_counts() == counts


def test_a_business_key_used_with_another_input_is_a_conflict(api):
    api.post(tasks_url(), {"input": {}, "business_key": "order-3"})
    counts = row_counts()
    response = api.post(tasks_url(), {"input": {"fail": {"ship": 1}}, "business_key": "order-3"})
    assert response.status_code == 409
    assert response.json()["outcome"] == "business_key_conflict"
    assert response.json()["error"] == "business_key_conflict"
    assert row_counts() == counts


def test_input_the_saga_rejects_is_a_400_with_its_messages(api):
    response = api.post(tasks_url(), {"input": {"fail": {"nope": 1}, "color": "red"}})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_input"
    assert "fail: unknown step 'nope'" in body["messages"]
    assert "unknown input key 'color'" in body["messages"]
    assert TaskInstance.objects.count() == 0


# --- read ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_get_returns_the_task_its_steps_and_their_attempts(api):
    redis().flushdb()
    task_id = api.post(tasks_url(), {"input": {"fail": {"charge": 1}}}).json()["id"]
    run_to_end(TaskInstance.objects.get(pk=task_id))
    body = api.get(task_url(task_id, "chaos")).json()
    assert (body["id"], body["saga"], body["status"]) == (task_id, "chaos", "completed")
    assert body["input"] == {"fail": {"charge": 1}}
    assert len(body["trace_id"]) == 32
    assert body["created_at"] and body["finished_at"]
    steps = {step["name"]: step for step in body["steps"]}
    assert [s["name"] for s in body["steps"]] == ["reserve", "charge", "ship"]
    charge = steps["charge"]
    assert (charge["status"], charge["attempt_count"], charge["progress"]) == ("succeeded", 2, 100)
    assert [(a["kind"], a["number"], a["outcome"]) for a in charge["attempts"]] == [
        ("action", 1, "failed"),
        ("action", 2, "succeeded"),
    ]
    assert charge["attempts"][0]["error"]
    assert charge["attempts"][1]["worker"]
    redis().flushdb()


def test_get_reads_with_a_fixed_number_of_queries(api):
    task, _ = start("chaos", {})
    api.get(task_url(task))  # the token's first use is recorded once a minute at most
    with CaptureQueriesContext(connection) as queries:
        assert api.get(task_url(task)).status_code == 200
    # token + user, task, steps, attempts; permissions are cached per user object
    assert len(queries) <= 6, [q["sql"] for q in queries]


def test_a_task_of_another_saga_is_not_found_there(api):
    task, _ = start("create-zip", {"files": {"a.txt": "a"}})
    response = api.get(task_url(task, saga="chaos"))
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --- list ----------------------------------------------------------------------------


def test_list_is_newest_first_and_filters(api):
    older, _ = start("chaos", {}, business_key="a", correlation_id="batch-1")
    newer, _ = start("chaos", {}, business_key="b", correlation_id="batch-1")
    start("create-zip", {"files": {"a.txt": "a"}}, correlation_id="batch-1")
    transition(newer, TaskStatus.RUNNING)
    ids = [t["id"] for t in api.get(tasks_url()).json()["results"]]
    assert ids == [str(newer.pk), str(older.pk)]
    by_status = api.get(tasks_url() + "?status=running").json()
    assert [t["id"] for t in by_status["results"]] == [str(newer.pk)]
    by_key = api.get(tasks_url() + "?business_key=a").json()["results"]
    assert [t["id"] for t in by_key] == [str(older.pk)]
    by_correlation = api.get(tasks_url() + "?correlation_id=batch-1").json()["results"]
    assert len(by_correlation) == 2
    summary = by_key[0]
    assert "input" not in summary and "steps" not in summary
    assert (summary["saga"], summary["status"]) == ("chaos", "pending")


def test_keyset_pagination_walks_every_task_once_even_with_equal_timestamps(api):
    tasks = [start("chaos", {})[0] for _ in range(23)]
    # Ten tasks share one created_at: the id breaks the tie, so none is skipped or repeated.
    TaskInstance.objects.filter(pk__in=[t.pk for t in tasks[5:15]]).update(
        created_at=tasks[5].created_at
    )
    expected = list(
        TaskInstance.objects.order_by("-created_at", "-id").values_list("id", flat=True)
    )
    seen, cursor, pages = [], None, 0
    while True:
        query = "?limit=5" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(tasks_url() + query).json()
        seen += [uuid.UUID(t["id"]) for t in page["results"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == expected
    assert pages == 5


def test_a_full_last_page_has_no_next_cursor(api):
    for _ in range(4):
        start("chaos", {})
    page = api.get(tasks_url() + "?limit=4").json()
    assert len(page["results"]) == 4
    assert page["next"] is None


def test_pagination_combines_with_filters(api):
    for n in range(6):
        task, _ = start("chaos", {}, business_key=f"k{n}")
        if n % 2:
            transition(task, TaskStatus.RUNNING)
    first = api.get(tasks_url() + "?status=running&limit=2").json()
    second = api.get(tasks_url() + f"?status=running&limit=2&cursor={first['next']}").json()
    keys = [t["business_key"] for t in first["results"] + second["results"]]
    assert keys == ["k5", "k3", "k1"]
    assert second["next"] is None


def test_listing_runs_no_count_query(api):
    for _ in range(3):
        start("chaos", {})
    with CaptureQueriesContext(connection) as queries:
        assert api.get(tasks_url() + "?limit=2").status_code == 200
    assert not [q for q in queries if "COUNT(" in q["sql"].upper()]


def test_tasks_of_a_saga_no_longer_registered_can_still_be_listed_and_read(api):
    task = TaskInstance.objects.create(saga="retired", input={}, trace_id="0" * 32)
    listed = api.get(tasks_url("retired")).json()["results"]
    assert [t["id"] for t in listed] == [str(task.pk)]
    assert api.get(task_url(task)).status_code == 200
    assert api.post(tasks_url("retired"), {"input": {}}).status_code == 404
    assert api.get(tasks_url("never-was")).json()["error"] == "unknown_saga"


# --- cancel --------------------------------------------------------------------------


def test_cancel_of_a_pending_task_then_again(api):
    task, _ = start("chaos", {})
    first = api.delete(task_url(task), {"reason": "customer called"})
    assert first.status_code == 202
    assert first.json() == {"outcome": "cancelled", "status": "cancelled"}
    again = api.delete(task_url(task))
    assert (again.status_code, again.json()) == (
        200,
        {"outcome": "already_cancelled", "status": "cancelled"},
    )
    requested = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert (requested.actor_name, requested.details["reason"]) == ("integrator", "customer called")


@pytest.mark.django_db(transaction=True)
def test_cancel_of_a_completed_task_is_409_already_completed(api):
    redis().flushdb()
    task, _ = start("chaos", {})
    assert run_to_end(task).status == "completed"
    counts = row_counts()
    response = api.delete(task_url(task))
    assert response.status_code == 409
    assert response.json()["outcome"] == "already_completed"
    assert response.json()["status"] == "completed"
    assert row_counts() == counts
    redis().flushdb()


def test_cancel_of_a_failed_task_is_409_already_finished(api):
    task, _ = start("chaos", {})
    transition(task, TaskStatus.RUNNING)
    transition(task, TaskStatus.FAILED)
    response = api.delete(task_url(task))
    assert response.status_code == 409
    assert (response.json()["outcome"], response.json()["status"]) == ("already_finished", "failed")


def test_cancel_of_an_uncancellable_saga_is_409(api):
    task, _ = start("api-uncancellable", {})
    counts = row_counts()
    response = api.delete(task_url(task))
    assert response.status_code == 409
    assert response.json()["outcome"] == "not_cancellable"
    assert row_counts() == counts
    assert TaskInstance.objects.get(pk=task.pk).status == "pending"


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-uuid", "1234"])
def test_cancel_of_an_unknown_task_is_404_not_found(api, task_id):
    response = api.delete(f"/api/distributed-tasks/chaos/{task_id}")
    assert response.status_code == 404
    assert response.json()["outcome"] == "not_found"


def test_cancel_through_the_wrong_saga_is_404_and_cancels_nothing(api):
    task, _ = start("create-zip", {"files": {"a.txt": "a"}})
    response = api.delete(task_url(task, saga="chaos"))
    assert (response.status_code, response.json()["outcome"]) == (404, "not_found")
    assert TaskInstance.objects.get(pk=task.pk).status == "pending"
    assert not StepRecord.objects.filter(task=task).exclude(status="pending").exists()
