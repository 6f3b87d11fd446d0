"""An operator's day through the console's forms: cancel, resolve, redrive, retry a
compensation, reset a breaker, release a lock; and the buttons each role is offered.

Parked tasks are driven there for real (chaos inputs, jobs run in this process); a task
caught mid-step is set up with the transition functions, as a worker would leave it.
"""

from __future__ import annotations

import html
import re
import signal
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from sagas import services
from sagas.definitions import registry
from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import redis
from sagas.engine.locks import lock_key
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.conftest import console_group
from tests.engine.conftest import run_to_end

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_redis")]

NOTE = "card processor fixed, ticket OPS-42"


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The in-process worker of ``run_to_end`` installs its own SIGINT/SIGTERM handlers."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def member_of(users: Any, name: str, group: str, *extra_permissions: str) -> Any:
    user = users.objects.create_user(name, is_staff=True)
    user.groups.add(console_group(group))
    if extra_permissions:
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="sagas", codename__in=extra_permissions
            )
        )
    return user


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator_user(django_user_model):
    return member_of(django_user_model, "ops-anna", "Saga operators")


@pytest.fixture
def operator(operator_user) -> Client:
    return logged_in(operator_user)


@pytest.fixture
def viewer(django_user_model) -> Client:
    return logged_in(member_of(django_user_model, "viewer-ben", "Saga viewers"))


def task_url(task: TaskInstance, suffix: str = "change/") -> str:
    return f"/admin/sagas/taskinstance/{task.pk}/{suffix}"


def messages_after(client: Client, response: Any) -> list[tuple[str, str]]:
    """(level, text) of the admin messages the redirect's target shows."""
    assert response.status_code == 302, response.content[:300]
    page = client.get(response["Location"]).content.decode()
    listed = re.search(r'<ul class="messagelist">(.*?)</ul>', page, re.S)
    assert listed, "the page shows no message"
    return [
        (level, html.unescape(text).strip())
        for level, text in re.findall(r'<li class="(\w+)">(.*?)</li>', listed.group(1), re.S)
    ]


def state(task: TaskInstance) -> tuple[Any, ...]:
    task.refresh_from_db()
    steps = tuple(StepRecord.objects.filter(task=task).values_list("status", "version"))
    return task.status, task.version, steps, AuditEntry.objects.filter(task=task).count()


def _move(step: StepRecord, *statuses: StepStatus) -> None:
    for status in statuses:
        assert transition_step(step, status)


def mid_ship() -> TaskInstance:
    """A chaos task whose reserve and charge succeeded and whose ship runs now."""
    task, _ = start("chaos", {})
    assert transition(task, TaskStatus.RUNNING, fields={"current_step": "ship"})
    steps = {s.name: s for s in StepRecord.objects.filter(task=task)}
    for name in ("reserve", "charge"):
        _move(steps[name], StepStatus.RUNNING, StepStatus.SUCCEEDED)
        StepAttempt.objects.create(step=steps[name], kind="action", number=1, outcome="succeeded")
    _move(steps["ship"], StepStatus.RUNNING)
    StepAttempt.objects.create(
        step=steps["ship"],
        kind="action",
        number=1,
        worker="worker-7",
        heartbeat_expires_at=timezone.now() + timedelta(seconds=10),
    )
    return task


def parked(script: dict[str, Any]) -> TaskInstance:
    task, _ = start("chaos", script)
    return run_to_end(task)


COMPENSATION_FAILED = {"fail": {"ship": -1}, "fail_compensation": {"reserve": 3}}
DEAD_LETTERED = {"fail": {"charge": 4}, "on_exhausted": "dead_letter"}


# --- cancel -------------------------------------------------------------------------------------


def test_the_cancel_confirmation_says_what_will_be_stopped_and_undone(operator):
    task = mid_ship()
    response = operator.get(task_url(task, "cancel/"))
    assert response.status_code == 200
    preview = re.search(r'<ul id="cancel-preview">(.*?)</ul>', response.content.decode(), re.S)
    assert preview
    text = " ".join(re.sub(r"<[^>]+>", "", preview.group(1)).split())
    assert "stop ship, which is running now" in text
    # Undone newest first: what charge did goes before what reserve did.
    order = re.search(r"then undo, in this order: (.*?);", text)
    assert order
    names = [n.strip() for n in order.group(1).split("→")]
    assert names[-2:] == ["charge", "reserve"]
    task.refresh_from_db()
    assert task.status == "running"  # looking at the confirmation changes nothing


def test_cancelling_a_running_task_stops_its_step_first(operator, operator_user):
    task = mid_ship()
    response = operator.post(task_url(task, "cancel/"), {"note": "customer called"})
    assert response["Location"] == task_url(task)
    [(level, text)] = messages_after(operator, response)
    assert level == "success"
    assert text.startswith("Cancel requested: the task is now cancelling.")
    assert "Its running step ship has been asked to stop" in text
    task.refresh_from_db()
    # Honest state: not cancelled while ship still runs, and nothing undone yet.
    assert (task.status, task.cancelled_by, task.cancel_reason) == (
        "cancelling",
        operator_user,
        "customer called",
    )
    assert set(StepRecord.objects.filter(task=task).values_list("status", flat=True)) == {
        "succeeded",
        "running",
    }
    entry = AuditEntry.objects.get(task=task, action="cancel_requested")
    assert (entry.actor, entry.details["reason"]) == (operator_user, "customer called")


def test_cancelling_a_task_that_has_not_started_ends_it_at_once(operator):
    task, _ = start("chaos", {})
    [(level, text)] = messages_after(operator, operator.post(task_url(task, "cancel/")))
    assert (level, text) == ("success", "Cancel requested: the task is now cancelled.")
    task.refresh_from_db()
    assert task.status == "cancelled"


# --- resolve, retry compensation, redrive ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("note", ["", "   "], ids=["empty", "blank"])
def test_resolve_without_a_note_changes_nothing(operator, note):
    task = parked(COMPENSATION_FAILED)
    assert task.status == "compensation_failed"
    before = state(task)
    [(level, text)] = messages_after(
        operator, operator.post(task_url(task, "resolve/"), {"note": note})
    )
    assert level == "error"
    assert "note is required" in text and text.startswith("Nothing changed")
    assert state(task) == before


@pytest.mark.django_db(transaction=True)
def test_resolve_with_a_note_closes_the_task_and_records_who_and_why(operator, operator_user):
    task = parked(COMPENSATION_FAILED)
    response = operator.post(task_url(task, "resolve/"), {"note": NOTE})
    assert messages_after(operator, response) == [
        ("success", "Resolved: the task is now resolved.")
    ]
    task.refresh_from_db()
    assert (task.status, task.resolved_by, task.resolution_note) == (
        "resolved",
        operator_user,
        NOTE,
    )
    entry = AuditEntry.objects.get(task=task, action="resolved")
    assert (entry.actor, entry.actor_name, entry.details["note"]) == (
        operator_user,
        "ops-anna",
        NOTE,
    )
    # The task page says who resolved it and why.
    page = operator.get(task_url(task)).content.decode()
    assert f"ops-anna: “{NOTE}”" in page


@pytest.mark.django_db(transaction=True)
def test_retry_compensation_of_a_compensation_failed_task_ends_it_compensated(
    operator, operator_user
):
    task = parked(COMPENSATION_FAILED)
    assert task.status == "compensation_failed"
    response = operator.post(task_url(task, "retry-compensation/"), {"note": NOTE})
    assert messages_after(operator, response) == [
        ("success", "Compensation retried: the task is now compensating.")
    ]
    task = run_to_end(task)
    assert task.status == "compensated"
    entry = AuditEntry.objects.get(task=task, action="compensation_retried")
    assert (entry.actor, entry.details["reason"]) == (operator_user, NOTE)


@pytest.mark.django_db(transaction=True)
def test_redrive_of_a_dead_lettered_task_completes_it(operator, operator_user):
    task = parked(DEAD_LETTERED)
    assert task.status == "dead_lettered"
    response = operator.post(task_url(task, "redrive/"), {"note": NOTE})
    assert messages_after(operator, response) == [("success", "Redriven: the task is now running.")]
    task = run_to_end(task)
    assert task.status == "completed"
    assert StepRecord.objects.get(task=task, name="charge").attempt_count == 5
    entry = AuditEntry.objects.get(task=task, action="redriven")
    assert (entry.actor, entry.details["reason"]) == (operator_user, NOTE)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("slug", ["redrive", "retry-compensation"])
def test_redrive_and_retry_compensation_need_a_note(operator, slug):
    task = parked(DEAD_LETTERED if slug == "redrive" else COMPENSATION_FAILED)
    before = state(task)
    [(level, text)] = messages_after(operator, operator.post(task_url(task, f"{slug}/")))
    assert level == "error" and "note is required" in text
    assert state(task) == before


# --- stale pages: the task moved on between page load and click ---------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_resolve_click_after_someone_else_retried_the_compensation_changes_nothing(
    operator, django_user_model
):
    task = parked(COMPENSATION_FAILED)
    page = operator.get(task_url(task)).content.decode()
    assert 'id="action-resolve"' in page  # the button the operator is about to click
    colleague = member_of(django_user_model, "ops-carl", "Saga operators")
    services.retry_compensation(task.pk, colleague, "S3 is back")
    before = state(task)
    [(level, text)] = messages_after(
        operator, operator.post(task_url(task, "resolve/"), {"note": NOTE})
    )
    assert level == "warning"
    assert text.startswith("Nothing changed")
    assert "it is compensating" in text
    assert state(task) == before


@pytest.mark.django_db(transaction=True)
def test_a_redrive_click_after_the_task_was_resolved_changes_nothing(operator, operator_user):
    task = parked(DEAD_LETTERED)
    assert 'id="action-redrive"' in operator.get(task_url(task)).content.decode()
    services.resolve(task.pk, operator_user, "refunded by hand")
    before = state(task)
    [(level, text)] = messages_after(
        operator, operator.post(task_url(task, "redrive/"), {"note": NOTE})
    )
    assert (level, text.split(":")[0]) == ("warning", "Nothing changed")
    assert "it is resolved" in text
    assert state(task) == before


@pytest.mark.django_db(transaction=True)
def test_a_cancel_click_after_the_task_completed_changes_nothing(operator):
    task, _ = start("chaos", {})
    confirmation = operator.get(task_url(task, "cancel/"))
    assert 'id="confirm-cancel"' in confirmation.content.decode()
    task = run_to_end(task)
    assert task.status == "completed"
    before = state(task)
    response = operator.post(task_url(task, "cancel/"), {"note": "too late"})
    assert messages_after(operator, response) == [
        ("warning", "Nothing changed: the task already completed.")
    ]
    assert state(task) == before


# --- circuit breakers -------------------------------------------------------------------------


def s3_breaker() -> CircuitBreaker:
    upload = registry.get("create-zip").get_step("upload")
    assert upload is not None
    policy = upload.breaker
    assert policy is not None and policy.name == "s3"
    return CircuitBreaker(redis(), policy)


def test_an_operator_resets_an_open_breaker(operator, operator_user, viewer):
    breaker = s3_breaker()
    opened = [breaker.record_failure(trial=False) for _ in range(breaker.policy.failure_threshold)]
    assert opened[-1] and breaker.state().open_until > 0
    page = operator.get("/admin/sagas/breakers/").content.decode()
    row = re.search(r'<tr id="breaker-s3">(.*?)</tr>', page, re.S)
    assert row and "sagas-breaker-open" in row.group(1)
    assert 'action="/admin/sagas/breakers/s3/reset/"' in row.group(1)
    assert (
        'action="/admin/sagas/breakers/s3/reset/"'
        not in viewer.get("/admin/sagas/breakers/").content.decode()
    )

    response = operator.post("/admin/sagas/breakers/s3/reset/")
    assert response["Location"] == "/admin/sagas/breakers/"
    [(level, text)] = messages_after(operator, response)
    assert level == "success" and text.startswith("Breaker s3 reset to closed")
    assert breaker.state().open_until == 0 and breaker.state().failures == 0
    entry = AuditEntry.objects.get(action="breaker_reset")
    assert (entry.actor, entry.task, entry.details["breaker"]) == (operator_user, None, "s3")
    assert entry.details["open_until"] > 0

    # Resetting it again finds nothing to do, and says so.
    [(level, text)] = messages_after(operator, operator.post("/admin/sagas/breakers/s3/reset/"))
    assert level == "warning" and text.startswith("Nothing changed: breaker s3 is already closed")
    assert AuditEntry.objects.filter(action="breaker_reset").count() == 1


@pytest.mark.parametrize(
    "name",
    ["s3.eu-west", "no%20such%20breaker", "x" * 101],
    ids=["a dot", "spaces", "too long"],
)
def test_resetting_a_name_that_is_no_breaker_changes_nothing_and_says_so(operator_user, name):
    operator = Client(raise_request_exception=False)  # a server error is an answer here
    operator.force_login(operator_user)
    breaker = s3_breaker()
    breaker.record_failure(trial=True)
    before = redis().hgetall("sagas:breaker:s3")
    response = operator.post(f"/admin/sagas/breakers/{name}/reset/")
    assert response.status_code in (302, 404), response.status_code
    if response.status_code == 302:
        [(level, text)] = messages_after(operator, response)
        assert level in ("warning", "error") and text.startswith("Nothing changed")
    assert redis().hgetall("sagas:breaker:s3") == before
    assert not AuditEntry.objects.filter(action="breaker_reset").exists()


# --- task locks ---------------------------------------------------------------------------------


def held_lock(task: TaskInstance, *, beating_until: Any) -> tuple[str, str, StepAttempt]:
    """A lock in Redis whose token an attempt holds, its heartbeat good until then."""
    token = "tok-" + str(task.pk)[:8]
    attempt = StepAttempt.objects.get(step__task=task, step__name="ship", outcome="running")
    StepAttempt.objects.filter(pk=attempt.pk).update(
        lock_token=token, heartbeat_at=timezone.now(), heartbeat_expires_at=beating_until
    )
    name = lock_key(task.pk)
    assert redis().set(name, token, px=60_000)
    return name, token, attempt


def lock_row(client: Client, name: str) -> str:
    page = client.get("/admin/sagas/locks/").content.decode()
    row = re.search(rf"<tr>\s*<td class=\"mono\">{re.escape(name)}</td>(.*?)</tr>", page, re.S)
    assert row, f"{name} is not listed"
    return row.group(1)


def test_a_lock_whose_holder_beats_cannot_be_released(operator):
    task = mid_ship()
    name, token, _ = held_lock(task, beating_until=timezone.now() + timedelta(seconds=30))
    row = lock_row(operator, name)
    assert "holder alive" in row and "Release" not in row
    before = AuditEntry.objects.count()
    # Even a forged POST with the right token is refused while the holder beats.
    response = operator.post("/admin/sagas/locks/release/", {"key": name, "token": token})
    [(level, text)] = messages_after(operator, response)
    assert level == "warning"
    assert text.startswith("Nothing changed: the lock's holder is alive: attempt 1 of ship")
    assert redis().get(name) == token.encode()
    assert AuditEntry.objects.count() == before


def test_a_lock_whose_holder_stopped_beating_is_released(operator, operator_user, viewer):
    task = mid_ship()
    name, token, _ = held_lock(task, beating_until=timezone.now() - timedelta(seconds=30))
    row = lock_row(operator, name)
    assert 'action="/admin/sagas/locks/release/"' in row and f'value="{token}"' in row
    viewer_row = lock_row(viewer, name)
    assert "stale" in viewer_row and "<form" not in viewer_row
    response = operator.post("/admin/sagas/locks/release/", {"key": name, "token": token})
    assert response["Location"] == "/admin/sagas/locks/"
    assert messages_after(operator, response) == [
        ("success", f"Released {name}: its holder was gone.")
    ]
    assert redis().get(name) is None
    entry = AuditEntry.objects.get(action="lock_released")
    assert (entry.actor, entry.task, entry.details) == (
        operator_user,
        task,
        {"lock": name, "token": token},
    )


def test_a_lock_that_changed_hands_since_the_page_was_loaded_is_kept(operator):
    task = mid_ship()
    name, token, attempt = held_lock(task, beating_until=timezone.now() - timedelta(seconds=30))
    assert "Release" in lock_row(operator, name)
    # Meanwhile the reaper gave up on that attempt and a new one took the lock.
    StepAttempt.objects.filter(pk=attempt.pk).update(outcome="lost")
    StepAttempt.objects.create(
        step=attempt.step,
        kind="action",
        number=2,
        lock_token="tok-new-holder",
        heartbeat_expires_at=timezone.now() + timedelta(seconds=30),
    )
    redis().set(name, "tok-new-holder", px=60_000)
    response = operator.post("/admin/sagas/locks/release/", {"key": name, "token": token})
    [(level, text)] = messages_after(operator, response)
    assert level == "warning" and "already released or has a new holder" in text
    assert redis().get(name) == b"tok-new-holder"
    assert not AuditEntry.objects.filter(action="lock_released").exists()


def test_a_lock_no_attempt_holds_is_listed_and_can_be_released(operator, operator_user):
    """A token no attempt row carries (its worker died before recording the attempt)."""
    task = mid_ship()
    name = lock_key(task.pk)
    redis().set(name, "tok-unrecorded", px=60_000)
    response = operator.get("/admin/sagas/locks/")
    assert response.status_code == 200
    row = lock_row(operator, name)
    assert "no attempt holds this token" in row
    assert 'value="tok-unrecorded"' in row
    response = operator.post(
        "/admin/sagas/locks/release/", {"key": name, "token": "tok-unrecorded"}
    )
    assert response["Location"] == "/admin/sagas/locks/"
    assert redis().get(name) is None
    entry = AuditEntry.objects.get(action="lock_released")
    assert (entry.actor, entry.task) == (operator_user, task)
    assert messages_after(operator, response) == [
        ("success", f"Released {name}: its holder was gone.")
    ]


@pytest.mark.parametrize(
    "form",
    [{"key": "sagas:breaker:s3", "token": "x"}, {"key": "", "token": ""}, {}],
    ids=["not a lock", "empty", "missing"],
)
def test_releasing_something_that_is_not_a_task_lock_changes_nothing(operator, form):
    s3_breaker().record_failure(trial=True)
    before = redis().hgetall("sagas:breaker:s3")
    [(level, text)] = messages_after(operator, operator.post("/admin/sagas/locks/release/", form))
    assert level == "warning" and text == "Nothing changed: not a task lock."
    assert redis().hgetall("sagas:breaker:s3") == before


# --- which buttons a task page offers -----------------------------------------------------------

ACTION_FORMS = re.compile(
    r'<form method="(?:get|post)" action="/admin/sagas/taskinstance/[^"]+/'
    r'(cancel|resolve|retry-compensation|redrive)/"'
)


def offered(client: Client, task: TaskInstance) -> set[str]:
    page = client.get(task_url(task)).content.decode()
    found = set(ACTION_FORMS.findall(page))
    assert bool(found) is ('id="task-actions"' in page)
    return found


def task_in(status: str) -> TaskInstance:
    """A chaos task moved to ``status`` by the transition functions."""
    task, _ = start("chaos", {})
    if status == "pending":
        return task
    paths = {
        "running": ["running"],
        "failed": ["running", "failed"],
        "dead_lettered": ["running", "dead_lettered"],
        "compensation_failed": ["running", "compensating", "compensation_failed"],
        "completed": ["running", "completed"],
        "cancelling": ["running", "cancelling"],
        "resolved": ["running", "failed", "resolved"],
    }
    for to in paths[status]:
        assert transition(task, TaskStatus(to))
    return task


OPERATOR_BUTTONS = {
    "pending": {"cancel"},
    "running": {"cancel"},
    "failed": {"resolve"},
    "dead_lettered": {"cancel", "resolve", "redrive"},
    "compensation_failed": {"resolve", "retry-compensation"},
    "completed": set(),
    "cancelling": set(),
    "resolved": set(),
}


@pytest.mark.parametrize("status", OPERATOR_BUTTONS)
def test_an_operator_is_offered_the_actions_the_status_allows(operator, status):
    assert offered(operator, task_in(status)) == OPERATOR_BUTTONS[status]


@pytest.mark.parametrize("status", OPERATOR_BUTTONS)
def test_a_viewer_is_offered_no_action_at_all(viewer, status):
    task = task_in(status)
    page = viewer.get(task_url(task)).content.decode()
    assert 'id="task-actions"' not in page
    assert not ACTION_FORMS.search(page)
    assert 'name="note"' not in page


@pytest.mark.parametrize(
    ("permission", "status", "expected"),
    [
        ("cancel_taskinstance", "dead_lettered", {"cancel"}),
        ("resolve_taskinstance", "dead_lettered", {"resolve"}),
        ("redrive_taskinstance", "dead_lettered", {"redrive"}),
        ("resolve_taskinstance", "compensation_failed", {"resolve", "retry-compensation"}),
        ("redrive_taskinstance", "compensation_failed", set()),
    ],
)
def test_each_button_follows_its_own_permission(django_user_model, permission, status, expected):
    client = logged_in(member_of(django_user_model, "partial", "Saga viewers", permission))
    assert offered(client, task_in(status)) == expected


def test_a_saga_that_is_not_cancellable_offers_no_cancel(operator):
    task, _ = start("shrinking", {})
    assert not registry.get("shrinking").cancellable
    assert offered(operator, task) == set()
    assert operator.get(task_url(task, "cancel/")).status_code in (200, 409)
    before = state(task)
    [(level, text)] = messages_after(operator, operator.post(task_url(task, "cancel/")))
    assert (level, text) == ("error", "Nothing changed: this saga is not cancellable.")
    assert state(task) == before
