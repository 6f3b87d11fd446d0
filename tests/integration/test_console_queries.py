"""The console's pages run as many queries for many tasks (attempts, parked tasks) as for a
few: no query per row. Each page is measured at a small and a large size and the counts
compared, so the test does not pin a number that any harmless change would break."""

from __future__ import annotations

from datetime import timedelta
from itertools import cycle

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sagas import audit
from sagas.models import StepAttempt, StepRecord, TaskInstance
from sagas.services import start
from sagas.states import CompensationReason, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_redis")]


@pytest.fixture
def browser(saga_operator) -> Client:
    # An operator: the task page also renders its action forms.
    client = Client()
    client.force_login(saga_operator)
    return client


def queries(client: Client, url: str, *, htmx: bool = False) -> list[str]:
    """The SQL one request runs (the page, or its htmx partial)."""
    headers = {"HX-Request": "true"} if htmx else {}
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, headers=headers)
    assert response.status_code in (200, 286), (url, response.status_code)
    return [q["sql"] for q in captured.captured_queries]


def assert_same_count(small: list[str], large: list[str]) -> None:
    extra = "\n".join(large[len(small) :]) if len(large) > len(small) else ""
    assert len(large) == len(small), f"{len(small)} queries grew to {len(large)}:\n{extra}"


def _move(step: StepRecord, *statuses: StepStatus) -> None:
    for status in statuses:
        assert transition_step(step, status)


# --- tasks of every kind -------------------------------------------------------------------


def running_task(n: int) -> TaskInstance:
    task, _ = start("chaos", {}, business_key=f"run-{n}", correlation_id=f"corr-{n}")
    assert transition(task, TaskStatus.RUNNING, fields={"current_step": "reserve"})
    step = StepRecord.objects.get(task=task, name="reserve")
    _move(step, StepStatus.RUNNING)
    StepRecord.objects.filter(pk=step.pk).update(progress=n % 100, progress_message=f"{n}")
    StepAttempt.objects.create(step=step, kind="action", number=1, worker=f"w{n}")
    return task


def compensation_failed_task(n: int, saga: str, step_name: str, error: str) -> TaskInstance:
    task, _ = start(saga, _input(saga), business_key=f"cf-{n}")
    step = StepRecord.objects.get(task=task, name=step_name)
    assert transition(task, TaskStatus.RUNNING)
    _move(step, StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
    assert transition(
        task, TaskStatus.COMPENSATING, fields={"compensation_reason": CompensationReason.FAILURE}
    )
    _move(step, StepStatus.COMPENSATION_FAILED)
    StepRecord.objects.filter(pk=step.pk).update(compensation_error=f"{error}: task {n}")
    assert transition(task, TaskStatus.COMPENSATION_FAILED, fields={"finished_at": timezone.now()})
    return task


def dead_lettered_task(n: int, saga: str, step_name: str, error: str) -> TaskInstance:
    task, _ = start(saga, _input(saga), business_key=f"dl-{n}")
    step = StepRecord.objects.get(task=task, name=step_name)
    assert transition(task, TaskStatus.RUNNING)
    _move(step, StepStatus.RUNNING, StepStatus.FAILED)
    StepRecord.objects.filter(pk=step.pk).update(error=f"{error}: task {n}")
    assert transition(task, TaskStatus.DEAD_LETTERED, fields={"finished_at": timezone.now()})
    return task


def _input(saga: str) -> dict[str, object]:
    return {"files": {"a.txt": "a"}} if saga == "create-zip" else {}


PARKED_KINDS = [
    (compensation_failed_task, "chaos", "reserve", "ChaosFailure"),
    (compensation_failed_task, "chaos", "charge", "ChaosFailure"),
    (dead_lettered_task, "chaos", "charge", "ChaosFailure"),
    (dead_lettered_task, "create-zip", "upload", "ClientError"),
    (compensation_failed_task, "create-zip", "upload", "EndpointConnectionError"),
]


def parked_tasks(first: int, count: int) -> None:
    for n, (make, saga, step, error) in zip(
        range(first, first + count), cycle(PARKED_KINDS), strict=False
    ):
        make(n, saga, step, error)


def stuck_task(n: int) -> TaskInstance:
    """Running, nothing queued, untouched for an hour: stuck by the design's definition."""
    task, _ = start("chaos", {}, business_key=f"stuck-{n}")
    assert transition(task, TaskStatus.RUNNING)
    TaskInstance.objects.filter(pk=task.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    return task


def mixed_tasks(first: int, count: int) -> None:
    """Running, parked, stuck and pending tasks of both sagas, in turn."""
    makers = cycle(
        [
            running_task,
            lambda n: parked_tasks(n, 1),
            stuck_task,
            lambda n: start("create-zip", _input("create-zip"), business_key=f"p-{n}"),
            lambda n: parked_tasks(n + 1, 1),
        ]
    )
    for n in range(first, first + count):
        next(makers)(n * 10)


# --- the pages --------------------------------------------------------------------------------

LIST_URLS = [
    "/admin/sagas/taskinstance/",
    "/admin/sagas/taskinstance/?status__exact=running",
    "/admin/sagas/taskinstance/?attention=stuck",
    "/admin/sagas/taskinstance/?attention=parked&saga=chaos",
]


@pytest.mark.parametrize("url", LIST_URLS)
def test_the_task_list_runs_as_many_queries_for_40_tasks_as_for_3(browser, url):
    mixed_tasks(0, 3)
    queries(browser, url)
    small = queries(browser, url)
    mixed_tasks(100, 37)
    assert TaskInstance.objects.count() >= 40
    assert_same_count(small, queries(browser, url))


@pytest.mark.parametrize("htmx", [False, True], ids=["page", "htmx partial"])
def test_the_dashboard_runs_as_many_queries_for_40_tasks_as_for_3(browser, htmx):
    mixed_tasks(0, 3)
    queries(browser, "/admin/sagas/dashboard/", htmx=htmx)
    small = queries(browser, "/admin/sagas/dashboard/", htmx=htmx)
    mixed_tasks(100, 37)
    page = browser.get("/admin/sagas/dashboard/").content.decode()
    assert 'data-status="stuck">8<' in page  # the stuck ones are really found
    assert_same_count(small, queries(browser, "/admin/sagas/dashboard/", htmx=htmx))


def test_the_inbox_runs_as_many_queries_for_30_parked_tasks_as_for_2(browser):
    parked_tasks(0, 2)
    queries(browser, "/admin/sagas/inbox/")
    small = queries(browser, "/admin/sagas/inbox/")
    parked_tasks(100, 28)
    page = browser.get("/admin/sagas/inbox/").content.decode()
    assert page.count('class="button" href="/admin/sagas/taskinstance/?status__exact=') == 5
    assert_same_count(small, queries(browser, "/admin/sagas/inbox/"))


def task_with_history(name: str, attempts_per_step: int, audit_entries: int) -> TaskInstance:
    """A chaos task compensating after ship failed: every step with its attempts (actions,
    and undos for the earlier two) and a long audit trail."""
    task, _ = start("chaos", {}, business_key=name)
    assert transition(task, TaskStatus.RUNNING)
    steps = list(StepRecord.objects.filter(task=task).order_by("index"))
    for step in steps[:2]:
        _move(step, StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.COMPENSATING)
    _move(steps[2], StepStatus.RUNNING, StepStatus.FAILED)
    assert transition(
        task, TaskStatus.COMPENSATING, fields={"compensation_reason": CompensationReason.FAILURE}
    )
    for step in steps:
        kinds = ("action", "compensation") if step.status == "compensating" else ("action",)
        StepAttempt.objects.bulk_create(
            StepAttempt(step=step, kind=kind, number=n, outcome="failed", error=f"e{n}")
            for kind in kinds
            for n in range(1, attempts_per_step + 1)
        )
    for n in range(audit_entries):
        audit.record(task, "retry_scheduled", step=steps[n % 3], details={"attempt": n})
    return task


@pytest.mark.parametrize("htmx", [False, True], ids=["page", "htmx partial"])
def test_the_task_page_runs_as_many_queries_for_20_attempts_per_step_as_for_2(browser, htmx):
    # Both trails are longer than the page shows (50), so both count the rest the same way.
    few = task_with_history("few", attempts_per_step=2, audit_entries=55)
    many = task_with_history("many", attempts_per_step=20, audit_entries=300)
    url = "/admin/sagas/taskinstance/{}/change/"
    queries(browser, url.format(few.pk), htmx=htmx)
    small = queries(browser, url.format(few.pk), htmx=htmx)
    large = queries(browser, url.format(many.pk), htmx=htmx)
    assert_same_count(small, large)
    page = browser.get(url.format(many.pk)).content.decode()
    assert page.count('class="sagas-attempt"') == 20 * 3 + 20 * 2


def test_the_task_page_runs_as_many_queries_for_a_short_trail_as_for_a_long_one(browser):
    few = task_with_history("few", attempts_per_step=2, audit_entries=3)
    many = task_with_history("many", attempts_per_step=2, audit_entries=300)
    url = "/admin/sagas/taskinstance/{}/change/"
    queries(browser, url.format(few.pk))
    small = queries(browser, url.format(few.pk))
    large = queries(browser, url.format(many.pk))
    # Past the 50 entries shown, one COUNT says how many there are in all; nothing else grows.
    assert len(large) <= len(small) + 1, "\n".join(large)
