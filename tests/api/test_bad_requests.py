"""Bad input gets a documented 4xx with a JSON body and changes no row (design principle 8).

Every request here is made by a user who holds every permission, so what is refused is
the request itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.core.exceptions import RequestDataTooBig
from django.test import RequestFactory

from sagas import api_errors
from sagas.services import start
from tests.api.conftest import row_counts

pytestmark = pytest.mark.django_db

LIST = "/api/distributed-tasks/chaos/"
TASK = "/api/distributed-tasks/chaos/{task}"
LIMIT = 256 * 1024


@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    status: int
    error: str
    body: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    extra: dict[str, str] = field(default_factory=dict)


def nested(depth: int) -> bytes:
    return ('{"input": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode()


CASES = {
    # the body
    "not json": Bad("POST", LIST, 400, "invalid_json", raw=b"{input: }"),
    "truncated json": Bad("POST", LIST, 400, "invalid_json", raw=b'{"input": {'),
    "json array": Bad("POST", LIST, 400, "invalid_body", body=[{"input": {}}]),
    "json string": Bad("POST", LIST, 400, "invalid_body", body="input"),
    "json null": Bad("POST", LIST, 400, "invalid_body", raw=b"null"),
    "empty body": Bad(
        "POST", LIST, 400, "invalid_body", raw=b"", extra={"CONTENT_TYPE": "application/json"}
    ),
    "input missing": Bad("POST", LIST, 400, "invalid_body", body={"business_key": "k"}),
    "input is a list": Bad("POST", LIST, 400, "invalid_body", body={"input": [1, 2]}),
    "input is a string": Bad("POST", LIST, 400, "invalid_body", body={"input": "{}"}),
    "unknown field": Bad("POST", LIST, 400, "invalid_body", body={"input": {}, "priority": 1}),
    "NaN": Bad("POST", LIST, 400, "invalid_json", raw=b'{"input": {"x": NaN}}'),
    "Infinity": Bad("POST", LIST, 400, "invalid_json", raw=b'{"input": {"x": -Infinity}}'),
    "overflowing float": Bad("POST", LIST, 400, "invalid_input", raw=b'{"input": {"x": 1e999}}'),
    "deep nesting": Bad("POST", LIST, 400, "invalid_body", raw=nested(200)),
    "very deep nesting": Bad(
        "POST", LIST, 400, "invalid_json", raw=b'{"input": ' + b"[" * 10**5 + b"]" * 10**5 + b"}"
    ),
    "NUL in a value": Bad("POST", LIST, 400, "invalid_body", body={"input": {"x": "a\x00b"}}),
    "NUL in a key": Bad("POST", LIST, 400, "invalid_body", body={"input": {"a\x00": 1}}),
    "NUL in business key": Bad(
        "POST", LIST, 400, "invalid_body", body={"input": {}, "business_key": "k\x00"}
    ),
    "lone surrogate": Bad("POST", LIST, 400, "invalid_body", raw=b'{"input": {"x": "\\ud800"}}'),
    "not utf-8": Bad("POST", LIST, 400, "invalid_json", raw=b'{"input": {"x": "\xff\xfe"}}'),
    # what start() refuses
    "business key not a string": Bad(
        "POST", LIST, 400, "invalid_input", body={"input": {}, "business_key": 42}
    ),
    "business key empty": Bad(
        "POST", LIST, 400, "invalid_input", body={"input": {}, "business_key": " "}
    ),
    "business key too long": Bad(
        "POST", LIST, 400, "invalid_input", body={"input": {}, "business_key": "k" * 201}
    ),
    "correlation id not a string": Bad(
        "POST", LIST, 400, "invalid_input", body={"input": {}, "correlation_id": ["a"]}
    ),
    "input the saga rejects": Bad(
        "POST", LIST, 400, "invalid_input", body={"input": {"fail": {"charge": "x"}}}
    ),
    "business key conflict": Bad(
        "POST",
        LIST,
        409,
        "business_key_conflict",
        body={"input": {"fail": {"ship": 1}}, "business_key": "used"},
    ),
    "unknown saga": Bad(
        "POST", "/api/distributed-tasks/nope/", 404, "unknown_saga", body={"input": {}}
    ),
    # framing
    "text/plain": Bad(
        "POST", LIST, 415, "unsupported_media_type", raw=b"{}", content_type="text/plain"
    ),
    "form encoded": Bad(
        "POST",
        LIST,
        415,
        "unsupported_media_type",
        raw=b"input=1",
        content_type="application/x-www-form-urlencoded",
    ),
    "multipart garbage": Bad(
        "POST",
        LIST,
        415,
        "unsupported_media_type",
        raw=b"--x\r\n",
        content_type="multipart/form-data; boundary=x",
    ),
    "latin-1 json": Bad(
        "POST",
        LIST,
        415,
        "unsupported_media_type",
        body={"input": {}},
        content_type="application/json; charset=latin-1",
    ),
    "no content type": Bad("POST", LIST, 415, "unsupported_media_type", raw=b"", content_type=""),
    "body over the limit": Bad(
        "POST",
        LIST,
        413,
        "body_too_large",
        raw=json.dumps({"input": {"x": "y" * LIMIT}}).encode(),
    ),
    "content-length over the limit": Bad(
        "POST",
        LIST,
        413,
        "body_too_large",
        body={"input": {}},
        extra={"CONTENT_LENGTH": str(LIMIT + 1)},
    ),
    "content-length of 5000 digits": Bad(
        "POST",
        LIST,
        413,
        "body_too_large",
        body={"input": {}},
        extra={"CONTENT_LENGTH": "9" * 5000},
    ),
    "content-length not a number": Bad(
        "POST", LIST, 400, "bad_request", body={"input": {}}, extra={"CONTENT_LENGTH": "12abc"}
    ),
    # methods
    "PUT on the list": Bad("PUT", LIST, 405, "method_not_allowed", body={"input": {}}),
    "PATCH on a task": Bad("PATCH", TASK, 405, "method_not_allowed", body={}),
    "POST on a task": Bad("POST", TASK, 405, "method_not_allowed", body={"input": {}}),
    "DELETE on the list": Bad("DELETE", LIST, 405, "method_not_allowed"),
    "POST on health": Bad("POST", "/api/health", 405, "method_not_allowed", body={}),
    # the list's parameters
    "unknown status": Bad("GET", LIST + "?status=done", 400, "invalid_parameter"),
    "status twice": Bad("GET", LIST + "?status=running&status=failed", 400, "invalid_parameter"),
    "unknown parameter": Bad("GET", LIST + "?stauts=running", 400, "invalid_parameter"),
    "limit zero": Bad("GET", LIST + "?limit=0", 400, "invalid_parameter"),
    "limit too big": Bad("GET", LIST + "?limit=1000", 400, "invalid_parameter"),
    "limit not a number": Bad("GET", LIST + "?limit=ten", 400, "invalid_parameter"),
    "limit negative": Bad("GET", LIST + "?limit=-5", 400, "invalid_parameter"),
    "limit of 5000 digits": Bad("GET", LIST + "?limit=" + "9" * 5000, 400, "invalid_parameter"),
    "cursor garbage": Bad("GET", LIST + "?cursor=not-a-cursor", 400, "invalid_cursor"),
    "cursor of base64 junk": Bad("GET", LIST + "?cursor=eyJjIjogMX0", 400, "invalid_cursor"),
    "cursor non-ascii": Bad("GET", LIST + "?cursor=%C3%A9t%C3%A9", 400, "invalid_cursor"),
    "NUL in a filter": Bad("GET", LIST + "?business_key=a%00b", 400, "invalid_parameter"),
    # tasks that are not there
    "malformed uuid": Bad("GET", "/api/distributed-tasks/chaos/12345", 404, "not_found"),
    "unknown task": Bad(
        "GET",
        "/api/distributed-tasks/chaos/2b5e0c3a-0000-4000-8000-000000000000",
        404,
        "not_found",
    ),
    "task of another saga": Bad(
        "GET", "/api/distributed-tasks/create-zip/{task}", 404, "not_found"
    ),
    "cancel malformed uuid": Bad("DELETE", "/api/distributed-tasks/chaos/x%20y", 404, "not_found"),
    # cancel bodies
    "cancel reason not a string": Bad("DELETE", TASK, 400, "invalid_body", body={"reason": 7}),
    "cancel reason too long": Bad("DELETE", TASK, 400, "invalid_body", body={"reason": "r" * 2001}),
    "cancel unknown field": Bad("DELETE", TASK, 400, "invalid_body", body={"why": "x"}),
    "cancel body not json": Bad("DELETE", TASK, 400, "invalid_json", raw=b"because"),
    "cancel body text/plain": Bad(
        "DELETE", TASK, 415, "unsupported_media_type", raw=b"because", content_type="text/plain"
    ),
    # paths
    "unknown path": Bad("GET", "/api/nothing", 404, "not_found"),
    "unknown path with slash": Bad("GET", "/api/nothing/", 404, "not_found"),
    "bare /api": Bad("GET", "/api", 404, "not_found"),
    "list without its slash": Bad(
        "POST", "/api/distributed-tasks/chaos", 404, "not_found", body={"input": {}}
    ),
    "task with a slash": Bad("DELETE", TASK + "/", 404, "not_found"),
    "health with a slash": Bad("GET", "/api/health/", 404, "not_found"),
}


@pytest.fixture
def existing_task():
    task, _ = start("chaos", {}, business_key="used")
    return task


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_bad_request_gets_its_4xx_as_json_and_changes_nothing(api, existing_task, case: Bad):
    counts = row_counts()
    response = api.request(
        case.method,
        case.path.format(task=existing_task.pk),
        case.body,
        raw=case.raw,
        content_type=case.content_type,
        **case.extra,
    )
    assert response.status_code == case.status, response.content[:300]
    body = response.json()
    assert body["error"] == case.error
    assert isinstance(body["detail"], str) and body["detail"]
    assert row_counts() == counts
    assert existing_task.__class__.objects.get(pk=existing_task.pk).status == "pending"


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_405_lists_the_allowed_methods(api):
    assert api.request("PUT", LIST, {})["Allow"] == "GET, HEAD, POST"
    assert api.request("OPTIONS", "/api/health")["Allow"] == "GET, HEAD"


def test_a_body_at_the_limit_is_read(api, settings):
    settings.SAGAS_API_MAX_BODY_BYTES = 100
    body = json.dumps({"input": {"fail": {}}, "business_key": "k"}).encode()
    padded = body[:-1] + b" " * (100 - len(body)) + b"}"
    assert len(padded) == 100
    assert api.post(LIST, raw=padded).status_code == 201
    assert api.post(LIST, raw=padded + b" ").status_code == 413


def test_django_refusing_a_big_body_is_a_json_413_under_the_api():
    request = RequestFactory().post("/api/distributed-tasks/chaos/")
    response = api_errors.bad_request(request, RequestDataTooBig("too big"))
    assert response.status_code == 413
    assert json.loads(response.content)["error"] == "body_too_large"
    page = api_errors.bad_request(RequestFactory().get("/admin/"), RequestDataTooBig("x"))
    assert page["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        (api_errors.bad_request, 400),
        (api_errors.permission_denied, 403),
        (api_errors.page_not_found, 404),
    ],
)
def test_django_error_handlers_answer_json_under_the_api_only(handler, status):
    api_response = handler(RequestFactory().get("/api/anything"), Exception("x"))
    assert (api_response.status_code, api_response["Content-Type"]) == (status, "application/json")
    page = handler(RequestFactory().get("/admin/anything"), Exception("x"))
    assert page.status_code == status and page["Content-Type"].startswith("text/html")


def test_a_500_under_the_api_is_json(client, monkeypatch):
    from sagas import health

    def explode():
        raise RuntimeError("boom")

    monkeypatch.setattr(health, "failing_checks", explode)
    client.raise_request_exception = False
    response = client.get("/api/health")
    assert response.status_code == 500
    assert response.json()["error"] == "server_error"
    assert api_errors.server_error(RequestFactory().get("/admin/")).status_code == 500


def test_missing_trailing_slash_outside_the_api_still_redirects(client):
    assert client.get("/admin").status_code == 301


def test_a_500_under_the_api_is_json_even_with_debug_on(client, monkeypatch, settings):
    from sagas import health

    def explode():
        raise RuntimeError("boom")

    settings.DEBUG = True
    monkeypatch.setattr(health, "failing_checks", explode)
    client.raise_request_exception = False
    response = client.get("/api/health")
    assert (response.status_code, response["Content-Type"]) == (500, "application/json")
    assert response.json() == {
        "error": "server_error",
        "detail": "RuntimeError: boom (DEBUG is on)",
    }


def test_with_debug_on_404s_under_the_api_are_still_json(client, monkeypatch, settings):
    from django.http import Http404

    from sagas import health

    def missing():
        raise Http404("no such thing")

    settings.DEBUG = True
    monkeypatch.setattr(health, "failing_checks", missing)
    response = client.get("/api/health")
    assert (response.status_code, response["Content-Type"]) == (404, "application/json")
    unknown = client.get("/api/no-such-thing/")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
