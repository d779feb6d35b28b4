"""A route's filters, timeouts and retry, compiled once per table into what the request path applies.

Design rule: a route that uses none of them has no RouteActions at all (CompiledRoute.actions is None),
so the request path of a plain route pays one attribute test. Everything here is precomputed bytes and
sets; the functions only transform header lines and paths (no I/O), so the data plane and the tests use
the same code. Header lines are b"Name: value\\r\\n" as the data plane forwards them.
"""

from __future__ import annotations

from typing import Final

from proxy.model import Filters, HeaderEdit, PathEdit, Redirect, Route

_CRLF: Final = b"\r\n"
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def has_actions(route: Route) -> bool:
    return (route.filters is not None or bool(route.version_filters) or route.timeouts is not None
            or route.retry is not None)


class HeaderOps:
    """A HeaderEdit as bytes: the lower-case names whose lines go (set and remove), the lines added."""

    __slots__ = ("drop", "lines")

    def __init__(self, edit: HeaderEdit) -> None:
        self.drop = frozenset(n.lower().encode("latin-1") for n in (*(k for k, _ in edit.set), *edit.remove))
        self.lines: tuple[bytes, ...] = tuple(
            b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1")) for n, v in (*edit.set, *edit.add))

    def apply(self, lines: list[bytes]) -> list[bytes]:
        """`lines` with the edit made (a new list; the input is left as it was)."""
        drop = self.drop
        out = [ln for ln in lines if ln[:ln.find(b":")].lower() not in drop] if drop else list(lines)
        out.extend(self.lines)
        return out


def _ops(edit: HeaderEdit | None) -> HeaderOps | None:
    return None if edit is None or not (edit.set or edit.add or edit.remove) else HeaderOps(edit)


class VersionOps:
    """The header edits of one version (HTTPRoute backendRefs[].filters)."""

    __slots__ = ("request", "response")

    def __init__(self, flt: Filters) -> None:
        self.request = _ops(flt.request_headers)
        self.response = _ops(flt.response_headers)


class RouteActions:
    __slots__ = ("host_line", "path_edit", "redirect", "request", "response", "retry_attempts", "retry_backoff",
                 "retry_codes", "t_backend", "t_request", "versions")

    def __init__(self, route: Route) -> None:
        flt = route.filters or Filters()
        self.request = _ops(flt.request_headers)
        self.response = _ops(flt.response_headers)
        rw = flt.rewrite
        self.host_line: bytes | None = None
        self.path_edit: PathEdit | None = None
        if rw is not None:
            if rw.hostname is not None:
                self.host_line = b"Host: " + rw.hostname.encode("latin-1") + _CRLF
            self.path_edit = rw.path
        self.redirect: Redirect | None = flt.redirect
        self.versions: dict[str, VersionOps] = {v: VersionOps(f) for v, f in route.version_filters}
        t = route.timeouts
        self.t_request = t.request if t is not None and t.request is not None else 0.0
        self.t_backend = t.backend_request if t is not None and t.backend_request is not None else 0.0
        r = route.retry
        self.retry_attempts = r.attempts if r is not None and r.codes else 0
        self.retry_codes = frozenset(r.codes if r is not None else ())
        self.retry_backoff = r.backoff if r is not None else 0.0

    def rewrites_head(self) -> bool:
        return self.request is not None or self.host_line is not None or self.path_edit is not None


def replace_prefix(path: str, prefix: str, value: str) -> str:
    """HTTPRoute's ReplacePrefixMatch: the matched prefix (element-wise, a trailing '/' ignored) becomes
    `value`; `/foo/bar` with prefix `/foo` and value `/xyz` -> `/xyz/bar`, with value `/` -> `/bar`."""
    p = prefix.rstrip("/")
    rest = path[len(p):] if path.startswith(p) else path
    out = value.rstrip("/") + rest
    return out or "/"


def edited_path(edit: PathEdit, path: str, prefix: str) -> str:
    if edit.type == "ReplaceFullPath":
        return edit.value
    return replace_prefix(path, prefix, edit.value)


def with_host(lines: list[bytes], host_line: bytes) -> list[bytes]:
    """`lines` with every Host line replaced by `host_line` (added where there was none)."""
    out = [ln for ln in lines if ln[:5].lower() != b"host:"]
    out.append(host_line)
    return out


def redirect_location(r: Redirect, scheme: str, host: str, port: int, path: str, prefix: str,
                      query: str | None) -> str:
    """The Location of a redirect (HTTPRoute RequestRedirect): fields the filter leaves out keep the
    request's own. The port: the filter's; else, when the filter sets a scheme, that scheme's well-known
    port; else the port the request came in on (the listener's). A well-known port for its scheme
    (http 80, https 443) is left out of the URL."""
    s = r.scheme or scheme
    h = r.hostname or host
    if r.port is not None:
        p = r.port
    elif r.scheme is not None:
        p = DEFAULT_PORTS[r.scheme]
    else:
        p = port
    authority = h if p == DEFAULT_PORTS.get(s) or p == 0 else f"{h}:{p}"
    target = edited_path(r.path, path, prefix) if r.path is not None else path
    if query is not None:
        target += "?" + query
    return f"{s}://{authority}{target}"
