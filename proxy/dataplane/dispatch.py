"""Dispatch: route match, client identity, version pick (pins, sticky split), spread to healthy split
versions, the fallback chain, the retry rule, the mirror decision, and handing an exchange a connection.

Design rule: everything here works on an Exchange and the shared PlaneState only, never on a client
connection's protocol: it answers through ex.client (ClientSide) and knows no HTTP/1.x framing, so an
HTTP/2 downstream can dispatch its streams with the same functions. Module-level functions on concrete
types, so mypyc calls them natively.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

from proxy.dataplane.exchange import RESPONDING
from proxy.dataplane.h2upstream import H2Pool
from proxy.dataplane.headers import IDEMPOTENT, LazyHeaders
from proxy.dataplane.identity import identity_lines
from proxy.dataplane.rewrite import prepare, redirect, version_head
from proxy.dataplane.upstream import UpstreamConnection
from proxy.table import cookie_value, normalize_path

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import Endpoint, UpstreamSide
    from proxy.telemetry.stats import UpstreamErrorKind

_NO_HEADERS: Final[dict[str, str]] = {}  # never written to
_ERROR_KIND: Final[dict[str, UpstreamErrorKind]] = {
    "connect": "connect", "connect_timeout": "timeout", "timeout": "timeout", "reset": "reset",
    "invalid_response": "invalid_response", "tls": "tls", "deadline": "timeout", "queue_timeout": "timeout",
}


def start(dp: PlaneState, ex: Exchange) -> None:
    """Route ex, pick its version and endpoint, and give it a connection (or answer it locally)."""
    ex.dispatch()
    if ex.refuse is not None:
        dp.stats.reject(ex.refuse.reason)
        ex.client.answer(ex, ex.refuse.status)
        return
    table = dp.holder.table
    plan = dp.plan
    if plan.table is not table:
        plan = dp.use_plan(table)
    hdrs: Mapping[str, str]
    if ex.plan is plan and plan.exact:
        hdrs = ex.wanted or _NO_HEADERS
        # Routes match on the path the upstream will resolve (dot-segments, "//", %-encoded letters).
        entry = plan.single or table.lookup(ex.host, normalize_path(ex.path), hdrs, ex.method, ex.query)
    else:  # parsed under another table: the headers it reads may not have been captured
        hdrs = LazyHeaders(ex.lines)
        entry = table.lookup(ex.host, normalize_path(ex.path), hdrs, ex.method, ex.query)
    if entry is None:
        dp.stats.reject("no_route")
        if dp.access_log is not None:
            log_local(dp, ex, "", 404)
        ex.client.answer(ex, 404)
        return
    ex.route = route = entry.route
    actions = route.actions
    if actions is not None and actions.redirect is not None:
        redirect(dp, ex, entry, actions, normalize_path(ex.path))
        return
    pins = True
    if route.verifying:
        source, cid = dp.identity.resolve(route, hdrs, ex.query, ex.client.peer_cert, dp.now())
        ex.client_id = cid
        if source:
            ex.id_source = source
        elif route.require_identity:
            dp.stats.reject("no_identity", route.name)
            if dp.access_log is not None:
                log_local(dp, ex, route.name, 401)
            ex.client.answer(ex, 401)
            return
        else:
            # An unverified id may still be sticky, but never a pin or an assignment (pins_require_verified).
            pins = not route.pins_verified
    else:
        cid = ex.client_id = route.client_id(hdrs, ex.query) if route.identity else None
    cookie = route.assignment_cookie
    v = cookie_value(hdrs.get("cookie"), cookie) if cookie is not None and pins else None
    if v is not None:
        # A pin beats an older assignment cookie, which beats the sticky split.
        ex.cookie_version = v
        pick = route.pick_session(cid, v)
    else:
        pick = plan.pick(route, cid) if pins else route.pick_unpinned(cid)
    ex.chain = chain = pick[1]
    if actions is not None:
        prepare(dp, ex, entry, actions, normalize_path(ex.path))
    ex.head_common = ex.client.upstream_head(ex, route.name)
    if ex.id_source and cid is not None:
        ex.head_common += identity_lines(ex.id_source, cid)
    if route.mirrored:
        dp.mirror.consider(ex, route, dp.backends)
    backend = dp.backends.get(chain[0])
    ep = backend.pick(route.zone_affinity) if backend is not None else None
    if ep is not None:
        ex.version = chain[0]
        ex.endpoint = ep
    else:
        if not chain[0]:
            # A split whose weights are all 0, and no pin or assignment: HTTPRoute's 500.
            if dp.access_log is not None:
                log_local(dp, ex, route.name, 500)
            ex.client.answer(ex, 500)
            return
        if next_version(dp, ex, 1) < 0 and spread(dp, ex) < 0:
            dp.stats.reject("no_healthy_version", route.name)
            # Counted under the version it was meant for: its error ratio shows what its clients saw.
            ex.version = chain[0]
            now = dp.now()
            dp.stats.request(route.name, chain[0], 503, now - ex.t0, ex.body_bytes, 0)
            if dp.access_log is not None:
                log(dp, ex, 503, now, answered=False)
            ex.client.answer(ex, 503)
            return
        dp.stats.fallback(route.name, chain[0], ex.version)
        ex.fell_back = True
        ep = ex.endpoint
        assert ep is not None
    if ex.expect and not ex.request_complete:
        ex.client.send_continue(ex)
    ex.attempts = 1
    conn = ep.take_idle()
    if conn is not None:
        attach(dp, ex, conn)
    else:
        open_connection(dp, ep, ex)



def next_version(dp: PlaneState, ex: Exchange, start: int) -> int:
    backends = dp.backends
    chain = ex.chain
    route = ex.route
    affinity = route is None or route.route.zone_affinity
    for i in range(start, len(chain)):
        b = backends.get(chain[i])
        if b is not None:
            ep = b.pick(affinity)
            if ep is not None:
                ex.idx = i
                ex.version = chain[i]
                ex.endpoint = ep
                return i
    return -1



def spread(dp: PlaneState, ex: Exchange) -> int:
    """No version of the chain can serve: another version of the split that can, weighted among those
    (a pinned client keeps just its chain). It joins the chain, so a retry moves on from it. Returns its
    index in the chain, or -1."""
    route = ex.route
    if route is None or (route.pinned(ex.client_id) and (ex.id_source != "" or not route.pins_verified)):
        return -1
    backends = dp.backends
    chain = ex.chain
    usable = [False] * len(route.split_names)
    found = False
    for i, v in enumerate(route.split_names):
        if v not in chain:
            b = backends.get(v)
            if b is not None and b.has_healthy():
                usable[i] = found = True
    if not found:
        return -1
    i = route.spread(usable, ex.client_id)
    if i < 0:
        return -1
    v = route.split_names[i]
    ep = backends[v].pick(route.route.zone_affinity)
    assert ep is not None
    ex.chain = (*chain, v)
    ex.idx = len(chain)
    ex.version = v
    ex.endpoint = ep
    return ex.idx



def connect(dp: PlaneState, ex: Exchange, fresh: bool = False) -> None:
    ep = ex.endpoint
    assert ep is not None
    ex.attempts += 1
    conn = None if fresh else ep.take_idle()
    if conn is not None:
        attach(dp, ex, conn)
    else:
        open_connection(dp, ep, ex)



def open_connection(dp: PlaneState, ep: Endpoint, ex: Exchange) -> None:
    if ep.mux is not None:  # HTTP/2: a stream on a shared connection (proxy.dataplane.h2upstream)
        cast(H2Pool, ep.mux).request(ex)
        return
    if ep.conns >= dp.max_upstream:
        # At the cap: wait for one of its connections instead of opening one more.
        ep.waiting.append(_Waiter(dp, ep, ex))
        return
    ep.conns += 1
    task = dp.loop.create_task(_open(dp, ep, ex))
    dp.tasks.add(task)
    task.add_done_callback(dp.tasks.discard)



class _Waiter:
    """An exchange in its endpoint's queue for a connection; it gives up after upstream_connect (504)."""

    __slots__ = ("dp", "ep", "ex", "timer")

    def __init__(self, dp: PlaneState, ep: Endpoint, ex: Exchange) -> None:
        self.dp = dp
        self.ep = ep
        self.ex = ex
        self.timer = dp.loop.call_later(dp.t_connect, self.expire)

    def __call__(self, conn: UpstreamSide | None) -> None:
        self.timer.cancel()
        ex = self.ex
        if conn is not None:
            attach(self.dp, ex, conn)  # releases it again (to the next waiter) when ex is gone
        elif ex.done() or ex.client.closed:
            self.ep.pass_slot()
        else:
            open_connection(self.dp, self.ep, ex)

    def expire(self) -> None:
        self.ep.waiting.remove(self)
        # Not counted against the endpoint's health: the wait is ours, every connection it has is busy.
        self.ex.client.upstream_failed(self.ex, None, "queue_timeout", True)



async def _open(dp: PlaneState, ep: Endpoint, ex: Exchange) -> None:
    made: list[UpstreamConnection] = []

    def factory() -> UpstreamConnection:
        conn = UpstreamConnection(dp, ep)
        made.append(conn)
        return conn

    try:
        async with asyncio.timeout(dp.t_connect):
            if not ep.https:
                _, conn = await dp.loop.create_connection(factory, ep.host, ep.port)
            elif ep.ssl is None:
                raise ssl.SSLError("no TLS context for this version (its tls files could not be loaded)")
            else:
                # The handshake is part of the connect: its time counts against upstream_connect.
                _, conn = await dp.loop.create_connection(factory, ep.host, ep.port,
                                                          ssl=ep.ssl, server_hostname=ep.server_hostname)
    except (TimeoutError, OSError) as e:
        # No connection_lost will come for a connection never made: its slot is freed here.
        if not made or made[0].transport is None:
            ep.conn_closed()
        if isinstance(e, TimeoutError):
            ex.client.upstream_failed(ex, None, "connect_timeout", True)
        elif isinstance(e, ssl.SSLError):
            # A failed verification or handshake: never retried without verification.
            ex.client.upstream_failed(ex, None, "tls", True)
        else:
            ex.client.upstream_failed(ex, None, "connect", True)
    else:
        attach(dp, ex, conn)



def attach(dp: PlaneState, ex: Exchange, conn: UpstreamSide) -> None:
    """ex gets connection conn (fresh or pooled); the client side sends what it has of the request."""
    up = cast(UpstreamConnection, conn)
    client = ex.client
    if ex.done() or client.closed:
        up.release()
        return
    ex.up = conn
    ep = ex.endpoint
    if ep is not None and ep.zone:
        dp.stats.zone_request(ex.version, ep.zone)
    up.begin(ex)
    actions = ex.actions
    if actions is not None and actions.versions:
        version_head(ex, actions)
    client.send_head(ex, conn)



def upstream_failed(dp: PlaneState, ex: Exchange, conn: UpstreamSide | None, kind: str,
                    before_response: bool) -> None:
    if ex.done() or ex.client.closed:
        return
    ex.up = None
    ex.error_kind = kind
    ep = ex.endpoint
    route = ex.route
    assert route is not None and ep is not None
    if kind == "retry":
        retry_status(dp, ex, route.name)
        return
    connect_failed = kind == "connect" or kind == "connect_timeout" or kind == "tls"
    if connect_failed or kind == "timeout":
        # A hung endpoint may still pass its health check: its timeouts must eject it like 5xx do.
        dp.health.failure(ep)
    dp.stats.upstream_error(ex.version, _ERROR_KIND[kind], route=route.name)
    if ex.state >= RESPONDING:
        now = dp.now()
        dp.stats.request(route.name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
        if dp.access_log is not None:
            log(dp, ex, ex.status, now)
        ex.client.abort_active(ex, 502)
        return
    may_replay = not ex.sent_body or ex.replay is not None
    # After a reset the upstream may have acted on the request: only idempotent methods are replayed
    # (RFC 9110 9.2.2); a failed connect wrote nothing, so any method may move on.
    if (connect_failed or (kind == "reset" and before_response and ex.method in IDEMPOTENT)) and may_replay:
        if kind == "reset" and conn is not None and conn.served and not ex.retried_same:
            # A pooled connection the upstream had just closed: one fresh try on the same endpoint.
            ex.retried_same = True
            ex.retried = True
            ex.sent_body = False
            dp.stats.retry(route.name)
            connect(dp, ex, fresh=True)
            return
        b = dp.backends.get(ex.version) if connect_failed else None
        other = b.pick_other(ep, route.route.zone_affinity) if b is not None else None
        if other is not None:
            # Zones: another endpoint of the same version first (proxy.dataplane.pool.Backend.pick_other).
            ex.endpoint = other
            ex.retried = True
            ex.sent_body = False
            dp.stats.retry(route.name)
            connect(dp, ex)
            return
        failed = ex.version
        if next_version(dp, ex, ex.idx + 1) >= 0 or spread(dp, ex) >= 0:
            dp.stats.retry(route.name)
            dp.stats.fallback(route.name, failed, ex.version)
            ex.retried = ex.fell_back = True
            ex.sent_body = False
            connect(dp, ex)
            return
    # "deadline": the client's own grpc-timeout passed, which says nothing about the endpoint's health.
    status = 504 if kind in ("timeout", "connect_timeout", "deadline", "queue_timeout") else 502
    now = dp.now()
    dp.stats.request(route.name, ex.version, status, now - ex.t0, ex.body_bytes, 0)
    if dp.access_log is not None:
        log(dp, ex, status, now, answered=False)
    ex.client.answer(ex, status)



def retry_status(dp: PlaneState, ex: Exchange, route: str) -> None:
    """The upstream answered one of the route's retry codes (GEP-1731) and the request may be replayed
    (proxy.dataplane.upstream checked turnout's rule): try again after the route's backoff."""
    ex.retries_left -= 1
    ex.retried = True
    ex.sent_body = False
    dp.stats.retry(route)
    actions = ex.actions
    backoff = actions.retry_backoff if actions is not None else 0.0
    if backoff > 0:
        dp.loop.call_later(backoff, _retry_now, dp, ex)
    else:
        _retry_now(dp, ex)


def _retry_now(dp: PlaneState, ex: Exchange) -> None:
    if ex.done() or ex.client.closed:
        return
    backend = dp.backends.get(ex.version)
    ep = backend.pick() if backend is not None else None
    if ep is not None:
        ex.endpoint = ep
    elif next_version(dp, ex, ex.idx + 1) < 0 and spread(dp, ex) < 0:
        route = ex.route
        name = route.name if route is not None else ""
        dp.stats.reject("no_healthy_version")
        now = dp.now()
        dp.stats.request(name, ex.version, 503, now - ex.t0, ex.body_bytes, 0)
        if dp.access_log is not None:
            log(dp, ex, 503, now, answered=False)
        ex.client.answer(ex, 503)
        return
    connect(dp, ex)


def log(dp: PlaneState, ex: Exchange, status: int, now: float, answered: bool = True) -> None:
    log = dp.access_log
    route = ex.route
    if log is None or route is None:
        return
    ep = ex.endpoint
    log.record(route.name, ex.version, ex.method, ex.target.decode("latin-1"), status, ex.body_bytes,
               ex.bytes_out if answered else 0, now - ex.t0, ep.url if ep is not None and answered else "",
               retried=ex.retried, fallback=ex.fell_back, client_id=ex.client_id)



def log_local(dp: PlaneState, ex: Exchange, route: str, status: int) -> None:
    """A request the proxy answered itself before choosing a version (404, 503)."""
    log = dp.access_log
    if log is not None:
        log.record(route, "", ex.method, ex.target.decode("latin-1"), status, ex.body_bytes, 0,
                   dp.now() - ex.t0, "", client_id=ex.client_id)
