"""The operator console in a real headless Chromium: what an on-call operator clicks.

Each test logs in through the admin's login form. Flows that need no concurrency run the
tasks' jobs in this process (``run_jobs``), so they run on SQLite too; watching a step
run and cancelling it needs real forking workers, hence Postgres. The ``console``
fixture fails any test whose pages opened a dialog or broke the Content-Security-Policy.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import expect

from sagas import findings, reconciliation
from sagas.definitions import registry
from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import redis
from sagas.models import (
    AuditEntry,
    BulkOperation,
    Finding,
    ReconciliationRun,
    StepAttempt,
    StepRecord,
    TaskInstance,
)
from sagas.services import start
from sagas.states import AuditAction, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.e2e import sagas_for_findings
from tests.engine import conftest as engine
from tests.integration.test_reconciliation import keys, put, s3, step_owning

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_redis")]

__all__ = ["s3"]  # the per-test bucket fixture (tests/integration/test_reconciliation.py)

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')
PAYLOAD = " ".join(HOSTILE)
LIVE_TIMEOUT_MS = 20_000
# Orphans put this far apart, found by a run whose grace lies between their ages (S3 keeps
# whole seconds): the older is an old orphan, the newer a recent one.
ORPHAN_GAP_S = 3
RUN_GRACE = timedelta(seconds=2)


def task_path(task: TaskInstance) -> str:
    return reverse("admin:sagas_taskinstance_change", args=[task.pk])


def refreshed(task: TaskInstance) -> TaskInstance:
    task.refresh_from_db()
    return task


@pytest.fixture
def run_jobs() -> Iterator[Callable[..., None]]:
    """Run the queued and scheduled step jobs in this process until none is left (the
    engine tests' ``drain``). Only while no page polls: on SQLite the live server shares
    this thread's database connection."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield engine.drain
    for sig, handler in saved.items():  # an in-process RQ worker takes them for good
        signal.signal(sig, handler)


@pytest.fixture
def one_worker(workers: Callable[..., Any]) -> None:
    """One real ``rqworker --with-scheduler``, registered before the test starts tasks."""
    workers("w1")
    engine.workers_up(1)


def open_breaker(name: str) -> CircuitBreaker:
    """Count a declared breaker's threshold of failures, as failing steps would."""
    policy, _steps = registry.breakers()[name]
    breaker = CircuitBreaker(redis(), policy)
    for _ in range(policy.failure_threshold):
        breaker.record_failure(trial=False)
    assert breaker.state().open_until > time.time()
    return breaker


def progress_values(cell: Any, until: Callable[[set[int]], bool], timeout: float) -> set[int]:
    """Progress percentages the list's live cell shows over time (read, never reloaded)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(seen):
        text = " ".join(cell.locator(".sagas-progress-value").all_inner_texts())
        seen |= {int(n) for n in re.findall(r"(\d+)%", text)}
        time.sleep(0.2)
    return seen


# --- finding a task ------------------------------------------------------------------------


def test_operator_finds_a_task_by_its_correlation_id(console, operator_user):
    wanted, _ = start("chaos", {}, correlation_id="checkout-7f3a")
    other, _ = start("chaos", {}, correlation_id="checkout-9c21")
    console.login(operator_user)
    console.page.click("nav.sagas-nav >> text=Tasks")
    console.page.fill("#searchbar", "checkout-7f3a")
    with console.page.expect_navigation():
        console.page.press("#searchbar", "Enter")
    results = console.page.locator("#result_list tbody tr")
    expect(results).to_have_count(1)
    expect(results).to_contain_text(str(wanted.pk)[:8])
    with console.page.expect_navigation():
        results.locator("a", has_text=str(wanted.pk)[:8]).click()
    expect(console.page.locator(".sagas-ids")).to_contain_text("checkout-7f3a")
    expect(console.page.locator("h1")).to_contain_text(str(wanted.pk))
    assert str(other.pk) not in console.page.content()


# --- live progress and cancel: real workers --------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_progress_of_a_running_step_changes_without_a_reload(console, operator_user, one_worker):
    task, _ = start("chaos", {"sleep_ms": {"ship": 6000}})
    console.login(operator_user)
    console.goto(f"{reverse('admin:sagas_taskinstance_changelist')}?q={task.pk}")
    loaded = console.navigations
    cell = console.page.locator(f'.sagas-task-progress[data-task="{task.pk}"]')
    expect(cell).to_contain_text("ship", timeout=LIVE_TIMEOUT_MS)
    seen = progress_values(cell, until=lambda values: len(values - {0}) >= 2, timeout=15)
    assert len(seen - {0}) >= 2, f"progress shown: {sorted(seen)}"
    expect(cell.locator(".sagas-status")).to_have_text("completed", timeout=LIVE_TIMEOUT_MS)
    assert console.navigations == loaded, "the page was reloaded"
    assert refreshed(task).status == TaskStatus.COMPLETED
    polls: list[str] = []
    console.page.on("request", lambda r: polls.append(r.url) if "/progress/" in r.url else None)
    console.page.wait_for_timeout(2500)
    assert polls == [], "the cell still polls a finished task"


@pytest.mark.postgres
@pytest.mark.slow
def test_operator_cancels_a_running_task_and_watches_it_undo(console, operator_user, one_worker):
    task, _ = start(
        "chaos", {"sleep_ms": {"ship": 6000}, "compensation_sleep_ms": {"reserve": 2000}}
    )
    page = console.page
    console.login(operator_user, then=task_path(task))
    expect(page.locator("#step-ship .sagas-status")).to_have_text(
        "running", timeout=LIVE_TIMEOUT_MS
    )
    with page.expect_navigation():
        page.click("#action-cancel")
    expect(page.locator("#cancel-preview")).to_contain_text("stop ship, which is running now")
    expect(page.locator("#cancel-preview")).to_contain_text("charge → reserve")
    page.fill("#note-cancel", "customer called to cancel")
    with page.expect_navigation():
        page.click("#confirm-cancel")
    assert "Cancel requested: the task is now cancelling" in console.messages()
    expect(page.locator("#task-status")).to_have_text("cancelling")
    landed = console.navigations
    expect(page.locator("#task-status")).to_have_text("cancelled", timeout=LIVE_TIMEOUT_MS)
    assert console.navigations == landed, "the page was reloaded"
    expect(page.locator("#task-audit")).to_contain_text("cancel_requested")
    statuses = dict(refreshed(task).steps.values_list("name", "status"))
    assert statuses == {"reserve": "compensated", "charge": "compensated", "ship": "cancelled"}
    requested = AuditEntry.objects.get(task=task, action=AuditAction.CANCEL_REQUESTED)
    assert requested.actor == operator_user


# --- parked tasks: in-process jobs ---------------------------------------------------------------


def test_operator_resolves_a_compensation_failed_task_from_the_inbox(
    console, operator_user, run_jobs
):
    task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    run_jobs()
    assert refreshed(task).status == TaskStatus.COMPENSATION_FAILED
    page = console.page
    console.login(operator_user)
    with page.expect_navigation():
        page.click("nav.sagas-nav >> text=Inbox")
    group = page.locator("#inbox-groups tbody tr", has_text="compensation_failed")
    expect(group).to_contain_text("reserve")
    expect(group).to_contain_text("ChaosFailure")
    with page.expect_navigation():
        group.locator("a", has_text="Open tasks").click()
    with page.expect_navigation():
        page.locator("#result_list a", has_text=str(task.pk)[:8]).click()
    expect(page.locator("#task-status")).to_have_text("compensation_failed")

    with page.expect_navigation():
        page.click("#action-resolve")  # no note
    assert "Nothing changed: a note is required" in console.messages()
    expect(page.locator("#task-status")).to_have_text("compensation_failed")
    assert refreshed(task).status == TaskStatus.COMPENSATION_FAILED

    page.fill("#note-resolve", "reservation released by hand, ticket OPS-7")
    with page.expect_navigation():
        page.click("#action-resolve")
    assert "Resolved: the task is now resolved." in console.messages()
    expect(page.locator("#task-status")).to_have_text("resolved")
    latest = page.locator("#task-audit tbody tr").first
    expect(latest).to_contain_text("resolved")
    expect(latest).to_contain_text(operator_user.get_username())
    expect(latest).to_contain_text("ticket OPS-7")
    assert refreshed(task).resolved_by == operator_user


def test_operator_redrives_a_dead_lettered_task_to_completion(console, operator_user, run_jobs):
    # chaos allows 4 attempts (max_retries=3): all 4 fail, the redriven 5th succeeds.
    task, _ = start("chaos", {"fail": {"charge": 4}, "on_exhausted": "dead_letter"})
    run_jobs()
    assert refreshed(task).status == TaskStatus.DEAD_LETTERED
    page = console.page
    console.login(operator_user, then=task_path(task))
    expect(page.locator("#task-status")).to_have_text("dead_lettered")
    expect(page.locator("#task-next")).to_contain_text("Redrive")
    page.fill("#note-redrive", "card processor fixed, INC-42")
    with page.expect_navigation():
        page.click("#action-redrive")
    assert "Redriven: the task is now" in console.messages()

    page.goto("about:blank")  # nothing polls while this thread runs the jobs
    run_jobs()
    console.goto(task_path(task))
    expect(page.locator("#task-status")).to_have_text("completed")
    charge = page.locator("#step-charge")
    expect(charge.locator(".sagas-status")).to_have_text("succeeded")
    expect(charge.locator("td.num").first).to_have_text("5")
    expect(page.locator("#task-audit tbody tr", has_text="redriven")).to_contain_text(
        operator_user.get_username()
    )


# --- breakers and permissions ------------------------------------------------------------------


def test_operator_resets_an_open_breaker(console, operator_user):
    breaker = open_breaker("s3")
    page = console.page
    console.login(operator_user)
    with page.expect_navigation():
        page.click("nav.sagas-nav >> text=Breakers")
    row = page.locator("#breaker-s3")
    expect(row.locator(".sagas-breaker")).to_have_text("open")
    expect(row).to_contain_text("create-zip.upload")
    with page.expect_navigation():
        row.get_by_role("button", name="Reset").click()
    assert "Breaker s3 reset to closed" in console.messages()
    expect(row.locator(".sagas-breaker")).to_have_text("closed")
    expect(row.get_by_role("button")).to_have_count(0)
    assert breaker.state().open_until == 0
    reset = AuditEntry.objects.get(action=AuditAction.BREAKER_RESET)
    assert reset.actor == operator_user


def test_a_viewer_sees_no_buttons_and_a_forged_post_changes_nothing(console, viewer_user):
    task, _ = start("chaos", {})
    breaker = open_breaker("s3")
    page = console.page
    console.login(viewer_user, then=task_path(task))
    expect(page.locator("#task-status")).to_have_text("pending")
    expect(page.locator("#task-actions")).to_have_count(0)
    expect(page.locator("#content-main button")).to_have_count(0)
    console.goto(reverse("sagas-breakers"))
    expect(page.locator("#breaker-s3 .sagas-breaker")).to_have_text("open")
    expect(page.locator("#breakers button, #breakers form")).to_have_count(0)

    token = console.csrf_token()
    # The session travels with page.request: the viewer may read the task...
    assert page.request.get(console.url(task_path(task))).status == 200
    # ...but each forged action is refused by permission (not by CSRF: the token is good).
    for path, fields in (
        (reverse("admin:sagas_task_cancel", args=[task.pk]), {"note": "forged"}),
        (reverse("admin:sagas_task_resolve", args=[task.pk]), {"note": "forged"}),
        (reverse("sagas-breaker-reset", args=["s3"]), {}),
    ):
        response = page.request.post(
            console.url(path), form={"csrfmiddlewaretoken": token, **fields}, max_redirects=0
        )
        assert response.status == 403, f"{path}: {response.status}"
        assert "CSRF" not in response.text(), f"{path}: refused for CSRF, not permission"

    assert refreshed(task).status == TaskStatus.PENDING
    assert refreshed(task).cancel_requested_at is None
    assert not AuditEntry.objects.filter(actor=viewer_user).exists()
    assert breaker.state().open_until > time.time()


# --- hostile data and the Content-Security-Policy ---------------------------------------------


def hostile_task(parked: bool) -> TaskInstance:
    """A create-zip task whose input, keys and errors are HTML: parked in
    ``compensation_failed``, or left ``running`` (so its page polls)."""
    task, _ = start(
        "create-zip",
        {"files": {f"{HOSTILE[0]}.txt": HOSTILE[1], "notes.txt": PAYLOAD}},
        business_key=f"{PAYLOAD} {parked}",
        correlation_id=HOSTILE[1],
    )
    step = StepRecord.objects.get(task=task, name="upload")
    transition(task, TaskStatus.RUNNING, fields={"current_step": "upload"})
    transition_step(step, StepStatus.RUNNING, fields={"progress_message": PAYLOAD})
    StepAttempt.objects.create(
        step=step, kind="action", number=1, outcome="failed", worker=PAYLOAD, error=PAYLOAD
    )
    if parked:
        park_hostile(task, step)
    return task


def park_hostile(task: TaskInstance, step: StepRecord) -> None:
    transition_step(step, StepStatus.SUCCEEDED, fields={"data": {"Key": PAYLOAD}})
    transition_step(step, StepStatus.COMPENSATING)
    StepAttempt.objects.create(
        step=step, kind="compensation", number=1, outcome="failed", error=PAYLOAD, traceback=PAYLOAD
    )
    # An error type (the text before the colon) that is itself markup.
    error = f"{HOSTILE[0]}: {HOSTILE[1]}"
    transition_step(step, StepStatus.COMPENSATION_FAILED, fields={"compensation_error": error})
    transition(task, TaskStatus.COMPENSATING, fields={"compensation_reason": "failure"})
    transition(
        task,
        TaskStatus.COMPENSATION_FAILED,
        action=AuditAction.COMPENSATION_FAILED,
        step=step,
        details={"step_name": "upload", "error": error, "stack_trace": PAYLOAD},
        fields={"error_summary": error, "finished_at": timezone.now()},
    )


def assert_nothing_injected(console: Any, where: str) -> None:
    page = console.page
    assert page.locator('img[src="x"]').count() == 0, f"{where}: an injected <img>"
    injected = page.evaluate(
        "() => [...document.scripts].filter(s => s.textContent.includes('alert(1)')).length"
    )
    assert injected == 0, f"{where}: an injected <script>"
    assert not console.dialogs, f"{where}: {console.dialogs}"


def test_stored_markup_is_shown_as_text_everywhere(console, operator_user):
    parked, running = hostile_task(parked=True), hostile_task(parked=False)
    page = console.page
    console.login(operator_user)
    for path in (
        reverse("admin:sagas_taskinstance_changelist"),
        reverse("sagas-inbox"),
        reverse("sagas-dashboard"),
        reverse("admin:sagas_auditentry_changelist"),
        task_path(parked),
    ):
        console.goto(path)
        assert_nothing_injected(console, path)
    expect(page.locator("#task-input")).to_contain_text(HOSTILE[0])
    expect(page.locator("#task-live .sagas-error").first).to_contain_text(HOSTILE[1])

    console.goto(task_path(running))  # the live part is swapped in by htmx: still text
    with page.expect_response(lambda r: r.request.resource_type in ("xhr", "fetch")):
        pass
    assert_nothing_injected(console, "the running task's page after a refresh")
    expect(page.locator("#step-upload")).to_contain_text(HOSTILE[0])


def test_every_console_page_sends_a_strict_csp_and_breaks_none_of_it(console, operator_user):
    task, _ = start("chaos", {})  # pending: its page and list cell poll
    open_breaker("s3")
    page = console.page
    login_page = console.goto("/admin/login/")
    console.login(operator_user)
    pages = [
        reverse("admin:index"),
        reverse("admin:sagas_taskinstance_changelist"),
        task_path(task),
        reverse("admin:sagas_task_cancel", args=[task.pk]),
        reverse("sagas-inbox"),
        reverse("sagas-breakers"),
        reverse("sagas-locks"),
        reverse("admin:sagas_auditentry_changelist"),
        reverse("sagas-dashboard"),
    ]
    responses = [login_page]
    for path in pages:
        responses.append(console.goto(path))
    with page.expect_response(lambda r: r.request.resource_type in ("xhr", "fetch")):
        pass  # the dashboard's htmx refresh (every 5 s)
    for response in responses:
        policy = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in policy, f"{response.url}: {policy!r}"
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    console.assert_clean()


# --- screenshots for docs/operations.md ----------------------------------------------------------


@pytest.fixture
def example_sagas_only() -> Iterator[None]:
    """The registry as a deploy of the examples has it (the engine tests add theirs)."""
    examples = set(settings.SAGA_MODULES)
    removed = [
        (registry.get(name), registry._origins[name])
        for name in registry.names()
        if registry._origins[name] not in examples
    ]
    for saga, _origin in removed:
        registry.unregister(saga.name)
    yield
    for saga, origin in removed:
        registry.register(saga, origin=origin)


def settled_demo_tasks() -> dict[str, TaskInstance]:
    """A spread of finished and parked chaos tasks, as an operator meets them."""
    scripts: dict[str, dict[str, Any]] = {
        "order-1041": {},
        "order-1042": {"fail": {"charge": 2}},
        "order-1043": {"fail": {"ship": -1}},
        "order-1044": {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}},
        "order-1045": {"fail": {"charge": -1}, "on_exhausted": "dead_letter"},
    }
    tasks = {key: demo_task(key, script) for key, script in scripts.items()}
    engine.wait_for(
        lambda: all(engine.terminal(t) for t in tasks.values()), 60, message="tasks still active"
    )
    return tasks


def demo_task(key: str, script: dict[str, Any]) -> TaskInstance:
    return start("chaos", script, business_key=key, correlation_id=f"checkout-{key[-4:]}")[0]


def reconciled_create_zip(s3: Any, operator: Any) -> None:
    """create-zip's bucket as reconciliation meets it: two old orphans (one ignored by an
    operator), a new one, a zip a completed task owns that is gone; found by two dry runs."""
    old = ["create-zip/2026-11-28/export-1187.zip", "create-zip/2026-11-29/export-1203.zip"]
    for key in old:
        put(s3, key)
    time.sleep(ORPHAN_GAP_S)
    put(s3, "create-zip/2026-12-01/export-1240.zip")
    step_owning("create-zip/2026-11-30/export-1219.zip")
    scope = reconciliation.scope_for("create-zip", RUN_GRACE)
    assert reconciliation.reconcile(scope) is not None
    kept = Finding.objects.get(key=old[0])
    note = {"note": "kept for the customer's dispute, ticket OPS-88"}
    assert findings.change_state(kept, "ignored", actor=operator, details=note, now=timezone.now())
    assert reconciliation.reconcile(scope) is not None


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SAGAS_SCREENSHOTS") != "1",
    reason="set SAGAS_SCREENSHOTS=1 to rewrite docs/screenshots/ (tracked files)",
)
def test_screenshots_for_the_operators_guide(
    console, operator_user, one_worker, example_sagas_only, s3
):
    tasks = settled_demo_tasks()
    open_breaker("s3")
    reconciled_create_zip(s3, operator_user)
    running = demo_task("order-1046", {"sleep_ms": {"ship": 30_000}})
    engine.wait_for(
        lambda: StepRecord.objects.filter(task=running, name="ship", progress__gte=20).exists(),
        30,
        message="the slow task's ship step did not progress",
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = console.page
    console.login(operator_user)
    shots = {
        "dashboard.png": reverse("sagas-dashboard"),
        "task-list.png": reverse("admin:sagas_taskinstance_changelist"),
        "task-running.png": task_path(running),
        "task-compensation-failed.png": task_path(tasks["order-1044"]),
        "inbox.png": reverse("sagas-inbox"),
        "breakers.png": reverse("sagas-breakers"),
        "findings.png": reverse("admin:sagas_finding_changelist"),
        "reconciliation-runs.png": reverse("admin:sagas_reconciliationrun_changelist"),
    }
    for name, path in shots.items():
        console.goto(path)
        page.screenshot(path=str(SCREENSHOTS / name))


# --- layout at 1400 px ------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_dashboard_panels_fit_their_width_at_1400_px(console, operator_user, one_worker):
    task, _ = start("chaos", {"sleep_ms": {"ship": 6000}})
    engine.wait_for(
        lambda: StepAttempt.objects.filter(step__task=task, outcome="running").exists(), 20
    )
    console.login(operator_user, then=reverse("sagas-dashboard"))
    expect(console.page.locator("#panel-queue")).to_contain_text("busy")
    overflowing = console.page.evaluate(
        """() => {
          const main = document.querySelector('#content-main').getBoundingClientRect();
          return [...document.querySelectorAll('.sagas-panel, .sagas-panel table')]
            .filter(e => e.getBoundingClientRect().right > main.right + 1)
            .map(e => `${e.closest('.sagas-panel').id} ${e.tagName}`
                      + ` right=${e.getBoundingClientRect().right} > ${main.right}`);
        }"""
    )
    assert not overflowing, f"wider than the page's content at 1400 px: {overflowing}"


# --- layout at 1400 px ------------------------------------------------------------------------

SPLIT_WORDS = """selector => {
  const split = [];
  for (const root of document.querySelectorAll(selector)) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const node = walker.currentNode;
      if (node.parentElement.closest('pre')) continue;  // tracebacks wrap as they must
      for (const match of node.textContent.matchAll(/[A-Za-z]{4,}/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (lines.size > 1) split.push(match[0]);
      }
    }
  }
  return [...new Set(split)];
}"""


def test_words_are_not_broken_mid_word_at_1400_px(console, operator_user, run_jobs):
    task, _ = start("chaos", {"fail": {"ship": -1}, "fail_compensation": {"reserve": -1}})
    run_jobs()
    console.login(operator_user)
    split = {}
    for path, cells in (
        (reverse("sagas-inbox"), "#inbox-groups td"),
        (reverse("admin:sagas_taskinstance_changelist"), "#result_list td"),
        (task_path(task), "#task-steps td, #task-steps th"),
    ):
        console.goto(path)
        split[path] = console.page.evaluate(SPLIT_WORDS, cells)
    assert not any(split.values()), f"words broken across lines: {split}"


# --- bulk actions: a real worker runs the job ---------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_operator_bulk_cancels_a_filtered_set_and_watches_its_progress(
    console, operator_user, workers
):
    # More pending chaos tasks than one page shows (so "select all" means the filtered set,
    # not the page), and finished tasks of another saga the filter leaves out. No worker
    # runs yet: the tasks stay pending until the bulk job, first in the queue, reaches them.
    wanted = [start("chaos", {})[0] for _ in range(55)]
    other = [start("create-zip", {"files": {"a.txt": "a"}})[0] for _ in range(2)]
    page = console.page
    console.login(operator_user)
    console.goto(f"{reverse('admin:sagas_taskinstance_changelist')}?saga=chaos")
    expect(page.locator("#result_list tbody tr")).to_have_count(50)
    page.check("#action-toggle")
    page.click(".actions .question a")  # "Select all 55 task instances"
    page.select_option("select[name=action]", "cancel_tasks")
    with page.expect_navigation():
        page.click(".actions button[type=submit]")
    expect(page.locator("#bulk-count")).to_have_text("55")
    page.fill("#bulk-note", "supplier outage: cancel the open orders")
    with page.expect_navigation():
        page.click("#confirm-bulk")
    assert "/admin/sagas/bulk/" in page.url
    landed = console.navigations
    expect(page.locator("#bulk-status")).not_to_have_text("done")
    workers("w1")
    expect(page.locator("#bulk-status")).to_have_text("done", timeout=LIVE_TIMEOUT_MS * 3)
    assert console.navigations == landed, "the progress page was reloaded"
    expect(page.locator("#bulk-succeeded")).to_have_text("55")
    expect(page.locator("#bulk-skipped")).to_have_text("0")
    requested = AuditEntry.objects.filter(action=AuditAction.CANCEL_REQUESTED)
    assert sorted(str(e.task_id) for e in requested) == sorted(str(t.pk) for t in wanted)
    assert {e.actor for e in requested} == {operator_user}
    assert all(refreshed(t).status == TaskStatus.CANCELLED for t in wanted)
    assert all(refreshed(t).status != TaskStatus.CANCELLED for t in other)


# --- reconciliation findings: a real worker acts on the real (moto) S3 -----------------------

OLD_ORPHAN = f"{sagas_for_findings.PREFIX}2026-11/left by a crashed worker.zip"
NEW_ORPHAN = f"{sagas_for_findings.PREFIX}2026-12/just uploaded.zip"


@pytest.fixture
def exports_worker(
    s3: Any, monkeypatch: pytest.MonkeyPatch, workers: Callable[..., Any]
) -> Iterator[Callable[[], Any]]:
    """``browser-exports`` known to this process (the live server), and a way to start a
    real worker that knows it too and writes to this test's bucket."""
    monkeypatch.setenv("SAGAS_S3_BUCKET", s3.bucket)  # the `s3` fixture set it in settings
    modules = [*settings.SAGA_MODULES, engine.TEST_SAGAS, sagas_for_findings.__name__]
    registry.register(sagas_for_findings.exports, origin=sagas_for_findings.__name__)
    yield lambda: workers("w1", SAGA_MODULES=",".join(modules))
    registry.unregister(sagas_for_findings.exports.name)


def recorded_orphans(s3: Any) -> dict[str, Finding]:
    """An old orphan and a new one in S3, found by a dry run (grace between their ages)."""
    put(s3, OLD_ORPHAN)
    time.sleep(ORPHAN_GAP_S)
    put(s3, NEW_ORPHAN)
    scope = reconciliation.scope_for(sagas_for_findings.exports.name, RUN_GRACE)
    run = reconciliation.reconcile(scope)
    assert run is not None and run.status == "succeeded", run and run.error
    found = {f.key: f for f in Finding.objects.all()}
    kinds = {key: (f.kind, f.state) for key, f in found.items()}
    assert kinds == {
        OLD_ORPHAN: ("orphan_object", "open"),
        NEW_ORPHAN: ("recent_orphan", "open"),
    }
    return found


def act_on_one_finding(console: Any, key: str, action: str, kind: str, note: str) -> None:
    """From the open findings: select the one with ``key``, run ``action``, check the
    confirmation's breakdown, confirm with ``note``; lands on the progress page."""
    page = console.page
    console.goto(reverse("admin:sagas_finding_changelist"))
    with page.expect_navigation():
        page.click('#changelist-filter a[href*="state__exact=open"]')
    row = page.locator("#result_list tbody tr", has_text=key)
    expect(row.locator(".sagas-status")).to_have_text("open")
    row.locator("input.action-select").check()
    page.select_option("select[name=action]", action)
    with page.expect_navigation():
        page.click(".actions button[type=submit]")
    expect(page.locator("#bulk-count")).to_have_text("1")
    breakdown = page.locator("#bulk-by-status tbody tr")
    expect(breakdown).to_have_count(1)
    expect(breakdown.locator("td")).to_have_text([f"{kind} · open", "1", "0"])
    page.fill("#bulk-note", note)
    with page.expect_navigation():
        page.click("#confirm-bulk")
    assert re.search(r"/admin/sagas/bulk/\d+/$", page.url), page.url
    assert "Started:" in console.messages()


def assert_one_succeeded(console: Any) -> None:
    """The latest bulk operation acted on its one finding, as its page and its row say."""
    operation = BulkOperation.objects.latest("pk")
    outcome = (operation.succeeded, operation.skipped, operation.failed)
    assert outcome == (1, 0, 0), (operation.skipped_examples, operation.last_error)
    for counter, value in zip(("succeeded", "skipped", "failed"), outcome, strict=True):
        expect(console.page.locator(f"#bulk-{counter}")).to_have_text(str(value))


def finding_row(console: Any, key: str) -> Any:
    return console.page.locator("#result_list tbody tr", has_text=key)


@pytest.mark.postgres
@pytest.mark.slow
def test_operator_archives_one_orphan_and_ignores_another_a_viewer_can_do_neither(
    console, operator_user, viewer_user, s3, exports_worker
):
    recorded = recorded_orphans(s3)
    old, new = recorded[OLD_ORPHAN], recorded[NEW_ORPHAN]
    archived_as = settings.SAGAS_ARCHIVE_PREFIX + OLD_ORPHAN
    page = console.page
    console.login(operator_user, then=reverse("admin:sagas_reconciliationrun_changelist"))
    run = page.locator("#result_list tbody tr")
    expect(run).to_have_count(1)
    expect(run.locator(".sagas-status")).to_have_text("succeeded")
    expect(run).to_contain_text("orphan_object 1")
    expect(run).to_contain_text("recent_orphan 1")
    expect(page.locator("#start-run")).to_be_visible()  # an operator may start one

    # Archive the old orphan: confirmation, then a real worker runs the bulk job.
    archive_note = "INC-311: zips of the crashed export run, kept for the audit"
    act_on_one_finding(console, OLD_ORPHAN, "archive_object", "orphan_object", archive_note)
    landed = console.navigations
    expect(page.locator("#bulk-status")).not_to_have_text("done")
    exports_worker()
    expect(page.locator("#bulk-status")).to_have_text("done", timeout=LIVE_TIMEOUT_MS * 3)
    assert console.navigations == landed, "the progress page was reloaded"
    assert_one_succeeded(console)
    assert keys(s3) == {archived_as, NEW_ORPHAN}
    with page.expect_navigation():
        page.locator("#bulk-progress a", has_text="Back to the finding list").click()
    expect(finding_row(console, OLD_ORPHAN).locator(".sagas-status")).to_have_text("archived")
    expect(finding_row(console, OLD_ORPHAN)).to_contain_text(operator_user.get_username())
    archived = AuditEntry.objects.get(action=AuditAction.ORPHAN_ARCHIVED)
    assert archived.actor == operator_user
    assert archived.details["finding"] == old.pk and archived.details["key"] == OLD_ORPHAN
    assert archived.details["archived_as"] == archived_as
    assert archived.details["note"] == archive_note

    # Ignore the new one: its object stays where it is.
    ignore_note = "an export still being written; look again tomorrow"
    act_on_one_finding(console, NEW_ORPHAN, "ignore_finding", "recent_orphan", ignore_note)
    expect(page.locator("#bulk-status")).to_have_text("done", timeout=LIVE_TIMEOUT_MS * 3)
    assert_one_succeeded(console)
    console.goto(reverse("admin:sagas_finding_changelist"))
    expect(finding_row(console, NEW_ORPHAN).locator(".sagas-status")).to_have_text("ignored")
    expect(finding_row(console, OLD_ORPHAN).locator(".sagas-status")).to_have_text("archived")
    assert keys(s3) == {archived_as, NEW_ORPHAN}
    ignored = AuditEntry.objects.get(action=AuditAction.FINDING_IGNORED)
    assert (ignored.actor, ignored.details["finding"]) == (operator_user, new.pk)
    assert ignored.details["note"] == ignore_note

    # A viewer sees the findings and the runs, and no way to act on either.
    page.context.clear_cookies()
    console.login(viewer_user, then=reverse("admin:sagas_finding_changelist"))
    expect(page.locator("#result_list tbody tr")).to_have_count(2)
    expect(page.locator("select[name=action], .actions, #start-run")).to_have_count(0)
    console.goto(reverse("admin:sagas_reconciliationrun_changelist"))
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#start-run, #start-run-form")).to_have_count(0)

    def world() -> dict[str, Any]:
        return {
            "findings": sorted(Finding.objects.values_list("pk", "state", "acted_by")),
            "runs": ReconciliationRun.objects.count(),
            "bulk": BulkOperation.objects.count(),
            "audit": AuditEntry.objects.count(),
            "objects": keys(s3),
        }

    before = world()
    token = console.csrf_token()
    changelist = console.url(reverse("admin:sagas_finding_changelist"))
    # Each would change something if it were allowed: reopen the ignored finding, archive
    # the new orphan's object (every finding selected), start a run.
    for url, fields in (
        (changelist, {"action": "reopen_finding", "_selected_action": str(new.pk)}),
        (changelist, {"action": "archive_object", "select_across": "1", "index": "0"}),
        (console.url(reverse("admin:sagas_reconciliation_start")), {"apply": "on"}),
    ):
        form = {"csrfmiddlewaretoken": token, "post": "yes", "note": "forged", **fields}
        response = page.request.post(url, form=form, max_redirects=0)
        assert response.status == 403, f"{fields}: {response.status}"
        assert "CSRF" not in response.text(), f"{fields}: refused for CSRF, not permission"
    assert world() == before
    assert not AuditEntry.objects.filter(actor=viewer_user).exists()
