"""HTTP API tests: clients by session or token, and every JSON answer checked against the
OpenAPI document (``api_client`` validates each response it gets)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import Resolver404, resolve
from openapi_schema_validator import OAS31Validator, oas31_format_checker

from sagas.definitions import Saga, registry
from sagas.models import ApiToken, AuditEntry, StepAttempt, StepRecord, TaskInstance
from sagas.openapi import document

DOCUMENT = document()
TEMPLATES = {
    "api-tasks": "/api/distributed-tasks/{saga}/",
    "api-task": "/api/distributed-tasks/{saga}/{id}",
    "api-task-resolve": "/api/distributed-tasks/{saga}/{id}/resolve",
    "api-task-retry-compensation": "/api/distributed-tasks/{saga}/{id}/retry-compensation",
    "api-task-redrive": "/api/distributed-tasks/{saga}/{id}/redrive",
    "api-health": "/api/health",
    "api-openapi": "/api/openapi.json",
}
JSON = "application/json"
ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
ALL_PERMISSIONS = ("view_taskinstance", "add_taskinstance", "cancel_taskinstance")

# A saga that may not be cancelled (the examples all may).
uncancellable = Saga("api-uncancellable")


@uncancellable.step
def book(ctx: Any) -> dict[str, Any]:
    return {"booked": True}


registry.register(uncancellable, origin="tests.api.conftest")


def documented_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The schema the document gives for this answer; fails if the answer is undocumented."""
    try:
        name = resolve(urlsplit(path).path).url_name
    except Resolver404:
        name = None
    if name not in TEMPLATES or status == 405:
        assert status in (404, 405), f"{method} {path}: {status} from an undocumented path"
        return ERROR_SCHEMA
    template = TEMPLATES[name]
    operation = DOCUMENT["paths"][template][method.lower()]
    assert str(status) in operation["responses"], (
        f"{method} {template} answered {status}, which the OpenAPI document does not list"
    )
    schema: dict[str, Any] = operation["responses"][str(status)]["content"][JSON]["schema"]
    return schema


def assert_documented(response: Any, method: str, path: str) -> None:
    assert response["Content-Type"] == "application/json", response.content[:200]
    schema = {
        **documented_schema(method, path, response.status_code),
        "components": DOCUMENT["components"],
    }
    body = json.loads(response.content)
    OAS31Validator(schema, format_checker=oas31_format_checker).validate(body)


class ApiClient:
    """A Django test client that sends JSON and checks every answer against the document."""

    def __init__(self, client: Client, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}
        self.seen: list[tuple[str, str, int]] = []

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | str | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> Any:
        data = raw if raw is not None else ("" if body is None else json.dumps(body))
        response = self.client.generic(
            method,
            path,
            data,
            content_type=content_type,
            headers={**self.headers, **(headers or {})},
            **extra,
        )
        if method != "HEAD":
            assert_documented(response, method, path)
        self.seen.append((method, path, response.status_code))
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, body, **kwargs)

    def delete(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("DELETE", path, body, **kwargs)


@pytest.fixture
def make_user(django_user_model):
    def make(name: str, *codenames: str, **fields: Any):
        user = django_user_model.objects.create_user(name, **fields)
        user.user_permissions.set(
            Permission.objects.filter(content_type__app_label="sagas", codename__in=codenames)
        )
        return user

    return make


def issue_token(user, name: str = "tests") -> str:
    token = ApiToken(user=user, name=name)
    plain = token.generate_key()
    token.save()
    return plain


@pytest.fixture
def token_client():
    def build(user, *, csrf_checks: bool = True) -> ApiClient:
        client = Client(enforce_csrf_checks=csrf_checks)
        return ApiClient(client, {"Authorization": f"Bearer {issue_token(user)}"})

    return build


@pytest.fixture
def session_client():
    def build(user, *, csrf_checks: bool = True) -> ApiClient:
        client = Client(enforce_csrf_checks=csrf_checks)
        client.force_login(user)
        return ApiClient(client)

    return build


@pytest.fixture
def anonymous():
    return ApiClient(Client(enforce_csrf_checks=True))


@pytest.fixture
def api(make_user, token_client):
    """A token client whose user may start, read and cancel."""
    return token_client(make_user("integrator", *ALL_PERMISSIONS))


def row_counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (TaskInstance, StepRecord, StepAttempt, AuditEntry)
    }


def tasks_url(saga: str = "chaos") -> str:
    return f"/api/distributed-tasks/{saga}/"


def task_url(task: Any, saga: str | None = None) -> str:
    return f"/api/distributed-tasks/{saga or task.saga}/{getattr(task, 'pk', task)}"
