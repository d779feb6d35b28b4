"""Errors as `application/problem+json` (RFC 9457), mapped from proxy.errors in this one place.

Design rule: handlers raise; they never build error responses. A TurnoutError's `status_hint` decides the
status, aiohttp's own HTTP errors (404 unknown path, 405, 413 body too large) get the same shape, and
anything else is a 500 whose details go to the log, not to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from proxy.errors import FieldError, StaleRevisionError, TurnoutError, ValidationError

log = logging.getLogger("turnout.admin")

PROBLEM_JSON = "application/problem+json"

# Stable, documented problem types per status; clients switch on `type`, people read `title`.
TYPES: dict[int, tuple[str, str]] = {
    400: ("urn:turnout:problem:bad-request", "Malformed request"),
    401: ("urn:turnout:problem:unauthorized", "Missing or wrong token"),
    404: ("urn:turnout:problem:not-found", "Not found"),
    405: ("urn:turnout:problem:method-not-allowed", "Method not allowed"),
    409: ("urn:turnout:problem:conflict", "Conflicts with the current state"),
    412: ("urn:turnout:problem:stale-revision", "The state changed since the given revision"),
    413: ("urn:turnout:problem:too-large", "Request body too large"),
    422: ("urn:turnout:problem:invalid", "Invalid request body"),
    503: ("urn:turnout:problem:unavailable", "Service unavailable"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequestError(TurnoutError):
    """The request could not be read at all (malformed JSON, a bad header value)."""

    status_hint = 400

    def __init__(self, message: str, path: str = "") -> None:
        self.errors = [FieldError(path, message)]
        super().__init__(message)


def problem(status: int, detail: str, errors: list[FieldError] | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    kind, title = TYPES.get(status, ("about:blank", _phrase(status)))
    body: dict[str, Any] = {
        "type": kind, "title": title, "status": status, "detail": detail,
        "errors": [{"path": e.path, "message": e.message} for e in errors or ()],
        **extra,
    }
    return web.Response(status=status, text=json.dumps(body, indent=1) + "\n", content_type=PROBLEM_JSON,
                        headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def from_error(e: TurnoutError) -> web.Response:
    status = e.status_hint
    errors: list[FieldError] = list(getattr(e, "errors", ()))
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(e, StaleRevisionError):
        extra = {"expected_revision": e.expected, "current_revision": e.current}
        headers["ETag"] = f'"{e.current}"'
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="turnout"'
    if status == 503:
        headers["Retry-After"] = "1"
    detail = str(e)
    if isinstance(e, ValidationError):
        detail = f"{len(errors)} error(s); nothing was changed"
    return problem(status, detail, errors, headers or None, **extra)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TurnoutError as e:
        return from_error(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return problem(e.status, detail, None, headers or None)
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return problem(500, "internal error; see the proxy's log")
