"""The read-only console: permission-checked, escaped, and searchable by exact keys."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from sagas.models import AuditEntry, StepAttempt, StepRecord
from sagas.services import start
from sagas.states import StepStatus, TaskStatus
from sagas.transitions import transition, transition_step

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:sagas_taskinstance_changelist")


def detail_url(task):
    return reverse("admin:sagas_taskinstance_change", args=[task.pk])


@pytest.fixture
def logged_in(client, operator):
    client.force_login(operator)
    return client


def test_anonymous_users_are_sent_to_the_login(client):
    response = client.get(CHANGELIST)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_the_view_permission_is_refused(client, django_user_model):
    staff = django_user_model.objects.create_user("intern", password="x", is_staff=True)
    client.force_login(staff)
    task, _ = start("chaos", {})
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(detail_url(task)).status_code == 403


def test_list_filters_by_status_and_saga(logged_in):
    chaos_task, _ = start("chaos", {})
    zip_task, _ = start("create-zip", {"files": {"a.txt": "a"}})
    transition(chaos_task, TaskStatus.RUNNING)
    page = logged_in.get(CHANGELIST, {"status__exact": "running"}).content.decode()
    assert str(chaos_task.pk)[:8] in page and str(zip_task.pk)[:8] not in page
    page = logged_in.get(CHANGELIST, {"saga": "create-zip"}).content.decode()
    assert str(zip_task.pk)[:8] in page and str(chaos_task.pk)[:8] not in page


@pytest.mark.parametrize("field", ["id", "business_key", "correlation_id"])
def test_search_finds_a_task_by_exact_key(logged_in, field):
    wanted, _ = start("chaos", {}, business_key="order-9", correlation_id="corr-9")
    other, _ = start("chaos", {}, business_key="order-10", correlation_id="corr-10")
    term = {"id": str(wanted.pk), "business_key": "order-9", "correlation_id": "corr-9"}[field]
    page = logged_in.get(CHANGELIST, {"q": term}).content.decode()
    assert str(wanted.pk)[:8] in page
    assert str(other.pk)[:8] not in page
    # Exact and case-sensitive, so the lookup is served by a plain b-tree index.
    page = logged_in.get(CHANGELIST, {"q": term.upper()}).content.decode()
    assert (str(wanted.pk)[:8] in page) is (field == "id")


def test_a_pending_task_without_attempts_renders(logged_in):
    task, _ = start("chaos", {})
    page = logged_in.get(detail_url(task)).content.decode()
    assert "No attempt yet." in page


def test_detail_shows_steps_attempts_and_audit_escaped(logged_in):
    hostile = "<script>alert('x')</script>"
    task, _ = start("chaos", {}, business_key=hostile)
    step = StepRecord.objects.get(task=task, name="reserve")
    transition(task, TaskStatus.RUNNING, fields={"current_step": "reserve"})
    transition_step(step, StepStatus.RUNNING)
    StepAttempt.objects.create(
        step=step, kind="action", number=1, outcome="failed", worker="w1", error=hostile
    )
    transition_step(step, StepStatus.FAILED, fields={"error": hostile})
    response = logged_in.get(detail_url(task))
    assert response.status_code == 200
    page = response.content.decode()
    assert hostile not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    for text in ("reserve", "charge", "ship", "pending", "running", "w1"):
        assert text in page
    # The audit trail is one plain table of the latest entries.
    assert re.search(r'id="task-audit".*<td>system</td><td>started</td>', page, re.S)


def test_nothing_can_be_added_changed_or_deleted(logged_in, operator):
    operator.is_superuser = True  # even a superuser gets a read-only console
    operator.save()
    task, _ = start("chaos", {})
    assert logged_in.get(reverse("admin:sagas_taskinstance_add")).status_code == 403
    assert (
        logged_in.get(reverse("admin:sagas_taskinstance_delete", args=[task.pk])).status_code == 403
    )
    response = logged_in.post(detail_url(task), {"saga": "other", "status": "completed"})
    assert response.status_code == 403
    entry = AuditEntry.objects.get(task=task)
    assert logged_in.get(reverse("admin:sagas_auditentry_add")).status_code == 403
    assert (
        logged_in.get(reverse("admin:sagas_auditentry_delete", args=[entry.pk])).status_code == 403
    )
    assert (
        logged_in.post(
            reverse("admin:sagas_auditentry_change", args=[entry.pk]), {"action": "x"}
        ).status_code
        == 403
    )
    task.refresh_from_db()
    assert (task.saga, task.status) == ("chaos", "pending")
    assert AuditEntry.objects.get(pk=entry.pk).action == "started"
