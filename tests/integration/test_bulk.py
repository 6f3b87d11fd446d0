"""Bulk cancel, resolve and redrive from the task list: confirmation, background job,
resume after a lost job, progress page, permissions and CSRF."""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from redis.exceptions import RedisError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from sagas import bulk
from sagas.engine.connection import queue, redis
from sagas.models import AuditEntry, BulkOperation, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.engine.conftest import drain, hold_reaper

CHANGELIST = reverse("admin:sagas_taskinstance_changelist")
VIEW_PERMS = ["view_taskinstance", "view_steprecord", "view_auditentry"]
ACT_PERMS = ["cancel_taskinstance", "resolve_taskinstance", "redrive_taskinstance"]

pytestmark = pytest.mark.usefixtures("empty_redis")


def make_user(django_user_model, name, codenames):
    user = django_user_model.objects.create_user(name, password=f"pw-{name}-123", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="sagas", codename__in=codenames)
    )
    return user


@pytest.fixture
def lead(django_user_model):
    """An operator with every bulk action's permission."""
    return make_user(django_user_model, "lead", VIEW_PERMS + ACT_PERMS)


@pytest.fixture
def lead_client(client, lead):
    client.force_login(lead)
    return client


def pending_tasks(n, saga="chaos"):
    return [start(saga, {} if saga == "chaos" else {"files": {"a.txt": "a"}})[0] for _ in range(n)]


def complete(task):
    transition(task, TaskStatus.RUNNING)
    transition(task, TaskStatus.COMPLETED)


def dead_letter(task):
    """Parked with its ``charge`` step failed, as retries exhausted with dead_letter leave it."""
    step = StepRecord.objects.get(task=task, name="charge")
    transition_step(step, StepStatus.RUNNING)
    transition_step(step, StepStatus.FAILED, fields={"error": "card declined"})
    transition(task, TaskStatus.DEAD_LETTERED)


def action_post(action, tasks, note=None, select_across=False):
    data = {
        "action": action,
        "_selected_action": [str(t.pk) for t in tasks],
        "select_across": "1" if select_across else "0",
    }
    if note is not None:
        data.update(post="yes", note=note)
    return data


def run_to_done(operation):
    """Call the job the way RQ would, run after run, until the operation has finished."""
    for _ in range(1000):
        operation.refresh_from_db()
        if operation.finished:
            return operation
        bulk.run_bulk(operation.pk, operation.run)
    raise AssertionError("the operation did not finish")


def statuses(tasks):
    rows = TaskInstance.objects.filter(pk__in=[t.pk for t in tasks]).values_list(
        "status", flat=True
    )
    return sorted(rows)


# --- confirmation -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_confirmation_page_shows_how_many_by_status_and_likely_skips(lead_client):
    tasks = pending_tasks(5)
    for task in tasks[:2]:
        complete(task)
    response = lead_client.post(CHANGELIST, action_post("cancel_tasks", tasks))
    assert response.status_code == 200
    page = response.content.decode()
    assert re.search(r'id="bulk-count">5<', page)
    table = page.split('id="bulk-by-status"')[1].split("</table>")[0]
    assert re.search(r"completed</span></td><td>2</td><td>2</td>", table)
    assert re.search(r"pending</span></td><td>3</td><td>0</td>", table)
    assert "2 tasks will likely be skipped" in page
    assert 'name="csrfmiddlewaretoken"' in page and 'name="note"' in page
    assert 'name="action" value="cancel_tasks"' in page and 'value="yes"' in page
    assert "<script" not in page.split('id="content-main"')[1]  # CSP-clean: no inline script
    assert not BulkOperation.objects.exists()
    assert statuses(tasks) == ["completed"] * 2 + ["pending"] * 3


@pytest.mark.django_db
def test_resolve_without_a_note_is_refused_and_changes_nothing(lead_client):
    tasks = pending_tasks(3)
    for task in tasks:
        dead_letter(task)
    response = lead_client.post(CHANGELIST, action_post("resolve_tasks", tasks, note="   "))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Nothing changed: a note is required" in page
    assert "required>" in page  # the browser asks for it too
    assert not BulkOperation.objects.exists()
    assert statuses(tasks) == ["dead_lettered"] * 3
    assert not AuditEntry.objects.filter(action="resolved").exists()


@pytest.mark.django_db
def test_more_tasks_than_the_cap_are_refused_with_a_clear_message(lead_client, monkeypatch):
    monkeypatch.setattr(bulk, "MAX_TASKS", 3)
    tasks = pending_tasks(4)
    response = lead_client.post(CHANGELIST, action_post("cancel_tasks", tasks, select_across=True))
    page = response.content.decode()
    assert "More than 3 tasks are selected: narrow the filter" in page
    assert 'id="confirm-bulk"' not in page
    response = lead_client.post(CHANGELIST, action_post("cancel_tasks", tasks, "x", True))
    assert "Nothing changed: at most 3 tasks at once" in response.content.decode()
    assert not BulkOperation.objects.exists()
    assert statuses(tasks) == ["pending"] * 4


# --- the whole flow -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_bulk_cancel_of_a_filtered_set_audits_each_task_and_counts_the_skipped(
    lead_client, lead, monkeypatch
):
    monkeypatch.setattr(bulk, "BATCH_SIZE", 20)  # three runs, handing on twice
    chaos = pending_tasks(50)
    finished = chaos[:8]
    for task in finished:
        complete(task)
    outside = pending_tasks(2, saga="create-zip")  # not in the filter: never touched
    url = f"{CHANGELIST}?saga=chaos"
    # "Select all 50": the admin posts the page's ids plus select_across.
    response = lead_client.post(url, action_post("cancel_tasks", chaos[:3], select_across=True))
    assert re.search(r'id="bulk-count">50<', response.content.decode())
    confirm = action_post("cancel_tasks", chaos[:3], note="duplicate orders", select_across=True)
    response = lead_client.post(url, confirm)
    operation = BulkOperation.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("sagas-bulk-progress", args=[operation.pk])
    assert (operation.total, operation.status, operation.actor) == (50, "queued", lead)
    assert sorted(operation.target_ids) == sorted(str(t.pk) for t in chaos)

    operation = run_to_done(operation)
    assert (operation.status, operation.position, operation.run) == ("done", 50, 3)
    assert (operation.succeeded, operation.skipped, operation.failed) == (42, 8, 0)
    assert len(operation.skipped_examples) == bulk.SKIPPED_EXAMPLES - 2
    assert all(e.endswith(": already completed") for e in operation.skipped_examples)
    entries = AuditEntry.objects.filter(action="cancel_requested")
    assert sorted(str(e.task_id) for e in entries) == sorted(str(t.pk) for t in chaos[8:])
    assert {(e.actor, e.details["reason"]) for e in entries} == {(lead, "duplicate orders")}
    assert statuses(chaos) == ["cancelled"] * 42 + ["completed"] * 8
    assert statuses(outside) == ["pending"] * 2


@pytest.mark.django_db(transaction=True)
def test_the_job_goes_to_the_front_of_the_queue_with_a_timeout_and_runs_in_a_worker(
    lead_client, lead
):
    hold_reaper()
    tasks = pending_tasks(6)  # their first steps' jobs are queued already
    complete(tasks[0])
    assert queue().count >= 5
    response = lead_client.post(CHANGELIST, action_post("cancel_tasks", tasks, note="stop"))
    operation = BulkOperation.objects.get()
    assert response["Location"] == reverse("sagas-bulk-progress", args=[operation.pk])
    jid = bulk.job_id(operation.pk, 1)
    assert queue().job_ids[0] == jid
    job = Job.fetch(jid, connection=redis())
    assert (job.timeout, job.func_name) == (bulk.JOB_TIMEOUT_S, bulk.RUN_BULK)
    drain()
    operation.refresh_from_db()
    assert (operation.status, operation.succeeded, operation.skipped) == ("done", 5, 1)
    assert statuses(tasks) == ["cancelled"] * 5 + ["completed"]


@pytest.mark.django_db
def test_bulk_resolve_and_redrive_act_through_the_services_with_the_note(lead_client, lead):
    parked = pending_tasks(3)
    for task in parked:
        dead_letter(task)
    running = pending_tasks(1)[0]
    transition(running, TaskStatus.RUNNING)
    selection = [*parked[:2], running]
    lead_client.post(CHANGELIST, action_post("redrive_tasks", selection, note="card API fixed"))
    operation = run_to_done(BulkOperation.objects.get())
    assert (operation.succeeded, operation.skipped) == (2, 1)
    assert operation.skipped_examples == [
        f"{running.pk}: cannot redrive: it is running (only dead_lettered tasks can be)"
    ]
    redriven = AuditEntry.objects.filter(action="redriven")
    assert {(e.task_id, e.actor, e.details["reason"]) for e in redriven} == {
        (t.pk, lead, "card API fixed") for t in parked[:2]
    }
    lead_client.post(CHANGELIST, action_post("resolve_tasks", parked, note="refunded, OPS-7"))
    operation = run_to_done(BulkOperation.objects.latest("pk"))
    assert (operation.succeeded, operation.skipped) == (1, 2)  # two are running again
    entry = AuditEntry.objects.get(action="resolved")
    assert (entry.task_id, entry.actor, entry.details["note"]) == (
        parked[2].pk,
        lead,
        "refunded, OPS-7",
    )


# --- resuming -------------------------------------------------------------------------------


class HorseKilled(BaseException):
    """What a killed work horse looks like from inside: nothing after it runs."""


@pytest.mark.parametrize("interruption", [HorseKilled, JobTimeoutException])
@pytest.mark.django_db
def test_a_lost_job_is_resumed_at_its_position_and_no_task_is_acted_on_twice(
    lead, monkeypatch, django_capture_on_commit_callbacks, interruption
):
    monkeypatch.setattr(bulk, "BATCH_SIZE", 10)
    tasks = pending_tasks(30)
    operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "")
    calls = []
    cancel = bulk.ACTIONS["cancel"]

    def dies_at_the_13th(task_id, actor, note):
        calls.append(task_id)
        result = cancel(task_id, actor, note)  # acted on, then killed before committing
        if len(calls) == 13:
            raise interruption
        return result

    monkeypatch.setitem(bulk.ACTIONS, "cancel", dies_at_the_13th)
    bulk.run_bulk(operation.pk, 1)
    with pytest.raises(interruption):
        bulk.run_bulk(operation.pk, 2)
    operation.refresh_from_db()
    assert (operation.status, operation.position, operation.succeeded, operation.run) == (
        "running",
        12,
        12,
        2,
    )
    assert AuditEntry.objects.filter(action="cancel_requested").count() == 12
    assert TaskInstance.objects.get(pk=calls[12]).status == "pending"  # rolled back

    # Not stalled yet: it moved a moment ago.
    assert bulk.rescue_stalled(operation.pk) == []
    BulkOperation.objects.filter(pk=operation.pk).update(
        progressed_at=timezone.now() - bulk.STALL_AFTER - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert bulk.rescue_stalled(operation.pk) == [operation.pk]
    operation.refresh_from_db()
    assert (operation.run, operation.resumes, operation.resumed_from) == (3, 1, 12)
    job = Job.fetch(bulk.job_id(operation.pk, 3), connection=redis())
    assert job.args == (operation.pk, 3) and job.timeout == bulk.JOB_TIMEOUT_S
    assert queue().job_ids[0] == job.id

    monkeypatch.setitem(bulk.ACTIONS, "cancel", cancel)
    bulk.run_bulk(operation.pk, 2)  # the lost run, had it come back: fenced off
    assert BulkOperation.objects.get(pk=operation.pk).position == 12
    operation = run_to_done(operation)
    assert (operation.status, operation.position) == ("done", 30)
    assert (operation.succeeded, operation.skipped, operation.failed) == (30, 0, 0)
    entries = AuditEntry.objects.filter(action="cancel_requested")
    assert sorted(str(e.task_id) for e in entries) == sorted(str(t.pk) for t in tasks)
    assert statuses(tasks) == ["cancelled"] * 30


@pytest.mark.django_db
def test_a_job_lost_twice_at_one_task_gives_up_on_that_task_and_goes_on(lead):
    tasks = pending_tasks(3)
    operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "")
    stale = timezone.now() - bulk.STALL_AFTER - timedelta(seconds=1)
    rows = BulkOperation.objects.filter(pk=operation.pk)
    rows.update(status="running", position=1, progressed_at=stale)
    assert bulk.rescue_stalled() == [operation.pk]
    rows.update(progressed_at=stale)
    assert bulk.rescue_stalled() == [operation.pk]
    operation = run_to_done(operation)
    assert (operation.position, operation.failed, operation.succeeded) == (3, 1, 1)
    assert (
        operation.last_error == f"{tasks[1].pk}: its job was lost twice while at it; not acted on"
    )
    assert statuses(tasks) == ["cancelled", "pending", "pending"]


@pytest.mark.django_db
def test_redis_down_at_commit_leaves_the_operation_queued_for_the_rescue(
    lead, monkeypatch, django_capture_on_commit_callbacks
):
    class Down:
        def enqueue(self, *args, **kwargs):
            raise RedisError("connection refused")

    tasks = pending_tasks(2)
    monkeypatch.setattr(bulk, "queue", Down)
    with django_capture_on_commit_callbacks(execute=True):
        operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "")
    assert BulkOperation.objects.get(pk=operation.pk).status == "queued"
    monkeypatch.undo()
    BulkOperation.objects.filter(pk=operation.pk).update(
        progressed_at=timezone.now() - bulk.STALL_AFTER - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert bulk.rescue_stalled() == [operation.pk]
    assert queue().job_ids == [bulk.job_id(operation.pk, 2)]


# --- the progress page ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_progress_page_polls_until_done_then_answers_286(lead_client, lead):
    tasks = pending_tasks(4)
    complete(tasks[0])
    operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "dupes")
    url = reverse("sagas-bulk-progress", args=[operation.pk])
    page = lead_client.get(url).content.decode()
    assert 'hx-get="' + url + '"' in page and 'hx-trigger="every 1s"' in page
    assert "sagas-progress-0" in page and "dupes" in page
    partial = lead_client.get(url, HTTP_HX_REQUEST="true")
    assert partial.status_code == 200
    assert "<html" not in partial.content.decode()
    run_to_done(operation)
    partial = lead_client.get(url, HTTP_HX_REQUEST="true")
    assert partial.status_code == 286
    body = partial.content.decode()
    assert "sagas-progress-100" in body
    assert re.search(r'id="bulk-succeeded">3<', body) and re.search(r'id="bulk-skipped">1<', body)
    assert f"{tasks[0].pk}: already completed" in body
    page = lead_client.get(url).content.decode()
    assert "hx-get" not in page.split('id="content-main"')[1]


@pytest.mark.django_db
def test_the_progress_page_is_for_the_actor_and_holders_of_the_permission(
    client, lead, django_user_model
):
    tasks = pending_tasks(1)
    operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "")
    url = reverse("sagas-bulk-progress", args=[operation.pk])
    viewer = make_user(django_user_model, "viewer", VIEW_PERMS)
    client.force_login(viewer)
    assert client.get(url).status_code == 403
    other_operator = make_user(django_user_model, "other", [*VIEW_PERMS, "cancel_taskinstance"])
    client.force_login(other_operator)
    assert client.get(url).status_code == 200
    assert client.get(reverse("sagas-bulk-progress", args=[operation.pk + 1])).status_code == 404


# --- permissions and CSRF -----------------------------------------------------------------------


@pytest.mark.django_db
def test_without_the_permission_the_action_is_absent_and_a_forged_post_changes_nothing(
    client, django_user_model
):
    tasks = pending_tasks(3)
    for task in tasks[1:]:
        dead_letter(task)
    canceller = make_user(django_user_model, "canceller", [*VIEW_PERMS, "cancel_taskinstance"])
    client.force_login(canceller)
    page = client.get(CHANGELIST).content.decode()
    assert 'value="cancel_tasks"' in page
    assert 'value="resolve_tasks"' not in page and 'value="redrive_tasks"' not in page
    for action in ("resolve_tasks", "redrive_tasks"):
        response = client.post(CHANGELIST, action_post(action, tasks, note="forged"))
        assert response.status_code == 302  # the admin's "No action selected."
    viewer = make_user(django_user_model, "viewer", VIEW_PERMS)
    client.force_login(viewer)
    assert "cancel_tasks" not in client.get(CHANGELIST).content.decode()
    response = client.post(CHANGELIST, action_post("cancel_tasks", tasks, note="forged"))
    assert response.status_code == 403
    assert not BulkOperation.objects.exists()
    assert statuses(tasks) == ["dead_lettered"] * 2 + ["pending"]
    assert AuditEntry.objects.exclude(action__in=["started", "transition"]).count() == 0


@pytest.mark.django_db
def test_the_confirmation_post_needs_the_csrf_token(lead):
    tasks = pending_tasks(2)
    client = Client(enforce_csrf_checks=True)
    client.force_login(lead)
    client.get(CHANGELIST)  # sets the CSRF cookie, as a browser's first visit does
    response = client.post(CHANGELIST, action_post("cancel_tasks", tasks, note="x"))
    assert response.status_code == 403
    assert not BulkOperation.objects.exists()
    token = client.cookies["csrftoken"].value
    data = {**action_post("cancel_tasks", tasks, note="x"), "csrfmiddlewaretoken": token}
    response = client.post(CHANGELIST, data)
    assert response.status_code == 302
    assert BulkOperation.objects.get().total == 2


# --- Postgres: row locks decide between two jobs of one run ---------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_jobs_of_one_run_never_act_on_a_task_twice(lead):
    tasks = pending_tasks(60)
    operation = bulk.start_bulk("cancel", [t.pk for t in tasks], lead, "")
    BulkOperation.objects.filter(pk=operation.pk).update(status="running")
    barrier = threading.Barrier(2)
    errors = []

    def job():
        try:
            barrier.wait()
            bulk.run_bulk(operation.pk, 1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    operation.refresh_from_db()
    assert (operation.status, operation.position, operation.succeeded) == ("done", 60, 60)
    assert operation.skipped == 0
    entries = AuditEntry.objects.filter(action="cancel_requested")
    assert sorted(str(e.task_id) for e in entries) == sorted(str(t.pk) for t in tasks)
