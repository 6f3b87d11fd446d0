"""Resolve, retry the compensation of and redrive a task through the HTTP API: the
operator actions of ``sagas.services`` with their permissions and pinned outcomes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User

from sagas.models import AuditEntry, TaskInstance
from sagas.services import start
from sagas.states import TaskStatus
from sagas.transitions import transition
from tests.api.conftest import row_counts, task_url
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db

JSON = "application/json"
CSRF_SECRET = "b" * 32
ACTIONS = ("resolve", "retry-compensation", "redrive")
OPERATOR_PERMISSIONS = ("view_taskinstance", "resolve_taskinstance", "redrive_taskinstance")


def action_url(task: Any, action: str, saga: str | None = None) -> str:
    return f"{task_url(task, saga)}/{action}"


def snapshot(task: TaskInstance) -> tuple[Any, ...]:
    """What an action that did nothing leaves exactly as it was."""
    fresh = TaskInstance.objects.get(pk=task.pk)
    return fresh.status, fresh.version, AuditEntry.objects.filter(task=task).count(), row_counts()


def parked(status: TaskStatus) -> TaskInstance:
    """A chaos task moved to ``status`` by hand: enough for the checks made before the
    action itself (its steps stay as the start left them)."""
    task, _ = start("chaos", {})
    transition(task, TaskStatus.RUNNING)
    if status == TaskStatus.COMPENSATION_FAILED:
        transition(task, TaskStatus.COMPENSATING)
    transition(task, status)
    return task


def ran_to(status: str, chaos_input: dict[str, Any]) -> TaskInstance:
    """A chaos task run to its end by in-process workers; it must end in ``status``."""
    task, _ = start("chaos", chaos_input)
    task = run_to_end(task)
    assert task.status == status
    return task


@pytest.fixture
def operator_api(make_user, token_client):
    """A token client whose user may see, resolve, retry compensations and redrive."""
    return token_client(make_user("night-shift", *OPERATOR_PERMISSIONS))


# --- success -------------------------------------------------------------------------


def test_resolve_closes_a_failed_task_and_answers_with_the_task(operator_api):
    task = parked(TaskStatus.FAILED)
    response = operator_api.post(action_url(task, "resolve"), {"note": "refunded, OPS-12"})
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["saga"], body["status"]) == (str(task.pk), "chaos", "resolved")
    assert body == operator_api.get(task_url(task)).json()
    task.refresh_from_db()
    user = User.objects.get(username="night-shift")
    assert (task.status, task.resolved_by, task.resolution_note) == (
        "resolved",
        user,
        "refunded, OPS-12",
    )
    entry = AuditEntry.objects.get(task=task, action="resolved")
    assert (entry.actor_name, entry.actor, entry.details["note"]) == (
        "night-shift",
        user,
        "refunded, OPS-12",
    )
    assert (entry.from_status, entry.to_status) == ("failed", "resolved")


def test_resolve_by_session_acts_as_the_logged_in_user(make_user, session_client):
    user = make_user("console-user", "resolve_taskinstance")
    client = session_client(user)
    client.client.cookies["csrftoken"] = CSRF_SECRET
    task = parked(TaskStatus.DEAD_LETTERED)
    response = client.post(
        action_url(task, "resolve"), {"note": "done by hand"}, headers={"X-CSRFToken": CSRF_SECRET}
    )
    assert (response.status_code, response.json()["status"]) == (200, "resolved")
    entry = AuditEntry.objects.get(task=task, action="resolved")
    assert (entry.actor, entry.details["note"]) == (user, "done by hand")


@pytest.mark.django_db(transaction=True)
def test_retry_compensation_resumes_the_undo(operator_api, empty_redis):
    # reserve's first three undo attempts fail: exactly its budget, so the retry succeeds.
    task = ran_to(
        "compensation_failed", {"fail": {"ship": -1}, "fail_compensation": {"reserve": 3}}
    )
    response = operator_api.post(action_url(task, "retry-compensation"), {"note": "S3 is back"})
    assert response.status_code == 200
    assert response.json()["status"] == "compensating"
    steps = {step["name"]: step for step in response.json()["steps"]}
    assert steps["reserve"]["status"] == "compensating"
    entry = AuditEntry.objects.get(task=task, action="compensation_retried")
    assert (entry.actor_name, entry.details["reason"]) == ("night-shift", "S3 is back")
    assert (entry.from_status, entry.to_status) == ("compensation_failed", "compensating")
    assert run_to_end(task).status == "compensated"


@pytest.mark.django_db(transaction=True)
def test_redrive_retries_the_dead_lettered_step(operator_api, empty_redis):
    task = ran_to("dead_lettered", {"fail": {"charge": 4}, "on_exhausted": "dead_letter"})
    response = operator_api.post(action_url(task, "redrive"), {"note": "card processor fixed"})
    assert response.status_code == 200
    assert response.json()["status"] == "running"
    entry = AuditEntry.objects.get(task=task, action="redriven")
    assert (entry.actor_name, entry.details["reason"]) == ("night-shift", "card processor fixed")
    assert (entry.from_status, entry.to_status) == ("dead_lettered", "running")
    assert run_to_end(task).status == "completed"


# --- refused: the status does not allow it -------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.RUNNING])
def test_an_active_task_is_409_not_allowed_and_unchanged(operator_api, action, status):
    task, _ = start("chaos", {})
    if status == TaskStatus.RUNNING:
        transition(task, TaskStatus.RUNNING)
    before = snapshot(task)
    response = operator_api.post(action_url(task, action), {"note": "try"})
    assert response.status_code == 409
    body = response.json()
    assert (body["outcome"], body["status"], body["error"]) == (
        "not_allowed",
        status,
        "not_allowed",
    )
    assert str(task.pk) in body["detail"]
    assert snapshot(task) == before


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("resolve", TaskStatus.RESOLVED),
        ("retry-compensation", TaskStatus.FAILED),
        ("redrive", TaskStatus.FAILED),
        ("redrive", TaskStatus.COMPENSATION_FAILED),
    ],
)
def test_a_task_parked_for_another_action_is_409(operator_api, action, status):
    task = parked(TaskStatus.FAILED if status == TaskStatus.RESOLVED else status)
    if status == TaskStatus.RESOLVED:
        transition(task, TaskStatus.RESOLVED)
    before = snapshot(task)
    response = operator_api.post(action_url(task, action), {"note": "try"})
    assert (response.status_code, response.json()["status"]) == (409, status)
    assert snapshot(task) == before


# --- bad requests --------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(
    "raw",
    [
        "",
        "{}",
        '{"note": ""}',
        '{"note": "   \\n"}',
        '{"note": null}',
        '{"note": 42}',
        '{"note": ["fixed"]}',
        '{"note": {"text": "fixed"}}',
        '{"note": "fixed", "reason": "also"}',
        '["fixed"]',
        '"fixed"',
        "null",
        "{not json",
    ],
)
def test_a_missing_or_bad_note_or_body_is_400_and_changes_nothing(operator_api, action, raw):
    task = parked(TaskStatus.DEAD_LETTERED)
    before = snapshot(task)
    # CONTENT_TYPE by hand: the test client leaves it out when the body is empty.
    response = operator_api.post(action_url(task, action), raw=raw, CONTENT_TYPE=JSON)
    assert response.status_code == 400
    assert response.json()["error"] in {"invalid_body", "invalid_json"}
    assert response.json()["detail"]
    assert snapshot(task) == before


def test_a_note_over_2000_characters_is_400(operator_api):
    task = parked(TaskStatus.FAILED)
    response = operator_api.post(action_url(task, "resolve"), {"note": "x" * 2001})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_body")
    assert TaskInstance.objects.get(pk=task.pk).status == "failed"


def test_a_body_that_is_not_json_typed_is_415(operator_api):
    task = parked(TaskStatus.FAILED)
    response = operator_api.post(
        action_url(task, "resolve"), raw="note=fixed", content_type="text/plain"
    )
    assert response.status_code == 415
    assert TaskInstance.objects.get(pk=task.pk).status == "failed"


# --- who may act ---------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
def test_without_credentials_it_is_401_and_nothing_changes(anonymous, action):
    task = parked(TaskStatus.DEAD_LETTERED)
    before = snapshot(task)
    response = anonymous.post(action_url(task, action), {"note": "sneaky"})
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert snapshot(task) == before


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("resolve", TaskStatus.DEAD_LETTERED),
        ("retry-compensation", TaskStatus.COMPENSATION_FAILED),
        ("redrive", TaskStatus.DEAD_LETTERED),
    ],
)
def test_a_viewer_is_403_and_nothing_changes(make_user, token_client, action, status):
    viewer = token_client(make_user("viewer", "view_taskinstance", "cancel_taskinstance"))
    task = parked(status)
    before = snapshot(task)
    response = viewer.post(action_url(task, action), {"note": "not mine to do"})
    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    assert snapshot(task) == before
    assert not AuditEntry.objects.filter(task=task, actor__username="viewer").exists()


@pytest.mark.parametrize(
    ("granted", "action"),
    [
        ("resolve_taskinstance", "redrive"),
        ("redrive_taskinstance", "resolve"),
        ("redrive_taskinstance", "retry-compensation"),
    ],
)
def test_each_action_needs_its_own_permission(make_user, token_client, granted, action):
    client = token_client(make_user("half-operator", "view_taskinstance", granted))
    task = parked(TaskStatus.DEAD_LETTERED)
    before = snapshot(task)
    response = client.post(action_url(task, action), {"note": "x"})
    assert response.status_code == 403
    assert (
        f"sagas.{'redrive' if action == 'redrive' else 'resolve'}_taskinstance"
        in (response.json()["detail"])
    )
    assert snapshot(task) == before


def test_a_session_request_without_the_csrf_token_is_403(make_user, session_client):
    client = session_client(make_user("console-user", *OPERATOR_PERMISSIONS))
    task = parked(TaskStatus.FAILED)
    before = snapshot(task)
    response = client.post(action_url(task, "resolve"), {"note": "no token"})
    assert (response.status_code, response.json()["error"]) == (403, "csrf_failed")
    assert snapshot(task) == before


# --- not found and other methods -----------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-uuid", "1234"])
def test_an_unknown_task_is_404_not_found(operator_api, action, task_id):
    counts = row_counts()
    response = operator_api.post(f"/api/distributed-tasks/chaos/{task_id}/{action}", {"note": "x"})
    assert response.status_code == 404
    assert (response.json()["outcome"], response.json()["error"]) == ("not_found", "not_found")
    assert row_counts() == counts


@pytest.mark.parametrize("action", ACTIONS)
def test_a_task_of_another_saga_is_not_found_there(operator_api, action):
    task = parked(TaskStatus.DEAD_LETTERED)
    before = snapshot(task)
    response = operator_api.post(action_url(task, action, saga="create-zip"), {"note": "x"})
    assert response.status_code == 404
    assert response.json()["outcome"] == "not_found"
    assert snapshot(task) == before


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow_post(operator_api, action, method):
    task = parked(TaskStatus.DEAD_LETTERED)
    before = snapshot(task)
    response = operator_api.request(method, action_url(task, action), {"note": "x"})
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert response["Allow"] == "POST"
    assert snapshot(task) == before


@pytest.mark.parametrize("action", ACTIONS)
def test_a_trailing_slash_is_a_json_404(operator_api, action):
    task = parked(TaskStatus.DEAD_LETTERED)
    response = operator_api.post(action_url(task, action) + "/", {"note": "x"})
    assert (response.status_code, response.json()["error"]) == (404, "not_found")
    assert TaskInstance.objects.get(pk=task.pk).status == "dead_lettered"
