"""A route's filters on the request path: header edits and URL rewrite of the forwarded head, per-version
header edits, response header edits, redirects answered locally, and the request timeout.

Design rule: only exchanges whose route has RouteActions (proxy.actions) come here; dispatch and the
upstream side test `route.actions` / `ex.actions` once and a plain route never calls in. Works on an
Exchange and ClientSide only (no HTTP/1.x framing), like dispatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.actions import RouteActions, edited_path, redirect_location, with_host
from proxy.dataplane.exchange import RESPONDING, TUNNEL
from proxy.dataplane.identity import identity_lines

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState
    from proxy.table import MatchEntry


def redirect(dp: PlaneState, ex: Exchange, entry: MatchEntry, actions: RouteActions, path: str) -> None:
    """Answer with the route's redirect; nothing goes upstream."""
    r = actions.redirect
    assert r is not None
    client = ex.client
    host = ex.host or entry.route.name
    location = redirect_location(r, client.proto.decode("latin-1"), host, client.local_port(), path, entry.path,
                                 ex.query)
    log = dp.access_log
    if log is not None:
        log.record(entry.route.name, "", ex.method, ex.target.decode("latin-1"), r.status, ex.body_bytes, 0,
                   dp.now() - ex.t0, "", client_id=ex.client_id)
    client.answer_with(ex, r.status, [(b"Location", location.encode("latin-1"))])


def prepare(dp: PlaneState, ex: Exchange, entry: MatchEntry, actions: RouteActions, path: str) -> None:
    """Before the head is built: the route's request header edits, Host and path rewrite, and its
    timeouts and retry budget. `path` is the normalised path the route matched."""
    ex.actions = actions
    if actions.rewrites_head():
        lines = ex.lines
        if actions.request is not None:
            lines = actions.request.apply(lines)
        if actions.host_line is not None:
            lines = with_host(lines, actions.host_line)
        # A new list: a LazyHeaders over the received lines (identity, cookies) keeps reading those.
        ex.lines = lines
        if actions.path_edit is not None:
            target = edited_path(actions.path_edit, path, entry.path)
            if ex.query is not None:
                target += "?" + ex.query
            ex.target = target.encode("latin-1")
    if actions.t_backend:
        ex.t_response = actions.t_backend
    if actions.retry_attempts:
        ex.retries_left = actions.retry_attempts
    if actions.t_request:
        ex.timer = dp.loop.call_at(ex.t0 + actions.t_request, request_expired, dp, ex)


def version_head(ex: Exchange, actions: RouteActions) -> None:
    """The head for the version this attempt goes to: its own request header edits, if it has any."""
    if not ex.route_head:
        ex.route_head = ex.head_common
    ops = actions.versions.get(ex.version)
    if ops is None or ops.request is None:
        ex.head_common = ex.route_head
        return
    route = ex.route
    assert route is not None
    received = ex.lines
    ex.lines = ops.request.apply(received)
    try:
        head = ex.client.upstream_head(ex, route.name)
    finally:
        ex.lines = received
    if ex.id_source and ex.client_id is not None:
        head += identity_lines(ex.id_source, ex.client_id)
    ex.head_common = head


def response_lines(actions: RouteActions, version: str, lines: list[bytes]) -> list[bytes]:
    """The upstream's response header lines with the route's, then the version's, edits made."""
    if actions.response is not None:
        lines = actions.response.apply(lines)
    ops = actions.versions.get(version) if actions.versions else None
    if ops is not None and ops.response is not None:
        lines = ops.response.apply(lines)
    return lines


def response_pairs(ex: Exchange, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A structured response head (lower-case name/value pairs: an HTTP/2 side) with the route's and the
    version's response edits made, by the same rule as response_lines."""
    actions = ex.actions
    if actions is None or (actions.response is None and not actions.versions):
        return headers
    out: list[tuple[bytes, bytes]] = []
    for ln in response_lines(actions, ex.version, [b"%s: %s\r\n" % (n, v) for n, v in headers]):
        name, _, value = ln[:-2].partition(b":")
        out.append((name.lower(), value.strip()))
    return out


def request_expired(dp: PlaneState, ex: Exchange) -> None:
    """The route's request timeout: 504 when no response started, else the response is cut off."""
    ex.timer = None
    if ex.done() or ex.client.closed or ex.state == TUNNEL:
        return  # an accepted WebSocket is no longer one request: the upstream idle timeout bounds it
    route = ex.route
    up = ex.up
    ex.up = None
    if up is not None:
        up.drop()
    now = dp.now()
    name = route.name if route is not None else ""
    dp.stats.upstream_error(ex.version, "timeout", route=name)
    if ex.state >= RESPONDING:
        dp.stats.request(name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
        ex.client.abort_active(ex, 504)
        return
    dp.stats.request(name, ex.version, 504, now - ex.t0, ex.body_bytes, 0)
    log = dp.access_log
    if log is not None:
        log.record(name, ex.version, ex.method, ex.target.decode("latin-1"), 504, ex.body_bytes, 0, now - ex.t0,
                   "", retried=ex.retried, fallback=ex.fell_back, client_id=ex.client_id)
    ex.client.answer(ex, 504)
