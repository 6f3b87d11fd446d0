"""Who may call what: 401 without credentials, 403 without the permission, by session or
token; revoked tokens; CSRF enforced for sessions and not needed with a token."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from sagas.models import ApiToken, TaskInstance, token_digest
from sagas.services import start
from tests.api.conftest import ALL_PERMISSIONS, ApiClient, issue_token, row_counts

pytestmark = pytest.mark.django_db

CSRF_SECRET = "a" * 32

# endpoint -> (method, path, body, permission it needs, status when allowed)
ENDPOINTS: dict[str, tuple[str, str, Any, str, int]] = {
    "list": ("GET", "/api/distributed-tasks/chaos/", None, "view_taskinstance", 200),
    "start": ("POST", "/api/distributed-tasks/chaos/", {"input": {}}, "add_taskinstance", 201),
    "read": ("GET", "/api/distributed-tasks/chaos/{task}", None, "view_taskinstance", 200),
    "cancel": ("DELETE", "/api/distributed-tasks/chaos/{task}", None, "cancel_taskinstance", 202),
    "health detail": ("GET", "/api/health?detail=1", None, "view_taskinstance", 200),
}
OTHER_PERMISSIONS = {
    name: tuple(p for p in ALL_PERMISSIONS if p != needed)
    for name, (_, _, _, needed, _) in ENDPOINTS.items()
}


@pytest.fixture
def chaos_task():
    task, _ = start("chaos", {})
    return task


def call(client: ApiClient, endpoint: str, task, **kwargs):
    method, path, body, _, _ = ENDPOINTS[endpoint]
    return client.request(method, path.format(task=task.pk), body, **kwargs)


def with_csrf(client: ApiClient) -> dict[str, str]:
    client.client.cookies["csrftoken"] = CSRF_SECRET
    return {"X-CSRFToken": CSRF_SECRET}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_without_credentials_every_endpoint_is_401(anonymous, chaos_task, endpoint):
    counts = row_counts()
    response = call(anonymous, endpoint, chaos_task)
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert row_counts() == counts


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("by", ["session", "token"])
def test_without_the_permission_every_endpoint_is_403(
    make_user, session_client, token_client, chaos_task, endpoint, by
):
    user = make_user("nobody", *OTHER_PERMISSIONS[endpoint])
    client = session_client(user) if by == "session" else token_client(user)
    headers = with_csrf(client) if by == "session" else {}
    counts = row_counts()
    response = call(client, endpoint, chaos_task, headers=headers)
    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    assert row_counts() == counts


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("by", ["session", "token"])
def test_with_just_the_permission_every_endpoint_answers(
    make_user, session_client, token_client, chaos_task, endpoint, by
):
    user = make_user("allowed", ENDPOINTS[endpoint][3])
    client = session_client(user) if by == "session" else token_client(user)
    headers = with_csrf(client) if by == "session" else {}
    response = call(client, endpoint, chaos_task, headers=headers)
    assert response.status_code == ENDPOINTS[endpoint][4]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_revoked_token_is_401_everywhere(make_user, token_client, chaos_task, endpoint):
    client = token_client(make_user("leaver", *ALL_PERMISSIONS))
    ApiToken.objects.get().revoke()
    counts = row_counts()
    response = call(client, endpoint, chaos_task)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert row_counts() == counts


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sgs_not-a-real-token",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "sgs_only-the-token",
    ],
)
def test_a_bad_authorization_header_is_401_even_with_a_session(
    make_user, session_client, chaos_task, authorization
):
    client = session_client(make_user("mixed", *ALL_PERMISSIONS))
    response = call(client, "list", chaos_task, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_a_token_of_an_inactive_user_is_401(make_user, token_client, chaos_task):
    user = make_user("gone", *ALL_PERMISSIONS)
    client = token_client(user)
    user.is_active = False
    user.save()
    assert call(client, "list", chaos_task).status_code == 401


def test_a_token_acts_as_its_user_and_records_its_last_use(make_user, token_client, chaos_task):
    user = make_user("robot", *ALL_PERMISSIONS)
    client = token_client(user)
    assert ApiToken.objects.get().last_used_at is None
    response = call(client, "start", chaos_task)
    task = TaskInstance.objects.get(pk=response.json()["id"])
    assert task.audit_entries.get(action="started").actor == user
    assert ApiToken.objects.get().last_used_at is not None


def test_only_the_hash_and_a_prefix_of_a_token_are_stored(make_user):
    plain = issue_token(make_user("hashed"))
    token = ApiToken.objects.get()
    assert token.key_hash == token_digest(plain) != plain
    assert plain.startswith(token.prefix) and len(token.prefix) < len(plain) // 3
    assert token.is_active
    assert token.revoke() and not token.revoke()
    assert token.revoked_at is not None and token.revoked_at <= timezone.now()


# --- CSRF ----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["start", "cancel"])
def test_a_session_request_that_changes_data_needs_the_csrf_token(
    make_user, session_client, chaos_task, endpoint
):
    client = session_client(make_user("clicker", *ALL_PERMISSIONS))
    counts = row_counts()
    response = call(client, endpoint, chaos_task)
    assert response.status_code == 403
    assert response.json()["error"] == "csrf_failed"
    assert row_counts() == counts
    assert call(client, endpoint, chaos_task, headers=with_csrf(client)).status_code in (201, 202)


def test_a_wrong_csrf_token_is_refused(make_user, session_client, chaos_task):
    client = session_client(make_user("clicker", *ALL_PERMISSIONS))
    client.client.cookies["csrftoken"] = CSRF_SECRET
    response = call(client, "start", chaos_task, headers={"X-CSRFToken": "b" * 32})
    assert (response.status_code, response.json()["error"]) == (403, "csrf_failed")


def test_a_session_read_needs_no_csrf_token(make_user, session_client, chaos_task):
    client = session_client(make_user("reader", *ALL_PERMISSIONS))
    assert call(client, "read", chaos_task).status_code == 200


@pytest.mark.parametrize("endpoint", ["start", "cancel"])
def test_a_bearer_token_needs_no_csrf_token(make_user, token_client, chaos_task, endpoint):
    client = token_client(make_user("robot", *ALL_PERMISSIONS), csrf_checks=True)
    assert call(client, endpoint, chaos_task).status_code in (201, 202)


def test_the_csrf_failure_page_outside_the_api_is_still_django_html(make_user, session_client):
    client = session_client(make_user("staff", is_staff=True)).client
    response = client.post("/admin/logout/")
    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")
