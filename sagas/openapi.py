"""The OpenAPI 3.1 description of the HTTP API, served at ``/api/openapi.json``.

Written by hand and kept true by tests/api/test_openapi.py, which validates real responses
of every operation against it.
"""

from __future__ import annotations

import copy
from typing import Any

from sagas.states import AttemptKind, AttemptOutcome, StepStatus, TaskStatus

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(type_: str, **extra: Any) -> Schema:
    return {"type": [type_, "null"], **extra}


TIMESTAMP = _nullable("string", format="date-time")


def _object(required: list[str], properties: dict[str, Schema], **extra: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, **extra}


def _json_response(description: str, schema: Schema, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _error(description: str) -> dict[str, Any]:
    return _json_response(description, _ref("Error"))


ERRORS = {
    "400": _error("Bad request: malformed body, parameter or cursor."),
    "401": _error("No credentials, or an unknown or revoked token."),
    "403": _error("Missing permission, or a session request without its CSRF token."),
    "404": _error("Unknown saga, task or path."),
    "413": _error("The body is larger than SAGAS_API_MAX_BODY_BYTES."),
    "415": _error("The body is not application/json in UTF-8."),
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: ERRORS[code] for code in codes}


SCHEMAS: dict[str, Schema] = {
    "Error": _object(
        ["error", "detail"],
        {
            "error": {"type": "string", "description": "A stable, machine-readable code."},
            "detail": {"type": "string", "description": "What went wrong, for humans."},
            "outcome": {"type": "string"},
            "status": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "string"}},
        },
    ),
    "StartRequest": _object(
        ["input"],
        {
            "input": {"type": "object", "description": "The saga's input; checked by the saga."},
            "business_key": _nullable(
                "string", maxLength=200, description="Idempotency key: one task per key."
            ),
            "correlation_id": _nullable("string", maxLength=200),
        },
        additionalProperties=False,
    ),
    "Started": _object(
        ["id", "status"],
        {"id": {"type": "string", "format": "uuid"}, "status": _ref("TaskStatus")},
    ),
    "CancelRequest": _object(
        [],
        {"reason": {"type": "string", "maxLength": 2000}},
        additionalProperties=False,
    ),
    "CancelOutcome": _object(
        ["outcome"],
        {
            "outcome": {
                "enum": [
                    "cancelled",
                    "already_cancelled",
                    "not_found",
                    "not_cancellable",
                    "already_completed",
                    "already_finished",
                ]
            },
            "status": _ref("TaskStatus"),
            "error": {"type": "string"},
            "detail": {"type": "string"},
        },
    ),
    "NoteRequest": _object(
        ["note"],
        {
            "note": {
                "type": "string",
                "minLength": 1,
                "maxLength": 2000,
                "pattern": "\\S",
                "description": "Why: goes into the audit trail with the caller as the actor.",
            }
        },
        additionalProperties=False,
    ),
    "NotAllowed": {
        "allOf": [
            _ref("Error"),
            _object(
                ["outcome", "status"],
                {"outcome": {"const": "not_allowed"}, "status": _ref("TaskStatus")},
            ),
        ]
    },
    "TaskStatus": {"enum": list(TaskStatus.values)},
    "TaskSummary": _object(
        [
            "id",
            "saga",
            "status",
            "business_key",
            "correlation_id",
            "trace_id",
            "created_at",
            "started_at",
            "finished_at",
            "cancel_requested_at",
            "cancelled_at",
        ],
        {
            "id": {"type": "string", "format": "uuid"},
            "saga": {"type": "string"},
            "status": _ref("TaskStatus"),
            "business_key": _nullable("string"),
            "correlation_id": {"type": "string"},
            "trace_id": {"type": "string"},
            "current_step": {"type": "string"},
            "error_summary": {"type": "string"},
            "compensation_reason": {"enum": ["failure", "cancel", None]},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": TIMESTAMP,
            "finished_at": TIMESTAMP,
            "cancel_requested_at": TIMESTAMP,
            "cancelled_at": TIMESTAMP,
        },
    ),
    "Task": {
        "allOf": [
            _ref("TaskSummary"),
            _object(
                ["input", "steps"],
                {
                    "input": {"type": "object"},
                    "steps": {"type": "array", "items": _ref("Step")},
                },
            ),
        ]
    },
    "Step": _object(
        [
            "name",
            "index",
            "status",
            "attempt_count",
            "data",
            "error",
            "compensation_error",
            "progress",
            "attempts",
        ],
        {
            "name": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
            "status": {"enum": list(StepStatus.values)},
            "group": _nullable("string", description="The parallel group of a branch."),
            "critical": {"type": "boolean"},
            "attempt_count": {"type": "integer", "minimum": 0},
            "compensation_attempt_count": {"type": "integer", "minimum": 0},
            "data": {"description": "What the action returned (any JSON), or null."},
            "error": {"type": "string"},
            "compensation_error": {"type": "string"},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "progress_message": {"type": "string"},
            "started_at": TIMESTAMP,
            "finished_at": TIMESTAMP,
            "next_attempt_at": TIMESTAMP,
            "attempts": {"type": "array", "items": _ref("Attempt")},
        },
    ),
    "Attempt": _object(
        ["kind", "number", "outcome", "worker", "started_at", "finished_at", "error"],
        {
            "kind": {"enum": list(AttemptKind.values)},
            "number": {"type": "integer", "minimum": 1},
            "outcome": {"enum": list(AttemptOutcome.values)},
            "worker": {"type": "string"},
            "started_at": {"type": "string", "format": "date-time"},
            "finished_at": TIMESTAMP,
            "error": {"type": "string"},
        },
    ),
    "TaskPage": _object(
        ["results", "next"],
        {
            "results": {"type": "array", "items": _ref("TaskSummary")},
            "next": _nullable("string", description="Pass as ?cursor= for the next page."),
        },
    ),
    "Health": _object(
        ["status"],
        {
            "status": {"enum": ["ok", "degraded"]},
            "failing": {"type": "array", "items": {"enum": ["database", "redis"]}},
            "detail": _ref("HealthDetail"),
        },
    ),
    "HealthDetail": _object(
        ["tasks_by_status", "queues", "open_breakers"],
        {
            "tasks_by_status": {
                "type": ["object", "null"],
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "queues": {
                "type": ["object", "null"],
                "additionalProperties": _ref("QueueDepth"),
            },
            "open_breakers": {
                "type": ["array", "null"],
                "items": _object(
                    ["name", "open_until"],
                    {
                        "name": {"type": "string"},
                        "open_until": {"type": "string", "format": "date-time"},
                    },
                ),
            },
        },
    ),
    "QueueDepth": _object(
        ["queued", "scheduled", "started", "failed", "workers", "oldest_queued_age_s"],
        {
            "queued": {"type": "integer", "minimum": 0},
            "scheduled": {"type": "integer", "minimum": 0},
            "started": {"type": "integer", "minimum": 0},
            "failed": {"type": "integer", "minimum": 0},
            "workers": {"type": "integer", "minimum": 0},
            "oldest_queued_age_s": _nullable("number", minimum=0),
        },
    ),
}

SAGA = {
    "name": "saga",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The saga's registered name, e.g. chaos.",
}
TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}


def _query(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    schema = schema or {"type": "string"}
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


LIST_PARAMETERS = [
    SAGA,
    _query("status", "Only tasks in this status.", _ref("TaskStatus")),
    _query("business_key", "Only the task with this business key."),
    _query("correlation_id", "Only tasks with this correlation id."),
    _query("cursor", "The `next` value of the previous page."),
    _query(
        "limit",
        "Page size, 1 to 200 (default 50).",
        {"type": "integer", "minimum": 1, "maximum": 200},
    ),
]

TASKS_PATH = {
    "get": {
        "operationId": "listTasks",
        "summary": "List a saga's tasks, newest first (keyset pagination).",
        "parameters": LIST_PARAMETERS,
        "responses": {
            "200": _json_response("A page of tasks.", _ref("TaskPage")),
            **_errors("400", "401", "403", "404"),
        },
    },
    "post": {
        "operationId": "startTask",
        "summary": "Start a task (idempotent on business_key).",
        "description": "Needs the sagas.add_taskinstance permission.",
        "parameters": [SAGA],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _ref("StartRequest")}},
        },
        "responses": {
            "201": _json_response("Started.", _ref("Started")),
            "200": _json_response("The business key was used before: that task.", _ref("Started")),
            "409": _error(
                "The business key was used with another input (outcome business_key_conflict)."
            ),
            **_errors("400", "401", "403", "404", "413", "415"),
        },
    },
}

TASK_PATH = {
    "get": {
        "operationId": "readTask",
        "summary": "A task with its steps and attempts.",
        "parameters": [SAGA, TASK_ID],
        "responses": {
            "200": _json_response("The task.", _ref("Task")),
            **_errors("401", "403", "404"),
        },
    },
    "delete": {
        "operationId": "cancelTask",
        "summary": "Cancel a task: stop its running step, then undo what succeeded.",
        "description": "Needs the custom sagas.cancel_taskinstance permission.",
        "parameters": [SAGA, TASK_ID],
        "requestBody": {
            "required": False,
            "content": {JSON: {"schema": _ref("CancelRequest")}},
        },
        "responses": {
            "202": _json_response(
                "Cancelling (or cancelled if nothing ran).", _ref("CancelOutcome")
            ),
            "200": _json_response("Already cancelled or cancelling.", _ref("CancelOutcome")),
            "404": _json_response("No such task (outcome not_found).", _ref("CancelOutcome")),
            "409": _json_response(
                "not_cancellable, already_completed or already_finished.", _ref("CancelOutcome")
            ),
            **_errors("400", "401", "403", "413", "415"),
        },
    },
}


def _operator_action(operation_id: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "parameters": [SAGA, TASK_ID],
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref("NoteRequest")}},
            },
            "responses": {
                "200": _json_response("Done: the task as it is now.", _ref("Task")),
                "404": _error("No such task of this saga (outcome not_found)."),
                "409": _json_response(
                    "The task's status does not allow this (outcome not_allowed).",
                    _ref("NotAllowed"),
                ),
                **_errors("400", "401", "403", "413", "415"),
            },
        },
    }


RESOLVE_PATH = _operator_action(
    "resolveTask",
    "Close a parked task by hand, with a note.",
    "From compensation_failed, failed or dead_lettered, and only while none of its steps "
    "runs. Needs the custom sagas.resolve_taskinstance permission.",
)
RETRY_COMPENSATION_PATH = _operator_action(
    "retryCompensation",
    "Run a task's failed compensations again, each with a fresh retry budget.",
    "From compensation_failed. Needs the custom sagas.resolve_taskinstance permission.",
)
REDRIVE_PATH = _operator_action(
    "redriveTask",
    "Retry the work that dead-lettered a task, with a fresh retry budget.",
    "From dead_lettered. Needs the custom sagas.redrive_taskinstance permission.",
)

HEALTH_PATH = {
    "get": {
        "operationId": "health",
        "summary": "Whether the database and Redis answer; no login needed.",
        "description": "With ?detail=1 (needs sagas.view_taskinstance): queue depths, "
        "workers, the oldest queued job's age, open breakers and task counts by status.",
        "security": [{}, {"bearerAuth": []}, {"sessionAuth": []}],
        "parameters": [_query("detail", "1 (or true) adds the operators' detail.")],
        "responses": {
            "200": _json_response("Everything answers.", _ref("Health")),
            "503": _json_response("Something does not answer.", _ref("Health")),
            **_errors("401", "403"),
        },
    },
}

OPENAPI_PATH = {
    "get": {
        "operationId": "openapi",
        "summary": "This document.",
        "security": [{}],
        "responses": {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {JSON: {"schema": {"type": "object", "required": ["openapi", "paths"]}}},
            }
        },
    },
}


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Saga operations console API",
        "version": "1",
        "description": "Start, read, list and cancel saga tasks, and resolve, retry the "
        "compensation of or redrive them as an operator. See docs/api.md. Every "
        "answer is JSON; a method a path does not take is a 405 with the Error schema and an "
        "Allow header.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}, {"sessionAuth": []}],
    "paths": {
        "/api/distributed-tasks/{saga}/": TASKS_PATH,
        "/api/distributed-tasks/{saga}/{id}": TASK_PATH,
        "/api/distributed-tasks/{saga}/{id}/resolve": RESOLVE_PATH,
        "/api/distributed-tasks/{saga}/{id}/retry-compensation": RETRY_COMPENSATION_PATH,
        "/api/distributed-tasks/{saga}/{id}/redrive": REDRIVE_PATH,
        "/api/health": HEALTH_PATH,
        "/api/openapi.json": OPENAPI_PATH,
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token created in the admin (API tokens).",
            },
            "sessionAuth": {
                "type": "apiKey",
                "in": "cookie",
                "name": "sessionid",
                "description": "The console's login session; requests that change data "
                "also need the X-CSRFToken header.",
            },
        },
    },
}


def document() -> dict[str, Any]:
    """The whole OpenAPI document (a copy: callers may change it)."""
    return copy.deepcopy(_DOCUMENT)
