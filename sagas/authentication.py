"""Who is calling the API (a bearer token or the session) and whether they may do this.

API views are exempt from Django's CSRF middleware because a bearer token is not sent
by browsers on their own; requests authenticated by the session cookie are, so for them
the same CSRF check is run here by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from sagas.api_errors import ApiError, csrf_rejection
from sagas.models import ApiToken

if TYPE_CHECKING:
    from django.contrib.auth.models import User

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHALLENGE = 'Bearer realm="api"'


def require(request: HttpRequest, permission: str) -> None:
    """Authenticate, then authorise ``permission``; raises a 401 or 403 ``ApiError``."""
    identify(request)
    authorize(request, permission)


def identify(request: HttpRequest) -> None:
    """Set ``request.user`` from the bearer token, or insist on a logged-in session (401)."""
    authorization = request.META.get("HTTP_AUTHORIZATION")
    if authorization is not None:
        request.user = _token_user(authorization)
    elif not request.user.is_authenticated:
        _unauthenticated("not_authenticated", "Log in, or send 'Authorization: Bearer <token>'.")


def authorize(request: HttpRequest, permission: str) -> None:
    """After ``identify``: the CSRF check for session requests that change data, then the
    model permission (403)."""
    by_session = "HTTP_AUTHORIZATION" not in request.META
    if by_session and request.method not in SAFE_METHODS:
        _SessionCsrfCheck(_no_response).process_view(request, None, (), {})  # type: ignore[arg-type]
    if not request.user.has_perm(permission):
        raise ApiError(403, "permission_denied", f"This needs the {permission} permission.")


def _token_user(authorization: str) -> User:
    scheme, _, plain = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not plain.strip():
        _unauthenticated("invalid_token", "Use the header 'Authorization: Bearer <token>'.")
    token = ApiToken.find_active(plain.strip())
    if token is None:
        _unauthenticated("invalid_token", "The token is unknown or revoked.")
    token.record_use()
    return token.user


def _unauthenticated(code: str, detail: str) -> NoReturn:
    raise ApiError(401, code, detail, headers={"WWW-Authenticate": CHALLENGE})


class _SessionCsrfCheck(CsrfViewMiddleware):
    """Django's own CSRF check; a rejection becomes a JSON 403 (as REST frameworks do it)."""

    def _reject(self, request: HttpRequest, reason: str) -> NoReturn:
        raise csrf_rejection(reason)


def _no_response(request: HttpRequest) -> HttpResponse:
    raise AssertionError("the CSRF check never calls the view")
