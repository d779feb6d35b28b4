"""A small client for the admin API, used by the operator CLI.

Design rule: standard library only (urllib), so `turnout split ...` starts in a fraction of a second. Environment
proxies are ignored on purpose: the admin API is a loopback/ops-network service, and an `http_proxy`
meant for the internet must not see its bearer token.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:8081"
ADMIN_ENV = "TURNOUT_ADMIN"
# Commands finish in milliseconds; this only bounds a hung admin listener.
DEFAULT_TIMEOUT = 30.0


class ProblemError(Exception):
    """The API refused a request; `problem` is its problem+json body (or a stand-in for a non-JSON one)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(status, problem)
        self.status = status
        self.problem = problem

    def __str__(self) -> str:
        title = self.problem.get("title") or f"HTTP {self.status}"
        detail = self.problem.get("detail")
        return f"{title} ({self.status}): {detail}" if detail else f"{title} ({self.status})"

    @property
    def errors(self) -> list[tuple[str, str]]:
        out = []
        for e in self.problem.get("errors") or ():
            if isinstance(e, dict):
                out.append((str(e.get("path", "")), str(e.get("message", ""))))
        return out


class UnreachableError(Exception):
    """No HTTP answer at all (refused, timed out, DNS)."""


# Problem types of failures that never got an HTTP answer (no `status`); the API's own are in
# proxy.admin.problem.TYPES.
USAGE_PROBLEM = ("urn:turnout:problem:usage", "Bad usage")
UNREACHABLE_PROBLEM = ("urn:turnout:problem:unreachable", "Admin API unreachable")


def problem_document(e: Exception) -> dict[str, Any]:
    """A failed command as a problem document (RFC 9457), for `--json`: the API's own body when it answered,
    completed with status and title when that body was not JSON; else a usage or unreachable problem."""
    if isinstance(e, ProblemError):
        try:
            title = HTTPStatus(e.status).phrase
        except ValueError:
            title = "Error"
        return {"type": "about:blank", "title": title, "status": e.status, "detail": "", "errors": [],
                **e.problem}
    kind, title = UNREACHABLE_PROBLEM if isinstance(e, UnreachableError) else USAGE_PROBLEM
    return {"type": kind, "title": title, "detail": str(e), "errors": []}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    data: Any

    @property
    def revision(self) -> int | None:
        etag = self.headers.get("etag", "").strip('"')
        return int(etag) if etag.isdigit() else None


class AdminClient:
    def __init__(self, base_url: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        url = (base_url or os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN).rstrip("/")
        # `serve --admin` takes HOST:PORT; accept the same spelling here.
        self.base_url = url if "://" in url else f"http://{url}"
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"<AdminClient {self.base_url} [token: {'set' if self.token else 'none'}]>"

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                content_type: str = "application/json", query: dict[str, str] | None = None,
                if_match: int | None = None, reason: str | None = None) -> Reply:
        q = dict(query or {})
        if reason:
            q["reason"] = reason
        url = self.base_url + urllib.parse.quote(path, safe="/")
        if q:
            url += "?" + urllib.parse.urlencode(q)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if if_match is not None:
            headers["If-Match"] = f'"{if_match}"'
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, _decode(resp.read()))
        except urllib.error.HTTPError as e:
            payload = _decode(e.read())
            problem = payload if isinstance(payload, dict) else {"detail": str(payload or e.reason)}
            raise ProblemError(e.code, problem) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise UnreachableError(f"cannot reach the admin API at {self.base_url}: {why}") from None

    def get(self, path: str, query: dict[str, str] | None = None) -> Reply:
        return self.request("GET", path, query=query)


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")
