"""Upstream endpoints of one version: keep-alive pools, health state and round-robin choice.

Design rule: choosing an endpoint and taking an idle connection are synchronous and allocation-free, so
the request path never awaits when a pooled connection is ready. The pool owns taking and returning
connections (take_idle, put_idle): the return rule is written once, here. It also counts the connections an
endpoint has open or opening (`conns`, bounded by limits.max_upstream_connections) and holds the FIFO of
exchanges waiting for one (`waiting`); a freed connection goes to the first waiter before the pool. Health
flags are plain booleans that timers and checks flip through Endpoint's methods; the request path only reads
them.
Zone-aware choice (proxy.zones) is a precomputed cycle of endpoints, rebuilt on the first pick after an
endpoint's health changed; without a proxy zone, or without endpoint zones, the pick is the plain one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from proxy.select import smooth_cycle
from proxy.zones import endpoint_weights


class UpstreamSide(asyncio.Protocol):
    """A pooled upstream connection, as the pool, dispatch and the client side see it."""

    transport: asyncio.Transport | None = None
    closed: bool = False
    served: int = 0  # responses completed on this connection; >0 means a reused connection
    # An HTTP/2 upstream stream: the client side hands it the request through start_request/request_data
    # instead of writing HTTP/1.x bytes to `transport`.
    structured: bool = False
    # When the listener's sweeper calls on_deadline (0.0: none).
    deadline: float = 0.0

    def start_request(self, end: bool) -> None:
        """Send the head of the exchange this stream was begun with (method, target, host and the
        forwarded lines, ex.lines); `end`: the request has no body."""
        raise NotImplementedError

    def request_data(self, data: bytes, end: bool) -> None:
        raise NotImplementedError

    def reusable(self) -> bool:
        raise NotImplementedError

    def expect_response(self, deadline: float) -> None:
        """The request is complete: the response must begin by `deadline`."""
        raise NotImplementedError

    def drop(self) -> None:
        """Forget the exchange and abort the connection (its client gave up on it)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def on_deadline(self) -> None:
        raise NotImplementedError


class Multiplexer:
    """An endpoint's shared HTTP/2 connections (proxy.dataplane.h2upstream): set on the endpoints of h2 and
    h2c versions, whose `idle` list stays empty (dispatch asks the multiplexer for a stream instead)."""

    def close_idle(self) -> None:
        raise NotImplementedError


class Endpoint:
    __slots__ = (
        "active_ok", "address", "conns", "ejected", "ejections", "failures", "host", "https", "idle", "mux",
        "owner", "port", "readmit_handle", "removed", "server_hostname", "ssl", "url", "version", "waiting", "zone",
    )

    def __init__(self, version: str, url: str, ssl_context: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self.version = version
        self.url = url
        parts = urlsplit(url if "//" in url else "http://" + url)
        self.host = parts.hostname or "127.0.0.1"
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        # An https endpoint without a context (its files could not be loaded) fails every connect: it never
        # falls back to cleartext or to an unverified connection.
        self.ssl = ssl_context if self.https else None
        self.server_hostname = (server_name or self.host) if self.https else None
        self.address = f"{self.host}:{self.port}"
        self.idle: list[UpstreamSide] = []  # LIFO: the most recently used connection is the warmest
        self.conns = 0  # connections open or being opened, pooled ones included
        # Exchanges waiting for a connection because `conns` reached the cap, first come first served; each is
        # called with a free connection, or with None when a slot came free (it may open one).
        self.waiting: deque[Callable[[UpstreamSide | None], None]] = deque()
        # Optimistic start: a new endpoint serves until a check or passive ejection says otherwise.
        self.active_ok = True
        self.ejected = False
        self.failures = 0  # consecutive connect failures / timeouts / 5xx responses
        self.ejections = 0  # consecutive ejections; doubles the next ejection's length
        self.readmit_handle: asyncio.TimerHandle | None = None
        self.removed = False  # no longer in the table: its connections are not pooled again
        self.zone = ""  # "" unknown (a plain URL); set from the version's zones on each table change
        self.owner: Backend | None = None  # the zone-aware backend to tell when this one's health changes
        self.mux: Multiplexer | None = None

    @property
    def healthy(self) -> bool:
        return self.active_ok and not self.ejected

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else ("ejected" if self.ejected else "failing")
        return f"<Endpoint {self.version} {self.url} [{state} | Connections: {len(self.idle)} idle]>"

    def take_idle(self) -> UpstreamSide | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
        return None

    def put_idle(self, conn: UpstreamSide, pool_size: int, stopping: bool) -> bool:
        """The one return-to-pool rule: False when conn may not serve again (the caller closes it)."""
        if (conn.reusable() and not self.ejected and not self.removed and len(self.idle) < pool_size
                and not stopping):
            self.idle.append(conn)
            return True
        return False

    def hand_over(self, conn: UpstreamSide) -> bool:
        """A connection that just finished an exchange goes to the first waiter, if any (True)."""
        if self.waiting and conn.reusable() and not self.removed:
            self.waiting.popleft()(conn)
            return True
        return False

    def conn_closed(self) -> None:
        """A connection of this endpoint closed (or its connect failed): its slot goes to the first waiter."""
        self.conns -= 1
        self.pass_slot()

    def pass_slot(self) -> None:
        """A free slot (below the cap) for the first waiter, which opens a connection with it."""
        if self.waiting:
            self.waiting.popleft()(None)

    def retire(self) -> None:
        """No longer in the table: its connections are not pooled again."""
        self.removed = True

    # -- health (proxy.dataplane.health decides; these record)

    def failed(self) -> int:
        """One more consecutive failure; returns how many in a row."""
        self.failures += 1
        return self.failures

    def succeeded(self) -> None:
        self.failures = 0
        self.ejections = 0

    def eject(self, readmit: asyncio.TimerHandle) -> None:
        self.ejected = True
        self.ejections += 1
        self.readmit_handle = readmit
        self.close_idle()
        self._health_changed()

    def readmit(self, failures: int) -> None:
        self.readmit_handle = None
        self.ejected = False
        self.failures = failures
        self._health_changed()

    def cancel_readmit(self) -> None:
        h = self.readmit_handle
        if h is not None:
            h.cancel()
        self.readmit_handle = None

    def checked(self, ok: bool) -> None:
        """The result of an active check."""
        if ok and not self.active_ok:
            self.failures = 0
        if ok != self.active_ok:
            self.active_ok = ok
            self._health_changed()

    def _health_changed(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.stale = True

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        if self.mux is not None:
            self.mux.close_idle()


class Backend:
    """One version's endpoints, chosen round robin among the healthy ones; with a proxy zone (`local`) and
    endpoints with zones, in the proportions of proxy.zones (local first, spill-over by capacity)."""

    __slots__ = ("_at", "_cycle", "_next", "endpoints", "local", "name", "stale", "zoned")

    def __init__(self, name: str, endpoints: list[Endpoint], local: str | None = None) -> None:
        self.name = name
        self.endpoints = endpoints
        self._next = 0
        self.local = local
        self.zoned = local is not None and any(e.zone for e in endpoints)
        self.stale = True  # the cycle must be (re)built before the next zone-aware pick
        self._cycle: list[Endpoint] = []
        self._at = 0
        for e in endpoints:
            e.owner = self if self.zoned else None

    def __repr__(self) -> str:
        healthy = sum(1 for e in self.endpoints if e.healthy)
        return f"<Backend {self.name} [Endpoints: {healthy} healthy, {len(self.endpoints) - healthy} unhealthy]>"

    def pick(self, affinity: bool = True) -> Endpoint | None:
        """The next endpoint; `affinity` False (the route's zone_affinity): plain round robin over all."""
        if affinity and self.zoned:
            if self.stale:
                self.plan_zones()
            cycle = self._cycle
            n = len(cycle)
            if n:
                i = self._at
                if i >= n:
                    i = 0
                ep = cycle[i]
                self._at = i + 1
                if ep.active_ok and not ep.ejected:
                    return ep
        eps = self.endpoints
        n = len(eps)
        i = self._next
        for _ in range(n):
            if i >= n:
                i = 0
            ep = eps[i]
            i += 1
            if ep.active_ok and not ep.ejected:
                self._next = i
                return ep
        return None

    def pick_other(self, failed: Endpoint, affinity: bool) -> Endpoint | None:
        """After a failed connect to `failed`, another endpoint of this version to try: healthy and without a
        failure since its last success, by the zone rule first, then any zone. Zone-aware backends only (a
        lost zone must not fail requests before its checks notice); None otherwise, and then the fallback
        chain moves on as without zones."""
        if not self.zoned:
            return None
        for _ in range(len(self._cycle) if affinity else 0):
            ep = self.pick(True)
            if ep is not None and ep is not failed and ep.failures == 0:
                return ep
        eps = self.endpoints
        n = len(eps)
        i = self._next
        for _ in range(n):
            if i >= n:
                i = 0
            ep = eps[i]
            i += 1
            if ep is not failed and ep.failures == 0 and ep.active_ok and not ep.ejected:
                self._next = i
                return ep
        return None

    def plan_zones(self) -> None:
        """Rebuild the cycle of endpoints from the healthy counts per zone (proxy.zones.endpoint_weights)."""
        eps = self.endpoints
        weights = endpoint_weights([e.zone for e in eps], [e.healthy for e in eps], self.local)
        self._cycle = [eps[i] for i in smooth_cycle(weights)]
        self._at = 0
        self.stale = False

    def zone_shares(self) -> dict[str, float]:
        """Share of this version's zone-aware picks each zone gets now (the status page's numbers)."""
        if not self.zoned:
            return {}
        if self.stale:
            self.plan_zones()
        out: dict[str, float] = {}
        for e in self._cycle:
            out[e.zone] = out.get(e.zone, 0.0) + 1.0 / len(self._cycle)
        return out

    def has_healthy(self) -> bool:
        return any(e.active_ok and not e.ejected for e in self.endpoints)
