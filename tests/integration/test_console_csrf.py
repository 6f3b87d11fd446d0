"""Every console POST needs the CSRF token its own page's form carries.

An operator (group ``Saga operators``) with a browser-like client that enforces CSRF:
submitting a button's form without the token is refused (403, Django's CSRF failure
page) and changes nothing; the same form submitted as the page rendered it does its job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import pytest
from django.test import Client

import tests.integration.test_console_access as access
from sagas.engine.connection import redis
from sagas.models import AuditEntry, BulkOperation

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_redis")]

TOKEN_FIELD = "csrfmiddlewaretoken"


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str]] = field(default_factory=list)

    def data(self, *, with_token: bool, **extra: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in self.fields:
            if name != TOKEN_FIELD or with_token:
                values.setdefault(name, []).append(value)
        return values | extra


class FormParser(HTMLParser):
    """The forms of a page with their hidden inputs and textareas (what a browser sends)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif tag == "input" and self.forms and a.get("type") == "hidden":
            self.forms[-1].fields.append((a["name"], a.get("value", "")))
        elif tag == "textarea" and self.forms:
            self._textarea = a["name"]
            self.forms[-1].fields.append((a["name"], ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._textarea = None


def post_form(page: str, action_ends_with: str) -> Form:
    """The page's one POST form whose action ends so ("": the form posts to the page)."""
    parser = FormParser()
    parser.feed(page)
    found = [
        f
        for f in parser.forms
        if f.method == "post"
        and (f.action.endswith(action_ends_with) if action_ends_with else not f.action)
    ]
    assert len(found) == 1, f"no single POST form for {action_ends_with!r} on the page"
    assert any(name == TOKEN_FIELD for name, _ in found[0].fields), "the form has no CSRF token"
    return found[0]


@pytest.fixture
def world(django_user_model) -> access.World:
    return access.build_world(django_user_model)


@pytest.fixture
def browser(saga_operator) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(saga_operator)
    return client


# --- the console's POSTs: the page that carries the form, and what doing it changes --------


@dataclass(frozen=True)
class Button:
    page: Callable[[access.World], str]
    action: Callable[[access.World], str]
    done: Callable[[access.World], None]
    extra: dict[str, str] = field(default_factory=dict)


def task_page(task: str, suffix: str = "change/") -> Callable[[access.World], str]:
    return lambda w: f"/admin/sagas/taskinstance/{getattr(w, task).pk}/{suffix}"


def task_is(task: str, *statuses: str) -> Callable[[access.World], None]:
    def check(w: access.World) -> None:
        getattr(w, task).refresh_from_db()
        assert getattr(w, task).status in statuses

    return check


def breaker_closed(w: access.World) -> None:
    assert w.breaker.state().open_until == 0
    assert AuditEntry.objects.filter(action="breaker_reset").count() == 1


def lock_released(w: access.World) -> None:
    assert redis().get(w.lock) is None
    assert AuditEntry.objects.filter(action="lock_released").count() == 1


NOTE = {"note": "payments team confirmed, ticket OPS-9"}
BUTTONS = {
    "cancel": Button(
        task_page("running", "cancel/"),
        lambda w: f"/{w.running.pk}/cancel/",
        task_is("running", "cancelling", "cancelled"),
    ),
    "resolve": Button(
        task_page("failed"), lambda w: "/resolve/", task_is("failed", "resolved"), NOTE
    ),
    "retry-compensation": Button(
        task_page("compensation_failed"),
        lambda w: "/retry-compensation/",
        task_is("compensation_failed", "compensating"),
        NOTE,
    ),
    "redrive": Button(
        task_page("dead_lettered"),
        lambda w: "/redrive/",
        task_is("dead_lettered", "running"),
        NOTE,
    ),
    "breaker reset": Button(
        lambda w: "/admin/sagas/breakers/", lambda w: "/breakers/s3/reset/", breaker_closed
    ),
    "lock release": Button(
        lambda w: "/admin/sagas/locks/", lambda w: "/locks/release/", lock_released
    ),
}


def is_csrf_failure(response: Any) -> bool:
    return response.status_code == 403 and b"CSRF verification failed" in response.content


@pytest.mark.parametrize("name", BUTTONS)
def test_a_console_post_without_the_token_is_refused_and_changes_nothing(world, browser, name):
    button = BUTTONS[name]
    form = post_form(browser.get(button.page(world)).content.decode(), button.action(world))
    before = access.snapshot()
    response = browser.post(form.action, form.data(with_token=False, **button.extra))
    assert is_csrf_failure(response), response.content[:300]
    assert access.snapshot() == before


@pytest.mark.parametrize("name", BUTTONS)
def test_the_same_form_with_its_token_does_its_job(world, browser, name):
    button = BUTTONS[name]
    form = post_form(browser.get(button.page(world)).content.decode(), button.action(world))
    response = browser.post(form.action, form.data(with_token=True, **button.extra))
    assert response.status_code == 302, response.content[:300]
    button.done(world)


# --- the task list's bulk action: Django's action POST, then its confirmation POST ------------

CHANGELIST = "/admin/sagas/taskinstance/"


def choose_bulk_cancel(browser: Client, world: access.World, *, with_token: bool) -> Any:
    form = post_form(browser.get(CHANGELIST).content.decode(), "")
    data = form.data(with_token=with_token)
    data |= {"action": "cancel_tasks", "_selected_action": [str(world.running.pk)], "index": "0"}
    return browser.post(CHANGELIST, data)


def test_the_bulk_action_post_without_the_token_is_refused(world, browser):
    before = access.snapshot()
    assert is_csrf_failure(choose_bulk_cancel(browser, world, with_token=False))
    assert access.snapshot() == before


def test_the_bulk_confirmation_without_the_token_is_refused(world, browser):
    confirmation = choose_bulk_cancel(browser, world, with_token=True)
    assert confirmation.status_code == 200
    form = post_form(confirmation.content.decode(), "")
    before = access.snapshot()
    response = browser.post(CHANGELIST, form.data(with_token=False, **NOTE))
    assert is_csrf_failure(response)
    assert access.snapshot() == before
    assert BulkOperation.objects.exclude(pk=world.bulk.pk).count() == 0


def test_the_bulk_action_with_its_tokens_starts_the_operation(world, browser):
    confirmation = choose_bulk_cancel(browser, world, with_token=True)
    form = post_form(confirmation.content.decode(), "")
    response = browser.post(CHANGELIST, form.data(with_token=True, **NOTE))
    assert response.status_code == 302
    started = BulkOperation.objects.exclude(pk=world.bulk.pk).get()
    assert response["Location"] == f"/admin/sagas/bulk/{started.pk}/"
    assert (started.action, started.total, started.note) == ("cancel", 1, NOTE["note"])
