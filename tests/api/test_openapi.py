"""/api/openapi.json is a valid OpenAPI 3.1 document and real answers match it.

Every request made through ``ApiClient`` (all API tests) is validated against the document;
this module also walks each documented operation once and checks none is left out.
"""

from __future__ import annotations

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from sagas.services import start
from sagas.states import TaskStatus
from sagas.transitions import transition
from tests.api.conftest import DOCUMENT, TEMPLATES, task_url, tasks_url

pytestmark = pytest.mark.django_db


def test_the_served_document_is_valid_openapi_3_1(anonymous):
    response = anonymous.get("/api/openapi.json")
    assert response.status_code == 200
    served = response.json()
    assert served == DOCUMENT
    assert served["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(served).validate()


def test_every_documented_operation_answers_as_documented(api, anonymous, make_user, token_client):
    task_id = api.post(tasks_url(), {"input": {}, "business_key": "doc"}).json()["id"]
    api.post(tasks_url(), {"input": {}, "business_key": "doc"})  # 200 replay
    other, _ = start("chaos", {})
    api.get(tasks_url() + "?limit=1")
    api.get(task_url(task_id, "chaos"))
    api.delete(task_url(other), {"reason": "documented"})
    api.delete(task_url(other))  # already cancelled
    api.get("/api/health?detail=1")
    anonymous.get("/api/health")
    anonymous.get("/api/openapi.json")
    operator = token_client(
        make_user(
            "doc-operator", "view_taskinstance", "resolve_taskinstance", "redrive_taskinstance"
        )
    )
    parked, _ = start("chaos", {})
    transition(parked, TaskStatus.RUNNING)
    transition(parked, TaskStatus.FAILED)
    operator.post(task_url(parked) + "/redrive", {"note": "documented"})  # 409 not_allowed
    operator.post(task_url(parked) + "/retry-compensation", {"note": "documented"})  # 409
    operator.post(task_url(parked) + "/resolve", {"note": "documented"})  # 200

    seen = [*api.seen, *anonymous.seen, *operator.seen]
    called = {(method.lower(), _template(path)) for method, path, _ in seen}
    documented = {
        (method, template)
        for template, operations in DOCUMENT["paths"].items()
        for method in operations
    }
    assert documented <= called
    statuses = {status for _, _, status in api.seen}
    assert {200, 201, 202} <= statuses
    assert [status for _, _, status in operator.seen] == [409, 409, 200]


def _template(path: str) -> str:
    from urllib.parse import urlsplit

    from django.urls import resolve

    return TEMPLATES[str(resolve(urlsplit(path).path).url_name)]


def test_every_response_in_the_document_has_a_json_schema():
    for template, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert "application/json" in response["content"], (template, method, status)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "not-a-uuid", "status": "pending"}',
        b'{"id": "2b5e0c3a-0000-4000-8000-000000000000", "status": "sleeping"}',
        b'{"status": "pending"}',
    ],
)
def test_the_check_itself_catches_an_answer_that_breaks_the_document(body):
    from django.http import HttpResponse
    from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]

    from tests.api.conftest import assert_documented

    response = HttpResponse(body, status=201, content_type="application/json")
    with pytest.raises(ValidationError):
        assert_documented(response, "POST", tasks_url())
