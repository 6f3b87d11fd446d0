"""JSON views of the HTTP API (contract pinned in docs/design.md, described in docs/api.md).

Each URL is a ``resource``: a map from HTTP method to a handler and the permission it
needs. The resource answers 405, checks the body's framing, authenticates and checks the
permission; handlers raise ``ApiError`` for anything the client got wrong.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.common import no_append_slash
from django.views.decorators.csrf import csrf_exempt

from sagas import authentication, health, openapi, services
from sagas.api_errors import ApiError, error_response, not_found_response
from sagas.definitions import UnknownSaga, registry
from sagas.models import TaskInstance
from sagas.pagination import Cursor, InvalidCursor, newest_first
from sagas.representations import task_detail, task_summary
from sagas.services import CancelOutcome
from sagas.states import TaskStatus

VIEW = "sagas.view_taskinstance"
ADD = "sagas.add_taskinstance"
CANCEL = "sagas.cancel_taskinstance"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_JSON_DEPTH = 64
MAX_REASON_LENGTH = 2000
MAX_NUMBER_DIGITS = 15
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[..., HttpResponse]


@dataclass(frozen=True)
class Route:
    handler: Handler
    permission: str | None = None
    body_required: bool = False


def resource(**routes: Route) -> Handler:
    """A view that dispatches on the method; every answer, error or not, is JSON."""
    allow = ", ".join(sorted({*routes, *(["HEAD"] if "GET" in routes else [])}))

    @csrf_exempt
    @no_append_slash
    @never_cache
    def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        route = routes.get("GET" if request.method == "HEAD" else str(request.method))
        if route is None:
            return _method_not_allowed(request, allow)
        try:
            _admit(request, route)
            return route.handler(request, **kwargs)
        except RequestDataTooBig:
            return _body_too_large().response()
        except ApiError as error:
            return error.response()

    return view


def _admit(request: HttpRequest, route: Route) -> None:
    """The checks before a handler runs, in the order that decides which error wins:
    413 from the headers, 401, 415 (before the CSRF check, which parses form bodies),
    then 403 for CSRF or the permission."""
    _check_length(request)
    if route.permission is not None:
        authentication.identify(request)
    _check_content_type(request, route)
    if route.permission is not None:
        authentication.authorize(request, route.permission)


def _method_not_allowed(request: HttpRequest, allow: str) -> HttpResponse:
    response = error_response(
        405, "method_not_allowed", f"{request.method} is not allowed here; use {allow}."
    )
    response["Allow"] = allow
    return response


# --- request bodies -------------------------------------------------------------------


def _check_length(request: HttpRequest) -> None:
    """From the headers alone, before anything reads the body."""
    if _content_length(request) > settings.SAGAS_API_MAX_BODY_BYTES:
        raise _body_too_large()


def _check_content_type(request: HttpRequest, route: Route) -> None:
    """Before the CSRF check, which would otherwise parse form bodies."""
    has_body = request.method in METHODS_WITH_BODY and _content_length(request) > 0
    if not (has_body or route.body_required):
        return
    charset = (request.content_params or {}).get("charset", "utf-8").lower()
    if request.content_type != "application/json" or charset not in {"utf-8", "utf8"}:
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json in UTF-8.")


def _content_length(request: HttpRequest) -> int:
    raw = request.META.get("CONTENT_LENGTH") or "0"
    if not raw.isascii() or not raw.isdigit():
        raise ApiError(400, "bad_request", "The Content-Length header is not a number.")
    if len(raw) > MAX_NUMBER_DIGITS:
        raise _body_too_large()  # and int() of thousands of digits would raise
    return int(raw)


def _body_too_large() -> ApiError:
    limit = settings.SAGAS_API_MAX_BODY_BYTES
    return ApiError(413, "body_too_large", f"The request body is larger than {limit} bytes.")


def json_object_body(request: HttpRequest) -> dict[str, Any]:
    """The body as a JSON object ({} when empty) that every database can store."""
    body = request.body
    if len(body) > settings.SAGAS_API_MAX_BODY_BYTES:
        raise _body_too_large()
    if not body.strip():
        return {}
    value = _parse_json(body)
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_body", "The body must be a JSON object.")
    _check_storable(value)
    return value


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_storable(value: Any) -> None:
    """Reject what Postgres or SQLite cannot store: NUL, lone surrogates, very deep nesting."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, "invalid_body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            pending.extend((k, depth) for k in item)
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_body", "Strings may not contain lone surrogates.") from None
    if "\x00" in text:
        raise ApiError(400, "invalid_body", "Strings may not contain NUL characters.")


def _only_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(
            400,
            "invalid_body",
            f"Unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}.",
        )


# --- tasks ----------------------------------------------------------------------------


def start_task(request: HttpRequest, saga: str) -> JsonResponse:
    """POST: start a task; 200 with the existing task when the business key was used."""
    _require_registered(saga)
    body = json_object_body(request)
    _only_keys(body, {"input", "business_key", "correlation_id"})
    if not isinstance(body.get("input"), dict):
        raise ApiError(400, "invalid_body", "'input' is required and must be a JSON object.")
    task, created = _start(saga, body, request)
    location = reverse("api-task", kwargs={"saga": saga, "task_id": task.pk})
    return JsonResponse(
        {"id": str(task.pk), "status": task.status},
        status=201 if created else 200,
        headers={"Location": location},
    )


def _start(saga: str, body: dict[str, Any], request: HttpRequest) -> tuple[TaskInstance, bool]:
    try:
        return services.start(
            saga,
            body["input"],
            business_key=body.get("business_key"),
            correlation_id=body.get("correlation_id"),
            actor=request.user,
        )
    except UnknownSaga:
        raise _unknown_saga(saga) from None
    except services.InvalidInput as exc:
        messages = [str(m) for m in exc.messages]
        raise ApiError(400, "invalid_input", "; ".join(messages), messages=messages) from None
    except services.BusinessKeyConflict:
        raise ApiError(
            409,
            "business_key_conflict",
            "This business key was already used with a different input.",
            outcome="business_key_conflict",
        ) from None


def list_tasks(request: HttpRequest, saga: str) -> JsonResponse:
    """GET: tasks of a saga, newest first, one keyset page at a time."""
    if saga not in registry and not TaskInstance.objects.filter(saga=saga).exists():
        raise _unknown_saga(saga)
    tasks = TaskInstance.objects.filter(saga=saga, **_list_filters(request.GET))
    after, limit = _cursor(request.GET), _limit(request.GET)
    page = newest_first(tasks, after, limit)
    return JsonResponse(
        {
            "results": [task_summary(task) for task in page.tasks],
            "next": page.next.encode() if page.next else None,
        }
    )


LIST_PARAMETERS = ("status", "business_key", "correlation_id", "cursor", "limit")


def _list_filters(params: QueryDict) -> dict[str, str]:
    unknown = sorted(set(params) - set(LIST_PARAMETERS))
    if unknown:
        raise _bad_parameter(f"Unknown parameter(s) {', '.join(unknown)}.")
    filters = {
        name: value
        for name in ("status", "business_key", "correlation_id")
        if (value := _parameter(params, name))
    }
    if "status" in filters and filters["status"] not in TaskStatus.values:
        raise _bad_parameter(f"Unknown status {filters['status']!r}.")
    return filters


def _parameter(params: QueryDict, name: str) -> str:
    values = params.getlist(name)
    if len(values) > 1:
        raise _bad_parameter(f"Give {name} at most once.")
    value = values[0] if values else ""
    if "\x00" in value:
        raise _bad_parameter(f"{name} may not contain NUL characters.")
    return value


def _cursor(params: QueryDict) -> Cursor | None:
    text = _parameter(params, "cursor")
    try:
        return Cursor.decode(text) if text else None
    except InvalidCursor:
        raise ApiError(400, "invalid_cursor", "The cursor is not one this API returned.") from None


def _limit(params: QueryDict) -> int:
    text = _parameter(params, "limit") or str(DEFAULT_PAGE_SIZE)
    valid = text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS
    if not valid or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise _bad_parameter(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}.")
    return int(text)


def _bad_parameter(detail: str) -> ApiError:
    return ApiError(400, "invalid_parameter", detail)


def read_task(request: HttpRequest, saga: str, task_id: str) -> JsonResponse:
    """GET: one task with its steps and their attempts (three queries)."""
    task = _task_of(saga, task_id)
    if task is None:
        raise ApiError(404, "not_found", f"No task {task_id} of saga {saga!r}.")
    return _task_response(task)


def _task_response(task: TaskInstance) -> JsonResponse:
    steps = task.steps.order_by("index").prefetch_related("attempts")
    return JsonResponse(task_detail(task, steps))


def cancel_task(request: HttpRequest, saga: str, task_id: str) -> JsonResponse:
    """DELETE: cancel; the outcome and its status code are pinned (see ``services.cancel``)."""
    reason = _cancel_reason(json_object_body(request))
    task = _task_of(saga, task_id)
    if task is None:
        return cancel_response(CancelOutcome("not_found", "", 404))
    return cancel_response(services.cancel(task.pk, actor=request.user, reason=reason))


def _cancel_reason(body: dict[str, Any]) -> str:
    _only_keys(body, {"reason"})
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH:
        raise ApiError(
            400, "invalid_body", f"'reason' must be a string of at most {MAX_REASON_LENGTH} chars."
        )
    return reason


CANCEL_DETAILS = {
    "not_found": "No such task.",
    "not_cancellable": "This saga is not declared cancellable.",
    "already_completed": "The task has already completed.",
    "already_finished": "The task has already finished or is undoing a failure.",
}


def cancel_response(outcome: CancelOutcome) -> JsonResponse:
    body: dict[str, Any] = {"outcome": outcome.outcome}
    if outcome.status:
        body["status"] = outcome.status
    if outcome.http_status >= 400:
        body = {"error": outcome.outcome, "detail": CANCEL_DETAILS[outcome.outcome], **body}
    return JsonResponse(body, status=outcome.http_status)


# --- operator actions -----------------------------------------------------------------

ServiceAction = Callable[[Any, Any, str], TaskInstance]


def operator_action(action: ServiceAction) -> Handler:
    """POST with a mandatory ``note``: one of the operator actions of ``services``, whose
    answer is the task as it is now (the same body as GET)."""

    def handler(request: HttpRequest, saga: str, task_id: str) -> JsonResponse:
        note = _note(json_object_body(request))
        task = _task_of(saga, task_id)
        if task is None:
            raise _task_not_found(saga, task_id)
        try:
            action(task.pk, request.user, note)
        except services.TaskNotFound:
            raise _task_not_found(saga, task_id) from None
        except services.ActionNotAllowed as refused:
            return _not_allowed(refused)
        except services.InvalidInput as exc:
            raise ApiError(400, "invalid_body", "; ".join(exc.messages)) from None
        return _task_response(TaskInstance.objects.get(pk=task.pk))

    return handler


def _note(body: dict[str, Any]) -> str:
    _only_keys(body, {"note"})
    note = body.get("note")
    if not isinstance(note, str) or not note.strip() or len(note) > MAX_REASON_LENGTH:
        raise ApiError(
            400,
            "invalid_body",
            f"'note' is required: a non-blank string of at most {MAX_REASON_LENGTH} chars.",
        )
    return note


def _not_allowed(refused: services.ActionNotAllowed) -> JsonResponse:
    """409; written out because ``ApiError`` takes ``status`` as the HTTP status."""
    body = {
        "error": "not_allowed",
        "detail": str(refused),
        "outcome": "not_allowed",
        "status": refused.status,
    }
    return JsonResponse(body, status=409)


def _task_not_found(saga: str, task_id: str) -> ApiError:
    return ApiError(404, "not_found", f"No task {task_id} of saga {saga!r}.", outcome="not_found")


def _task_of(saga: str, task_id: str) -> TaskInstance | None:
    try:
        pk = uuid.UUID(task_id)
    except ValueError:
        return None
    return TaskInstance.objects.filter(pk=pk, saga=saga).first()


def _require_registered(saga: str) -> None:
    if saga not in registry:
        raise _unknown_saga(saga)


def _unknown_saga(saga: str) -> ApiError:
    return ApiError(404, "unknown_saga", f"No saga named {saga[:100]!r}.")


# --- health and the document ----------------------------------------------------------


def health_status(request: HttpRequest) -> JsonResponse:
    """GET: 200 ok or 503 degraded; ``?detail=1`` adds the operators' view (permission)."""
    wants_detail = request.GET.get("detail", "").lower() in {"1", "true", "yes"}
    if wants_detail:
        authentication.require(request, VIEW)
    failing = health.failing_checks()
    body: dict[str, Any] = {"status": "ok"}
    if failing:
        body = {"status": "degraded", "failing": failing}
    if wants_detail:
        body["detail"] = health.detail(failing)
    return JsonResponse(body, status=503 if failing else 200)


def openapi_document(request: HttpRequest) -> JsonResponse:
    return JsonResponse(openapi.document())


def unknown_path(request: HttpRequest, **kwargs: Any) -> JsonResponse:
    return not_found_response(request)


tasks = resource(GET=Route(list_tasks, VIEW), POST=Route(start_task, ADD, body_required=True))
task = resource(GET=Route(read_task, VIEW), DELETE=Route(cancel_task, CANCEL))


def _operator_route(slug: str, action: ServiceAction) -> Any:
    """The console's permission for the same action (``services.OPERATOR_ACTIONS``)."""
    permission = services.OPERATOR_ACTIONS[slug].permission
    return resource(POST=Route(operator_action(action), permission, body_required=True))


resolve_task = _operator_route("resolve", services.resolve)
retry_task_compensation = _operator_route("retry-compensation", services.retry_compensation)
redrive_task = _operator_route("redrive", services.redrive)
health_view = resource(GET=Route(health_status))
openapi_view = resource(GET=Route(openapi_document))
not_found = csrf_exempt(no_append_slash(never_cache(unknown_path)))
