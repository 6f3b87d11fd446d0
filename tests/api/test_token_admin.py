"""API tokens in the admin: created by staff with the permission, shown once, revoked."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from sagas.models import ApiToken
from tests.api.conftest import ALL_PERMISSIONS

pytestmark = pytest.mark.django_db

ADD = reverse("admin:sagas_apitoken_add")
CHANGELIST = reverse("admin:sagas_apitoken_changelist")
TOKEN = re.compile(r"sgs_[A-Za-z0-9_-]{43}")
TOKEN_ADMIN = ("add_apitoken", "change_apitoken", "view_apitoken")


@pytest.fixture
def staff(make_user, client):
    user = make_user("ops-lead", *TOKEN_ADMIN, *ALL_PERMISSIONS, is_staff=True)
    client.force_login(user)
    return user


def create_token(client, user, name="deploy bot"):
    return client.post(ADD, {"user": user.pk, "name": name}, follow=True)


def test_a_new_token_is_shown_once_and_then_works(client, staff):
    page = create_token(client, staff).content.decode()
    shown = TOKEN.findall(page)
    assert len(shown) == 1
    plain = shown[0]
    token = ApiToken.objects.get()
    assert (token.user, token.name, token.prefix) == (staff, "deploy bot", plain[:12])
    assert plain not in str(ApiToken.objects.values().get())
    assert not TOKEN.search(client.get(CHANGELIST).content.decode())
    detail = client.get(reverse("admin:sagas_apitoken_change", args=[token.pk])).content.decode()
    assert token.prefix in detail and token.key_hash not in detail and plain not in detail

    response = client.get(
        "/api/distributed-tasks/chaos/", headers={"Authorization": f"Bearer {plain}"}
    )
    assert response.status_code == 200


def test_staff_can_only_create_tokens_for_themselves(client, staff, make_user):
    boss = make_user("boss", is_superuser=True, is_staff=True)
    form = client.get(ADD).content.decode()
    assert "ops-lead" in form and "boss" not in form
    response = client.post(ADD, {"user": boss.pk, "name": "escalate"})
    assert response.status_code == 200  # the form again, with an error
    assert not ApiToken.objects.exists()


def test_a_superuser_may_create_a_token_for_someone_else(client, make_user):
    admin = make_user("root", is_superuser=True, is_staff=True)
    robot = make_user("robot")
    client.force_login(admin)
    create_token(client, robot)
    assert ApiToken.objects.get().user == robot


def test_staff_without_the_add_permission_cannot_create_tokens(client, make_user):
    client.force_login(make_user("viewer", "view_apitoken", is_staff=True))
    assert client.get(ADD).status_code == 403


def test_revoking_is_logged_and_the_token_stops_working(client, staff):
    plain = TOKEN.findall(create_token(client, staff).content.decode())[0]
    token = ApiToken.objects.get()
    response = client.post(
        CHANGELIST,
        {"action": "revoke_tokens", "_selected_action": [token.pk]},
        follow=True,
    )
    assert "Revoked 1 token(s)." in response.content.decode()
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert LogEntry.objects.filter(object_id=str(token.pk), change_message="Revoked").exists()
    api = client.get("/api/health?detail=1", headers={"Authorization": f"Bearer {plain}"})
    assert api.status_code == 401


def test_tokens_cannot_be_edited_or_deleted(client, staff):
    create_token(client, staff)
    token = ApiToken.objects.get()
    change = reverse("admin:sagas_apitoken_change", args=[token.pk])
    client.post(change, {"user": staff.pk, "name": "renamed"})
    assert ApiToken.objects.get().name == "deploy bot"
    delete = reverse("admin:sagas_apitoken_delete", args=[token.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert ApiToken.objects.exists()


def test_staff_see_only_their_own_tokens(client, staff, make_user):
    other = make_user("someone")
    theirs = ApiToken(user=other, name="theirs")
    theirs.generate_key()
    theirs.save()
    create_token(client, staff, name="mine")
    page = client.get(CHANGELIST).content.decode()
    assert "mine" in page and "theirs" not in page
