"""Whatever a task carries is shown as text on every console page, never run as HTML.

Input, keys, errors, tracebacks, progress messages, step data and audit details all come
from outside (API callers, third-party error messages); each holds a script tag and an
attribute break-out, and every page must show them escaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.test import Client
from django.utils import timezone
from django.utils.html import escape

from sagas import audit
from sagas.models import AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import CompensationReason, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_redis")]

SCRIPT = "<script>alert(1)</script>"
BREAKOUT = '"><img src=x onerror=alert(1)>'
PAYLOADS = (SCRIPT, BREAKOUT)
# What must never reach a page unescaped: the start of either payload's live markup.
RAW = ("<script>alert(1)", "<img src=x")


@pytest.fixture
def browser(saga_operator) -> Client:
    client = Client()
    client.force_login(saga_operator)
    return client


def hostile_input() -> dict[str, object]:
    return {"files": {f"{SCRIPT}.txt": BREAKOUT, "b.txt": SCRIPT}}


def _move(step: StepRecord, *statuses: StepStatus) -> None:
    for status in statuses:
        assert transition_step(step, status)


@dataclass
class Hostile:
    running: TaskInstance  # its upload runs now, after a failed first attempt
    parked: TaskInstance  # compensation_failed: its undo failed with hostile errors
    dead: TaskInstance  # dead_lettered with a hostile step error

    @property
    def tasks(self) -> tuple[TaskInstance, ...]:
        return (self.running, self.parked, self.dead)


def running_task() -> TaskInstance:
    task, _ = start(
        "create-zip", hostile_input(), business_key=f"bk-{SCRIPT}", correlation_id=f"c-{BREAKOUT}"
    )
    step = StepRecord.objects.get(task=task, name="upload")
    assert transition(task, TaskStatus.RUNNING, fields={"current_step": "upload"})
    _move(step, StepStatus.RUNNING)
    StepAttempt.objects.create(
        step=step,
        kind="action",
        number=1,
        outcome="failed",
        worker=f"w-{SCRIPT}",
        error=f"ConnectionError: {SCRIPT}",
        traceback=f"Traceback (most recent call last):\n  {BREAKOUT}\nConnectionError: {SCRIPT}",
        finished_at=timezone.now(),
    )
    StepAttempt.objects.create(step=step, kind="action", number=2, outcome="running", worker="w2")
    StepRecord.objects.filter(pk=step.pk).update(
        attempt_count=2,
        error=f"ConnectionError: {BREAKOUT}",
        progress=40,
        progress_message=f"zipping {SCRIPT} {BREAKOUT}",
        data={"note": SCRIPT, "Key": BREAKOUT},
    )
    audit.record(task, "retry_scheduled", details={"error": SCRIPT, "why": BREAKOUT})
    return task


def parked_task() -> TaskInstance:
    task, _ = start("create-zip", hostile_input(), business_key=f"parked-{BREAKOUT}")
    step = StepRecord.objects.get(task=task, name="upload")
    assert transition(task, TaskStatus.RUNNING)
    _move(step, StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
    assert transition(
        task, TaskStatus.CANCELLING, fields={"compensation_reason": CompensationReason.CANCEL}
    )
    StepAttempt.objects.create(
        step=step,
        kind="compensation",
        number=1,
        outcome="failed",
        error=f"ClientError: {BREAKOUT}",
        traceback=f"Traceback:\n  {SCRIPT}",
        finished_at=timezone.now(),
    )
    _move(step, StepStatus.COMPENSATION_FAILED)
    StepRecord.objects.filter(pk=step.pk).update(
        compensation_error=f"ClientError: {SCRIPT} {BREAKOUT}",
        data={"Key": SCRIPT},
        compensation_attempt_count=1,
    )
    assert transition(
        task,
        TaskStatus.COMPENSATION_FAILED,
        action=audit.AuditAction.COMPENSATION_FAILED,
        details={
            "step_name": "upload",
            "error": f"ClientError: {SCRIPT}",
            "stack_trace": f"Traceback:\n  {BREAKOUT}\n  {SCRIPT}",
            "attempt_count": 1,
        },
        fields={"error_summary": f"undo of upload failed: {BREAKOUT}"},
    )
    return task


def dead_task() -> TaskInstance:
    task, _ = start("create-zip", hostile_input(), business_key=f"dead-{SCRIPT}")
    step = StepRecord.objects.get(task=task, name="upload")
    assert transition(task, TaskStatus.RUNNING)
    _move(step, StepStatus.RUNNING, StepStatus.FAILED)
    StepRecord.objects.filter(pk=step.pk).update(error=f"{SCRIPT}: {BREAKOUT}")
    assert transition(task, TaskStatus.DEAD_LETTERED, details={"steps": ["upload"]})
    return task


@pytest.fixture
def hostile() -> Hostile:
    return Hostile(running_task(), parked_task(), dead_task())


def get_page(client: Client, url: str, **headers: str) -> str:
    response = client.get(url, headers=headers)
    assert response.status_code in (200, 286), (url, response.status_code)
    return response.content.decode()


def assert_escaped(page: str, *shown: str) -> None:
    """No payload's markup is live; each of ``shown`` is on the page as escaped text."""
    for raw in RAW:
        assert raw not in page
    for text in shown:
        assert escape(text) in page, f"{text!r} is not shown escaped"


def task_url(task: TaskInstance, suffix: str) -> str:
    return f"/admin/sagas/taskinstance/{task.pk}/{suffix}"


def test_the_task_list_shows_keys_and_ids_escaped(browser, hostile):
    page = get_page(browser, "/admin/sagas/taskinstance/")
    assert_escaped(page, f"bk-{SCRIPT}", f"c-{BREAKOUT}", f"parked-{BREAKOUT}", f"dead-{SCRIPT}")


def test_a_search_for_a_hostile_key_is_shown_escaped(browser, hostile):
    page = get_page(browser, f"/admin/sagas/taskinstance/?q=bk-{SCRIPT}")
    assert_escaped(page, f"bk-{SCRIPT}")


RUNNING_TEXTS = (
    f"bk-{SCRIPT}",
    f"c-{BREAKOUT}",
    f"w-{SCRIPT}",
    f"ConnectionError: {SCRIPT}",  # attempt error
    f"ConnectionError: {BREAKOUT}",  # step error
    f"  {BREAKOUT}\nConnectionError: {SCRIPT}",  # traceback
    f"zipping {SCRIPT} {BREAKOUT}",  # progress message
    f"{SCRIPT}.txt",  # input (a file name)
    f'"note": "{SCRIPT}"',  # step data, pretty JSON
    f"error: {SCRIPT}",  # audit details
)
PARKED_TEXTS = (
    f"parked-{BREAKOUT}",
    f"ClientError: {SCRIPT} {BREAKOUT}",  # compensation error
    f"ClientError: {BREAKOUT}",  # compensation attempt error
    f"Traceback:\n  {SCRIPT}",  # compensation attempt traceback
    f"undo of upload failed: {BREAKOUT}",  # error summary
    f"Traceback:\n  {BREAKOUT}\n  {SCRIPT}",  # the compensation_failed audit's stack trace
)


def _detail_texts(texts: tuple[str, ...]) -> tuple[str, ...]:
    # The audit trail shows each detail as "key: value"; the value alone is what's checked.
    return tuple(t.removeprefix("error: ") for t in texts)


@pytest.mark.parametrize("htmx", [False, True], ids=["page", "htmx partial"])
def test_the_running_task_page_shows_everything_escaped(browser, hostile, htmx):
    headers = {"HX-Request": "true"} if htmx else {}
    page = get_page(browser, task_url(hostile.running, "change/"), **headers)
    assert_escaped(page, *_detail_texts(RUNNING_TEXTS))
    assert ('id="task-actions"' in page) is not htmx  # really the partial when htmx asks


@pytest.mark.parametrize("htmx", [False, True], ids=["page", "htmx partial"])
def test_the_parked_task_page_shows_everything_escaped(browser, hostile, htmx):
    headers = {"HX-Request": "true"} if htmx else {}
    page = get_page(browser, task_url(hostile.parked, "change/"), **headers)
    assert_escaped(page, *PARKED_TEXTS)


def test_the_progress_cell_is_escaped(browser, hostile):
    TaskInstance.objects.filter(pk=hostile.running.pk).update(current_step=f"upload {SCRIPT}")
    page = get_page(browser, task_url(hostile.running, "progress/"))
    assert_escaped(page, f"upload {SCRIPT}")
    assert "40%" in page


def test_the_cancel_confirmation_is_escaped(browser, hostile):
    page = get_page(browser, task_url(hostile.running, "cancel/"))
    assert_escaped(page)
    assert 'id="cancel-preview"' in page


def test_the_dashboard_is_escaped(browser, hostile):
    page = get_page(browser, "/admin/sagas/dashboard/")
    assert_escaped(page)
    assert 'data-status="compensation_failed">1<' in page


def test_the_inbox_shows_hostile_errors_escaped(browser, hostile):
    page = get_page(browser, "/admin/sagas/inbox/")
    # The error type of "<script>...: ..." is the text before the colon.
    assert_escaped(page, f"ClientError: {SCRIPT} {BREAKOUT}", f"{SCRIPT}: {BREAKOUT}", SCRIPT)


def test_the_audit_list_and_entry_page_are_escaped(browser, hostile):
    page = get_page(browser, "/admin/sagas/auditentry/")
    # One line per entry, "key: value" (jsonb on Postgres keeps its own key order).
    assert_escaped(page, f"error: {SCRIPT}", f"why: {BREAKOUT}")
    entry = AuditEntry.objects.get(task=hostile.parked, action="compensation_failed")
    page = get_page(browser, f"/admin/sagas/auditentry/{entry.pk}/change/")
    assert_escaped(page, f"ClientError: {SCRIPT}", f"Traceback:\n  {BREAKOUT}\n  {SCRIPT}")


def test_the_trail_filtered_by_a_task_is_escaped(browser, hostile):
    response = browser.get(task_url(hostile.running, "history/"), follow=True)
    page = response.content.decode()
    assert_escaped(page, f"error: {SCRIPT}", f"why: {BREAKOUT}")
    assert "retry_scheduled" in page
