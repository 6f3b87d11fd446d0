"""What the console's pages say: counts, failure groups, what happens next, live polling."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from sagas import overview
from sagas.admin_common import CappedPaginator
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = reverse("admin:sagas_taskinstance_changelist")


def detail_url(task):
    return reverse("admin:sagas_taskinstance_change", args=[task.pk])


@pytest.fixture
def logged_in(client, operator):
    client.force_login(operator)
    return client


def parked(script):
    task, _ = start("chaos", script)
    return run_to_end(task)


def test_the_list_caps_its_count_instead_of_counting_millions(logged_in, monkeypatch):
    monkeypatch.setattr(CappedPaginator, "COUNT_CAP", 5)
    for _ in range(7):
        start("chaos", {})
    page = logged_in.get(CHANGELIST).content.decode()
    assert re.search(r'<span id="result-count">5\+</span>', page)
    page = logged_in.get(CHANGELIST, {"status__exact": "pending", "saga": "create-zip"})
    assert '<span id="result-count">0</span>' in page.content.decode()


def test_status_counts_are_exact_for_active_and_parked_tasks():
    for _ in range(3):
        start("chaos", {})
    running, _ = start("chaos", {})
    transition(running, TaskStatus.RUNNING)
    counts = {c.status: c for c in overview.status_counts()}
    assert (counts["pending"].count, counts["pending"].exact) == (3, True)
    assert counts["running"].count == 1
    assert counts["completed"].count == 0
    assert set(counts) == set(TaskStatus.values)


def test_the_inbox_groups_parked_tasks_by_saga_step_and_error(logged_in):
    for _ in range(2):
        parked({"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    parked({"fail": {"charge": -1}, "on_exhausted": "dead_letter"})
    groups = overview.inbox_groups()
    assert [(g.status, g.saga, g.step, g.error_type, g.count) for g in groups] == [
        ("compensation_failed", "chaos", "reserve", "ChaosFailure", 2),
        ("dead_lettered", "chaos", "charge", "ChaosFailure", 1),
    ]
    page = logged_in.get(reverse("sagas-inbox")).content.decode()
    assert "reserve" in page and "charge" in page
    # A group's link lists exactly its tasks.
    found = re.search(r'href="([^"]*failing_step=reserve[^"]*)"', page)
    assert found is not None
    link = found.group(1)
    listed = logged_in.get(link.replace("&amp;", "&")).content.decode()
    assert listed.count('class="sagas-status sagas-status-compensation_failed"') == 2


def test_a_compensation_failed_task_names_the_undo_that_needs_a_human(client, saga_operator):
    client.force_login(saga_operator)
    logged_in = client
    task = parked({"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    assert task.status == "compensation_failed"
    assert task.error_summary.startswith("compensation of reserve failed: ChaosFailure")
    page = logged_in.get(detail_url(task)).content.decode()
    assert "Needs a human: compensation of reserve failed" in page
    # The operator can act: resolve and retry compensation, with a note.
    assert 'id="action-resolve"' in page and 'id="action-retry-compensation"' in page
    assert 'id="action-redrive"' not in page and 'id="action-cancel"' not in page


def test_what_happens_next_for_a_waiting_retry(logged_in):
    task, _ = start("chaos", {})
    charge = StepRecord.objects.get(task=task, name="charge")
    transition(task, TaskStatus.RUNNING, fields={"current_step": "charge"})
    transition_step(charge, StepStatus.RUNNING, fields={"attempt_count": 2})
    at = timezone.now() + timedelta(minutes=5)
    transition_step(charge, StepStatus.WAITING_RETRY, fields={"next_attempt_at": at})
    page = logged_in.get(detail_url(task)).content.decode()
    when = timezone.localtime(at).strftime("%H:%M:%S")
    # chaos allows 4 attempts: the third leaves one retry.
    assert f"charge: attempt 3 at {when}, 1 retry left after it." in page


def test_a_running_step_shows_progress_and_who_runs_it(logged_in):
    task, _ = start("chaos", {})
    ship = StepRecord.objects.get(task=task, name="ship")
    transition(task, TaskStatus.RUNNING, fields={"current_step": "ship"})
    transition_step(ship, StepStatus.RUNNING, fields={"progress": 40})
    StepAttempt.objects.create(step=ship, kind="action", number=1, worker="host-7")
    page = logged_in.get(detail_url(task)).content.decode()
    assert re.search(r"ship: attempt 1 running on host-7 since \d\d:\d\d:\d\d, 40%", page)
    cell = logged_in.get(reverse("admin:sagas_task_progress", args=[task.pk]))
    assert cell.status_code == 200
    assert "40%" in cell.content.decode() and 'hx-trigger="every 2s"' in cell.content.decode()


def test_live_parts_stop_polling_once_the_task_is_finished(logged_in):
    task, _ = start("chaos", {})
    htmx = {"HTTP_HX_REQUEST": "true"}
    live = logged_in.get(detail_url(task), **htmx)
    assert live.status_code == 200 and 'id="task-live"' in live.content.decode()
    assert "<html" not in live.content.decode()  # only the partial
    task = run_to_end(task)
    assert task.status == "completed"
    assert logged_in.get(detail_url(task), **htmx).status_code == 286
    assert logged_in.get(reverse("admin:sagas_task_progress", args=[task.pk])).status_code == 286
    page = logged_in.get(detail_url(task)).content.decode()
    assert 'hx-trigger="every 2s"' not in page


def test_history_is_the_audit_trail(logged_in):
    task, _ = start("chaos", {})
    other, _ = start("chaos", {})
    response = logged_in.get(reverse("admin:sagas_taskinstance_history", args=[task.pk]))
    assert response.status_code == 302
    trail = logged_in.get(response["Location"]).content.decode()
    assert str(task.pk)[:8] in trail and str(other.pk)[:8] not in trail


def test_the_dashboard_counts_needs_attention_and_refreshes_as_a_partial(logged_in):
    parked({"fail": {"charge": -1}, "on_exhausted": "dead_letter"})
    page = logged_in.get(reverse("sagas-dashboard")).content.decode()
    assert re.search(r'data-status="dead_lettered">1<', page)
    assert 'hx-trigger="every 5s"' in page
    partial = logged_in.get(reverse("sagas-dashboard"), HTTP_HX_REQUEST="true")
    assert "<html" not in partial.content.decode()
    assert re.search(r'id="failures-last-hour">\d+<', partial.content.decode())


def test_a_stuck_task_is_found_by_the_one_definition(settings):
    task, _ = start("chaos", {})
    transition(task, TaskStatus.RUNNING)
    # No job in Redis for it (flushed), no attempt running, unchanged for long enough.
    from sagas.engine.connection import redis

    redis().flushdb()
    assert overview.stuck_task_ids() == []  # changed too recently
    TaskInstance.objects.filter(pk=task.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert overview.stuck_task_ids() == [task.pk]


def test_an_inbox_group_action_opens_the_bulk_confirmation_for_that_group(
    client, saga_operator, saga_viewer
):
    for _ in range(2):
        parked({"fail": {"charge": -1}, "on_exhausted": "dead_letter"})
    parked({"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    client.force_login(saga_operator)
    page = client.get(reverse("sagas-inbox")).content.decode()
    assert "{#" not in page and "{%" not in page  # no template syntax leaks as text
    forms = re.findall(r'<form method="post" action="([^"]+)".*?</form>', page, re.S)
    redrive = next(
        f
        for f in re.findall(
            r'<form method="post" action="([^"]+)"[^>]*>.*?value="(\w+_tasks)"', page, re.S
        )
        if f[1] == "redrive_tasks"
    )
    assert len(forms) == 3  # redrive all, cancel all (dead-lettered); resolve all
    url = redrive[0].replace("&amp;", "&")
    fields = {"action": "redrive_tasks", "select_across": "1", "index": "0"}
    answer = client.post(url, fields | {"_selected_action": "group"})
    confirmation = answer.content.decode()
    assert answer.status_code == 200
    assert re.search(r'<strong id="bulk-count">2</strong>', confirmation)
    client.force_login(saga_viewer)
    assert (
        '<form method="post" action="/admin/sagas/taskinstance/'
        not in client.get(reverse("sagas-inbox")).content.decode()
    )
