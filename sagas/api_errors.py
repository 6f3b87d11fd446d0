"""JSON errors for the HTTP API, and Django's error views made to answer JSON under ``/api/``.

Error bodies are ``{"error": <code>, "detail": <message>}`` plus pinned extras (``outcome``).
Outside ``/api/`` Django's own pages are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.exceptions import (
    BadRequest,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
)
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.log import log_response
from django.views import csrf, defaults

API_PREFIX = "/api/"
# Exceptions Django answers with a 4xx (through handler400/403/404), DEBUG or not.
MAPPED_BY_DJANGO = (Http404, PermissionDenied, BadRequest, SuspiciousOperation)


class ApiError(Exception):
    """Raised anywhere in API code to answer with a JSON error instead of going on."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JsonResponse:
        body = {"error": self.code, "detail": self.detail, **self.extra}
        return JsonResponse(body, status=self.status, headers=self.headers)


def error_response(status: int, code: str, detail: str, **extra: Any) -> JsonResponse:
    return ApiError(status, code, detail, **extra).response()


def is_api_request(request: HttpRequest) -> bool:
    return request.path_info == API_PREFIX.rstrip("/") or request.path_info.startswith(API_PREFIX)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler400: Django raises ``RequestDataTooBig`` (a 400 by default) for big bodies."""
    if not is_api_request(request):
        return defaults.bad_request(request, exception)  # type: ignore[arg-type]
    if isinstance(exception, RequestDataTooBig):
        return error_response(413, "body_too_large", "The request body is too large.")
    return error_response(400, "bad_request", "The request could not be understood.")


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not is_api_request(request):
        return defaults.permission_denied(request, exception)  # type: ignore[arg-type]
    return error_response(403, "permission_denied", "You may not do this.")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not is_api_request(request):
        return defaults.page_not_found(request, exception)
    return not_found_response(request)


def not_found_response(request: HttpRequest) -> JsonResponse:
    return error_response(404, "not_found", f"Nothing at {request.path_info}.")


def server_error(request: HttpRequest) -> HttpResponse:
    if not is_api_request(request):
        return defaults.server_error(request)
    return error_response(500, "server_error", "Internal error; it has been logged.")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a session request without a valid CSRF token."""
    if not is_api_request(request):
        return csrf.csrf_failure(request, reason)
    return csrf_rejection(reason).response()


def csrf_rejection(reason: str) -> ApiError:
    return ApiError(
        403,
        "csrf_failed",
        f"CSRF verification failed ({reason}). Session requests that change data must send "
        "the X-CSRFToken header; API clients should use a bearer token instead.",
    )


class DebugJsonErrorsMiddleware:
    """With ``DJANGO_DEBUG`` on, Django answers an unhandled exception with its HTML debug
    page and never calls ``handler500``; under ``/api/`` answer JSON anyway (naming the
    exception, since this is a developer's machine). Logging and ``got_request_exception``
    happen as Django would do them. Without DEBUG this does nothing: ``server_error`` runs.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if settings.DEBUG and response.status_code == 404 and _html_under_api(request, response):
            return not_found_response(request)  # Django's debug 404 page for an unknown URL
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not settings.DEBUG or not is_api_request(request):
            return None
        if isinstance(exception, Http404):
            return not_found_response(request)
        if isinstance(exception, MAPPED_BY_DJANGO):
            return None  # Django answers these with a 4xx
        signals.got_request_exception.send(sender=None, request=request)
        response = error_response(
            500, "server_error", f"{type(exception).__name__}: {exception} (DEBUG is on)"
        )
        log_response(
            "%s: %s",
            "Internal Server Error",
            request.path,
            response=response,
            request=request,
            exception=exception,
        )
        return response


def _html_under_api(request: HttpRequest, response: HttpResponse) -> bool:
    return is_api_request(request) and response.get("Content-Type", "").startswith("text/html")
