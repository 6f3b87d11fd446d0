"""Who may open or act on each console URL: every URL under /admin/sagas/ x every role.

The table is checked against the resolver, so a new console URL without a row fails here.
Every request that is refused (or is only a page) must leave tasks, steps, the audit
trail, circuit breakers, task locks, reconciliation runs and findings, and the job queue
exactly as they were.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLResolver, get_resolver, resolve
from django.utils import timezone

from sagas.bulk import RUN_BULK
from sagas.definitions import CircuitBreakerPolicy
from sagas.engine.breaker import CircuitBreaker
from sagas.engine.connection import key, queue, redis
from sagas.engine.locks import lock_key
from sagas.models import (
    ApiToken,
    AuditEntry,
    BulkOperation,
    Finding,
    ReconciliationRun,
    StepAttempt,
    StepRecord,
    TaskInstance,
)
from sagas.reconciliation import CONSOLE_JOB
from sagas.services import start
from sagas.states import CompensationReason, StepStatus, TaskStatus
from sagas.transitions import transition, transition_step
from tests.conftest import console_group

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_redis")]

ROLES = ("anonymous", "staff", "viewer", "operator")
GROUP_OF_ROLE = {"viewer": "Saga viewers", "operator": "Saga operators"}
CONSOLE_PREFIX = "admin/sagas/"
STALE_TOKEN = "stale-holder-token"


# --- the world each request runs against --------------------------------------------------


@dataclass
class World:
    """Tasks in the states the actions accept, an open breaker, a stale lock, a token, a
    finished reconciliation run and its open findings."""

    running: TaskInstance
    failed: TaskInstance
    compensation_failed: TaskInstance
    dead_lettered: TaskInstance
    entry: AuditEntry
    token: ApiToken
    lock: str
    breaker: CircuitBreaker
    bulk: BulkOperation
    run: ReconciliationRun
    orphan: Finding
    stuck: Finding


def _step(task: TaskInstance, name: str) -> StepRecord:
    return StepRecord.objects.get(task=task, name=name)


def _walk_step(task: TaskInstance, name: str, *statuses: StepStatus) -> StepRecord:
    step = _step(task, name)
    for status in statuses:
        assert transition_step(step, status)
    return step


def _running_task() -> TaskInstance:
    task, _ = start("chaos", {}, business_key="access-running")
    assert transition(task, TaskStatus.RUNNING, fields={"current_step": "charge"})
    _walk_step(task, "reserve", StepStatus.RUNNING, StepStatus.SUCCEEDED)
    _walk_step(task, "charge", StepStatus.RUNNING)
    return task


def _failed_task() -> TaskInstance:
    task, _ = start("chaos", {}, business_key="access-failed")
    assert transition(task, TaskStatus.RUNNING)
    _walk_step(task, "reserve", StepStatus.RUNNING, StepStatus.FAILED)
    assert transition(task, TaskStatus.FAILED)
    return task


def _compensation_failed_task() -> TaskInstance:
    task, _ = start("chaos", {}, business_key="access-compensation-failed")
    assert transition(task, TaskStatus.RUNNING)
    _walk_step(task, "reserve", StepStatus.RUNNING, StepStatus.SUCCEEDED)
    _walk_step(task, "charge", StepStatus.RUNNING, StepStatus.FAILED)
    assert transition(
        task, TaskStatus.COMPENSATING, fields={"compensation_reason": CompensationReason.FAILURE}
    )
    _walk_step(task, "reserve", StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED)
    assert transition(task, TaskStatus.COMPENSATION_FAILED)
    return task


def _dead_lettered_task() -> TaskInstance:
    task, _ = start("chaos", {}, business_key="access-dead-lettered")
    assert transition(task, TaskStatus.RUNNING)
    _walk_step(task, "reserve", StepStatus.RUNNING, StepStatus.SUCCEEDED)
    _walk_step(task, "charge", StepStatus.RUNNING, StepStatus.FAILED)
    assert transition(task, TaskStatus.DEAD_LETTERED)
    return task


def _stale_lock(task: TaskInstance) -> str:
    """A lock whose holding attempt stopped beating a minute ago (a crashed worker)."""
    step = _step(task, "charge")
    StepAttempt.objects.create(
        step=step,
        kind="action",
        number=1,
        outcome="running",
        worker="crashed-worker",
        lock_token=STALE_TOKEN,
        heartbeat_at=timezone.now() - timedelta(minutes=2),
        heartbeat_expires_at=timezone.now() - timedelta(minutes=1),
    )
    name = lock_key(task.pk)
    redis().set(name, STALE_TOKEN, px=60_000)
    return name


def _reconciliation_run(task: TaskInstance) -> tuple[ReconciliationRun, Finding, Finding]:
    """A finished dry run and what it found: an old orphan and a stuck task (rows only: no
    request of the table deletes or archives an object, so S3 is never asked)."""
    now = timezone.now()
    run = ReconciliationRun.objects.create(
        trigger="command",
        status="succeeded",
        finished_at=now,
        counts={"objects": 3, "owned": 2, "orphan_object": 1, "stuck_task": 1},
    )
    orphan = Finding.objects.create(
        run=run,
        kind="orphan_object",
        saga="create-zip",
        key="create-zip/orphan.zip",
        details={"size": 3, "last_modified": "2026-11-20T10:00:00+00:00"},
        first_seen=now,
        last_seen=now,
    )
    stuck = Finding.objects.create(
        run=run,
        kind="stuck_task",
        saga=task.saga,
        key=str(task.pk),
        task=task,
        details={"status": task.status},
        first_seen=now,
        last_seen=now,
    )
    return run, orphan, stuck


@pytest.fixture
def world(django_user_model) -> World:
    return build_world(django_user_model)


def build_world(users: Any) -> World:
    """One task for each action to act on, the ``s3`` breaker open, a stale lock held."""
    running = _running_task()
    breaker = CircuitBreaker(redis(), CircuitBreakerPolicy("s3", failure_threshold=5))
    assert breaker.record_failure(trial=True)
    owner = users.objects.create_user("token-owner")
    token = ApiToken(user=owner, name="ci")
    token.generate_key()
    token.save()
    run, orphan, stuck = _reconciliation_run(running)
    return World(
        running=running,
        failed=_failed_task(),
        compensation_failed=_compensation_failed_task(),
        dead_lettered=_dead_lettered_task(),
        entry=AuditEntry.objects.filter(task=running).earliest("id"),
        token=token,
        lock=_stale_lock(running),
        breaker=breaker,
        bulk=BulkOperation.objects.create(
            action="cancel", actor=owner, actor_name=owner.username, status="done"
        ),
        run=run,
        orphan=orphan,
        stuck=stuck,
    )


def client_for(role: str, django_user_model) -> Client:
    client = Client()
    if role == "anonymous":
        return client
    # No password: hashing one costs a second here, and force_login needs none.
    user = django_user_model.objects.create_user(f"{role}-user", is_staff=True)
    if role in GROUP_OF_ROLE:
        user.groups.add(console_group(GROUP_OF_ROLE[role]))
    client.force_login(user)
    return client


# --- what must not change ----------------------------------------------------------------


def snapshot() -> dict[str, Any]:
    client = redis()
    console_keys = sorted(
        k.decode()
        for pattern in (key("breaker", "*"), key("lock", "*"))
        for k in client.scan_iter(match=pattern)
    )
    return {
        "tasks": sorted(TaskInstance.objects.values_list("pk", "status", "version")),
        "steps": sorted(StepRecord.objects.values_list("pk", "status", "version")),
        "attempts": sorted(StepAttempt.objects.values_list("pk", "outcome")),
        "audit": AuditEntry.objects.count(),
        "tokens": sorted(ApiToken.objects.values_list("pk", "revoked_at")),
        "bulk": sorted(BulkOperation.objects.values_list("pk", "status", "position")),
        "runs": sorted(ReconciliationRun.objects.values_list("pk", "status", "finished_at")),
        "findings": sorted(Finding.objects.values_list("pk", "state", "kind", "run_id")),
        "redis": {k: (client.type(k), client.dump(k)) for k in console_keys},
        # Started bulk operations and reconciliation runs are jobs: a refused one queues none.
        "jobs": sorted(queue().job_ids),
    }


# --- the expected answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """An expected answer: a status code, and for redirects where they lead."""

    status: int
    location: Callable[[World], str] | None = None
    # For an operator's action that did its thing: what the world looks like after it.
    done: Callable[[World], None] | None = None
    message: str = ""


LOGIN = Expect(302, lambda w: "/admin/login/")
DENIED = Expect(403)
OK = Expect(200)
NOT_ALLOWED = Expect(405)
NOT_FOUND = Expect(404)


def answers(staff: Expect, viewer: Expect, operator: Expect) -> dict[str, Expect]:
    return {"anonymous": LOGIN, "staff": staff, "viewer": viewer, "operator": operator}


PAGE = answers(DENIED, OK, OK)
READ_ONLY_REFUSED = answers(DENIED, DENIED, DENIED)  # add, change, delete: nobody
GET_ONLY = answers(NOT_ALLOWED, NOT_ALLOWED, NOT_ALLOWED)


def action(done: Expect) -> dict[str, Expect]:
    """A POST that only operators may make."""
    return answers(DENIED, DENIED, done)


@dataclass(frozen=True)
class Row:
    route: str
    url: Callable[[World], str]
    get: dict[str, Expect]
    post: dict[str, Expect]
    data: Callable[[World], dict[str, str]] = field(default=lambda w: {})


def task_url(task: str, suffix: str) -> Callable[[World], str]:
    return lambda w: f"/admin/sagas/taskinstance/{getattr(w, task).pk}/{suffix}"


def entry_url(suffix: str) -> Callable[[World], str]:
    return lambda w: f"/admin/sagas/auditentry/{w.entry.pk}/{suffix}"


def token_url(suffix: str) -> Callable[[World], str]:
    return lambda w: f"/admin/sagas/apitoken/{w.token.pk}/{suffix}"


def to(url: Callable[[World], str]) -> Expect:
    return Expect(302, url)


def _status_is(task: str, *statuses: str) -> Callable[[World], None]:
    def check(w: World) -> None:
        getattr(w, task).refresh_from_db()
        assert getattr(w, task).status in statuses

    return check


def _breaker_closed(w: World) -> None:
    state = w.breaker.state()
    assert (state.failures, state.open_until) == (0, 0.0)
    assert AuditEntry.objects.filter(action="breaker_reset", details__breaker="s3").exists()


def _lock_released(w: World) -> None:
    assert redis().get(w.lock) is None
    assert AuditEntry.objects.filter(action="lock_released", task=w.running).exists()


def task_done(task: str, message: str, *statuses: str) -> Expect:
    return Expect(302, task_url(task, "change/"), _status_is(task, *statuses), message)


NOTE = {"note": "checked with the payments team, ticket OPS-7"}

TASK_ACTIONS = {
    "cancel/": (
        "running",
        task_done("running", "Cancel requested", "cancelling", "cancelled"),
    ),
    "resolve/": ("failed", task_done("failed", "Resolved", "resolved")),
    "retry-compensation/": (
        "compensation_failed",
        task_done("compensation_failed", "Compensation retried", "compensating"),
    ),
    "redrive/": ("dead_lettered", task_done("dead_lettered", "Redriven", "running")),
}


def _task_action_rows() -> Iterator[Row]:
    for suffix, (task, done) in TASK_ACTIONS.items():
        # Only cancel has a page (its confirmation); the others answer GET with 405.
        get = action(OK) if suffix == "cancel/" else action(NOT_ALLOWED)
        yield Row(
            f"taskinstance/<path:object_id>/{suffix}",
            task_url(task, suffix),
            get,
            action(done),
            lambda w: NOTE,
        )


def _model_rows(model: str, url: Callable[[str], Callable[[World], str]]) -> list[Row]:
    """The admin's own URLs for a read-only model of the console (its list aside)."""
    changelist = f"/admin/sagas/{model}/"
    return [
        Row(f"{model}/add/", lambda w: f"{changelist}add/", READ_ONLY_REFUSED, READ_ONLY_REFUSED),
        Row(
            f"{model}/<path:object_id>/delete/",
            url("delete/"),
            READ_ONLY_REFUSED,
            READ_ONLY_REFUSED,
        ),
        # The admin's old-style object URL forwards to the change page, which checks.
        Row(
            f"{model}/<path:object_id>/",
            url(""),
            answers(*[to(url("change/"))] * 3),
            answers(*[to(url("change/"))] * 3),
        ),
    ]


TASKS = _model_rows("taskinstance", lambda suffix: task_url("running", suffix))
AUDIT = _model_rows("auditentry", entry_url)


def _bulk_started(w: World) -> None:
    operation = BulkOperation.objects.exclude(pk=w.bulk.pk).get()
    assert (operation.action, operation.total, operation.note) == ("cancel", 1, NOTE["note"])


def _bulk_cancel(w: World) -> dict[str, Any]:
    """The task list's bulk cancel, confirmed: an admin action POST."""
    return {
        "action": "cancel_tasks",
        "_selected_action": [str(w.running.pk)],
        "post": "yes",
        **NOTE,
    }


def _latest_bulk(w: World) -> str:
    return f"/admin/sagas/bulk/{BulkOperation.objects.latest('pk').pk}/"


def finding_url(suffix: str) -> Callable[[World], str]:
    return lambda w: f"/admin/sagas/finding/{w.orphan.pk}/{suffix}"


def run_url(suffix: str) -> Callable[[World], str]:
    return lambda w: f"/admin/sagas/reconciliationrun/{w.run.pk}/{suffix}"


FINDINGS = _model_rows("finding", finding_url)
RUNS = _model_rows("reconciliationrun", run_url)
# No change form for either: a finding's page is the list narrowed to it, a run's page is
# its findings. Nothing to change there, so a POST is only sent there too.
TO_THE_FINDING = answers(
    DENIED, *[to(lambda w: f"/admin/sagas/finding/?id__exact={w.orphan.pk}")] * 2
)
TO_THE_RUNS_FINDINGS = answers(
    DENIED, *[to(lambda w: f"/admin/sagas/finding/?run__id__exact={w.run.pk}")] * 2
)


def _jobs(func_name: str) -> list[Any]:
    return [job for job in queue().jobs if job.func_name == func_name]


def _ignore_started(w: World) -> None:
    operation = BulkOperation.objects.exclude(pk=w.bulk.pk).get()
    assert (operation.action, operation.target_ids, operation.note) == (
        "ignore_finding",
        [str(w.orphan.pk)],
        NOTE["note"],
    )
    assert [job.args for job in _jobs(RUN_BULK)] == [(operation.pk, operation.run)]
    # The finding itself changes only when a worker runs the job (none runs here).
    assert Finding.objects.get(pk=w.orphan.pk).state == "open"


def _ignore_the_orphan(w: World) -> dict[str, Any]:
    """The findings list's "Ignore selected findings…", confirmed: an admin action POST."""
    return {
        "action": "ignore_finding",
        "_selected_action": [str(w.orphan.pk)],
        "post": "yes",
        **NOTE,
    }


def _run_queued(w: World) -> None:
    """Start a run now: the run is queued as a job; its row appears when a worker starts it."""
    operator = get_user_model().objects.get(username="operator-user")
    # A dry run (no "apply" ticked), started by this operator.
    assert [job.args for job in _jobs(CONSOLE_JOB)] == [(operator.pk, False)]
    assert list(ReconciliationRun.objects.values_list("pk", flat=True)) == [w.run.pk]


ROWS = [
    Row(
        "taskinstance/",
        lambda w: "/admin/sagas/taskinstance/",
        PAGE,
        action(Expect(302, _latest_bulk, _bulk_started, "Started: cancel 1 task")),
        _bulk_cancel,
    ),
    *TASKS,
    Row(
        "taskinstance/<path:object_id>/change/",
        task_url("running", "change/"),
        PAGE,
        action(DENIED),
    ),
    Row(
        "taskinstance/<path:object_id>/history/",
        task_url("running", "history/"),
        answers(
            DENIED, *[to(lambda w: f"/admin/sagas/auditentry/?task__id__exact={w.running.pk}")] * 2
        ),
        answers(
            DENIED, *[to(lambda w: f"/admin/sagas/auditentry/?task__id__exact={w.running.pk}")] * 2
        ),
    ),
    Row("taskinstance/<path:object_id>/progress/", task_url("running", "progress/"), PAGE, PAGE),
    *_task_action_rows(),
    # The audit list offers no action: a POST there only shows the list.
    Row("auditentry/", lambda w: "/admin/sagas/auditentry/", PAGE, PAGE),
    *AUDIT,
    Row("auditentry/<path:object_id>/change/", entry_url("change/"), PAGE, READ_ONLY_REFUSED),
    Row("auditentry/<path:object_id>/history/", entry_url("history/"), PAGE, PAGE),
    # API tokens: neither group may see or manage them.
    Row("apitoken/", lambda w: "/admin/sagas/apitoken/", READ_ONLY_REFUSED, READ_ONLY_REFUSED),
    Row(
        "apitoken/add/",
        lambda w: "/admin/sagas/apitoken/add/",
        READ_ONLY_REFUSED,
        READ_ONLY_REFUSED,
    ),
    *[
        Row(
            f"apitoken/<path:object_id>/{suffix}",
            token_url(suffix),
            READ_ONLY_REFUSED,
            READ_ONLY_REFUSED,
        )
        for suffix in ("change/", "delete/")
    ],
    # Someone else's token does not exist for them: the admin's "perhaps it was deleted".
    Row(
        "apitoken/<path:object_id>/history/",
        token_url("history/"),
        answers(*[to(lambda w: "/admin/")] * 3),
        answers(*[to(lambda w: "/admin/")] * 3),
    ),
    Row(
        "apitoken/<path:object_id>/",
        token_url(""),
        answers(*[to(token_url("change/"))] * 3),
        answers(*[to(token_url("change/"))] * 3),
    ),
    # Pages that belong to no model (sagas/views/urls.py).
    Row("dashboard/", lambda w: "/admin/sagas/dashboard/", PAGE, GET_ONLY),
    Row("inbox/", lambda w: "/admin/sagas/inbox/", PAGE, GET_ONLY),
    Row("breakers/", lambda w: "/admin/sagas/breakers/", PAGE, GET_ONLY),
    Row(
        "breakers/<str:name>/reset/",
        lambda w: "/admin/sagas/breakers/s3/reset/",
        GET_ONLY,
        action(
            Expect(302, lambda w: "/admin/sagas/breakers/", _breaker_closed, "Breaker s3 reset")
        ),
    ),
    Row("locks/", lambda w: "/admin/sagas/locks/", PAGE, GET_ONLY),
    # A bulk operation's progress: for whoever started it or may do the same.
    Row("bulk/<int:pk>/", lambda w: f"/admin/sagas/bulk/{w.bulk.pk}/", action(OK), GET_ONLY),
    Row(
        "locks/release/",
        lambda w: "/admin/sagas/locks/release/",
        GET_ONLY,
        action(Expect(302, lambda w: "/admin/sagas/locks/", _lock_released, "Released")),
        lambda w: {"key": w.lock, "token": STALE_TOKEN},
    ),
    # Reconciliation: findings and runs are read-only lists; a finding changes only through
    # an action (a bulk operation, run by a worker), a run starts only through start/.
    Row(
        "finding/",
        lambda w: "/admin/sagas/finding/",
        PAGE,
        # A POST to the findings list is an action: refused to those who have none.
        action(Expect(302, _latest_bulk, _ignore_started, "Started: ignore 1 finding")),
        _ignore_the_orphan,
    ),
    *FINDINGS,
    Row("finding/<path:object_id>/change/", finding_url("change/"), TO_THE_FINDING, TO_THE_FINDING),
    # Django's own change log (empty: findings change through actions, in the audit trail).
    Row("finding/<path:object_id>/history/", finding_url("history/"), PAGE, PAGE),
    # The runs list has no action: a POST there only shows the list.
    Row("reconciliationrun/", lambda w: "/admin/sagas/reconciliationrun/", PAGE, PAGE),
    *RUNS,
    Row(
        "reconciliationrun/<path:object_id>/change/",
        run_url("change/"),
        TO_THE_RUNS_FINDINGS,
        TO_THE_RUNS_FINDINGS,
    ),
    Row("reconciliationrun/<path:object_id>/history/", run_url("history/"), PAGE, PAGE),
    Row(
        "reconciliationrun/start/",
        lambda w: "/admin/sagas/reconciliationrun/start/",
        GET_ONLY,
        action(
            Expect(
                302,
                lambda w: "/admin/sagas/reconciliationrun/",
                _run_queued,
                "A reconciliation run (a dry run) is queued",
            )
        ),
    ),
]
TABLE = {CONSOLE_PREFIX + row.route: row for row in ROWS}
# The app's index (/admin/sagas/) and the admin's index (/admin/): staff who may see
# nothing of the app get the admin's "page does not exist" for the app index.
INDEXES = {
    "/admin/sagas/": answers(NOT_FOUND, OK, OK),
    "/admin/": answers(OK, OK, OK),
}


# --- the table covers the resolver -----------------------------------------------------------


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, route)
        else:
            yield route


def console_routes() -> set[str]:
    return {r for r in _routes(get_resolver().url_patterns) if r.startswith(CONSOLE_PREFIX)}


def test_every_console_url_pattern_has_a_row_in_the_table():
    routes = console_routes()
    assert routes - set(TABLE) == set(), "console URLs without a row in the access table"
    assert set(TABLE) - routes == set(), "rows for URLs the console no longer has"
    # The console's own pages (sagas.views.urls) and the task actions are all there.
    for name in ("dashboard/", "inbox/", "breakers/", "locks/", "locks/release/"):
        assert CONSOLE_PREFIX + name in routes
    assert resolve("/admin/sagas/").url_name == "app_list"


# --- the table, request by request -----------------------------------------------------------


# POSTs whose job is enqueued when the request's transaction commits (django-rq's
# on_db_commit, the engine's enqueue-after-commit): their requests run outside the test's
# transaction, as in production, so the job really reaches Redis (or, refused, does not).
# (Inside one, start/ answers 500: django-rq returns None for a deferred enqueue, and
# reconciliation.enqueue_console_run reads its ``.id``.)
COMMITTING = {
    ("POST", CONSOLE_PREFIX + "finding/"),
    ("POST", CONSOLE_PREFIX + "reconciliationrun/start/"),
}
CASES = [
    pytest.param(
        route,
        role,
        method,
        id=f"{method} {route} as {role}",
        marks=[pytest.mark.django_db(transaction=True)] if (method, route) in COMMITTING else [],
    )
    for route, row in TABLE.items()
    for method in ("GET", "POST")
    for role in ROLES
]


def _check_answer(response: Any, expected: Expect, world: World, url: str) -> None:
    assert response.status_code == expected.status, response.content[:500]
    if expected is LOGIN:
        assert response["Location"] == "/admin/login/?" + urlencode({"next": url}, safe="/")
    elif expected.location is not None:
        assert response["Location"] == expected.location(world)


def _assert_message(client: Client, response: Any, text: str) -> None:
    page = client.get(response["Location"]).content.decode()
    assert re.search(r'class="messagelist".*' + re.escape(text), page, re.S), page[:2000]


@pytest.mark.parametrize(("route", "role", "method"), CASES)
def test_console_answers_each_role(world, django_user_model, route, role, method):
    row = TABLE[route]
    expected = (row.get if method == "GET" else row.post)[role]
    client = client_for(role, django_user_model)
    url = row.url(world)
    before = snapshot()
    response = client.get(url) if method == "GET" else client.post(url, row.data(world))
    _check_answer(response, expected, world, url)
    if expected.done is None:
        assert snapshot() == before, "a refused request or a page view changed something"
        return
    expected.done(world)
    _assert_message(client, response, expected.message)


@pytest.mark.parametrize("url", INDEXES)
@pytest.mark.parametrize("role", ROLES)
def test_admin_and_app_index_answer_each_role(world, django_user_model, url, role):
    expected = INDEXES[url][role]
    client = client_for(role, django_user_model)
    before = snapshot()
    response = client.get(url)
    _check_answer(response, expected, world, url)
    assert snapshot() == before
    if url == "/admin/" and expected is OK:
        # The console's links on the admin index are for those who may open them.
        links = 'id="sagas-console-links"' in response.content.decode()
        assert links is (role != "staff")


def test_refused_action_posts_leave_the_breaker_open_and_the_lock_held(world, django_user_model):
    viewer = client_for("viewer", django_user_model)
    assert viewer.post("/admin/sagas/breakers/s3/reset/").status_code == 403
    assert (
        viewer.post(
            "/admin/sagas/locks/release/", {"key": world.lock, "token": STALE_TOKEN}
        ).status_code
        == 403
    )
    assert world.breaker.state().status(time.time()) == "open"
    assert redis().get(world.lock) == STALE_TOKEN.encode()
