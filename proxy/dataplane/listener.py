"""The DataPlane object: listener, shared per-process request-path state, timers and lifecycle.

Design rule: per-request timeouts are deadlines (floats) on connection objects that one sweeper checks a
few times per second, instead of a timer handle per request; precomputed header lines are cached here so
the request path only concatenates bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping

from proxy.dataplane.downstream import ClientConnection, Exchange
from proxy.dataplane.headers import TrustedPeers
from proxy.dataplane.health import Health
from proxy.dataplane.mirror import Mirrorer
from proxy.dataplane.plan import Plan
from proxy.dataplane.pool import Backend, Endpoint
from proxy.dataplane.upstream import UpstreamConnection
from proxy.settings import Settings
from proxy.supervisor.process import state_dir
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.stats import Stats

_CRLF = b"\r\n"
# On shutdown, how long an idle keep-alive connection may still bring one request (answered with close).
DRAIN_IDLE = 1.0


class DataPlane:
    def __init__(self, settings: Settings, holder: TableHolder, stats: Stats) -> None:
        self.settings = settings
        self.holder = holder
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time
        t = settings.timeouts
        self.t_header_read = t.header_read
        self.t_keepalive = t.keepalive_idle
        self.t_body_idle = t.body_read_idle
        self.t_upstream_response = t.upstream_response
        self.t_upstream_idle = t.upstream_idle
        self.t_pool_idle = t.upstream_pool_idle
        self.t_connect = t.upstream_connect
        self.pool_size = settings.pool_size
        self.trusted = TrustedPeers(settings.trusted_proxies)
        self.conns: set[ClientConnection] = set()
        self.uconns: set[UpstreamConnection] = set()
        self.backends: dict[str, Backend] = {}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.health = Health(settings.passive_eject_after)
        self.mirror = Mirrorer(self)
        self.mirror_counts = self.mirror.counts
        self.plan = Plan(holder.table)
        self.draining = False
        self.drained = asyncio.Event()  # set when draining and the last client connection closed
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.hosts: dict[bytes, str] = {}  # Host header value -> lower-case host without port
        self._version_lines: dict[str, bytes] = {}
        self._route_lines: dict[str, bytes] = {}
        self._cookie_lines: dict[tuple[str, str], bytes] = {}
        fastest = min(t.header_read, t.keepalive_idle, t.body_read_idle, t.upstream_response, t.upstream_idle,
                      t.upstream_pool_idle)
        # Deadline resolution: a tenth of the shortest timeout, between 20 ms and 1 s.
        self.tick = max(0.02, min(1.0, fastest / 10))
        self._sweeper: asyncio.Task[None] | None = None
        # One JSON line per finished request when settings.access_log is set (start_dataplane opens it).
        self.access_log: AccessLog | None = None

    def __repr__(self) -> str:
        idle = sum(len(e.idle) for e in self.endpoints.values())
        return (f"<DataPlane [Clients: {len(self.conns)} | Upstreams: {len(self.uconns)} open, {idle} idle | "
                f"Versions: {len(self.backends)}{' | draining' if self.draining else ''}]>")

    # -- interface for `turnout serve`

    def use_plan(self, table: RouteTable) -> Plan:
        if self.plan.table is not table:
            self.plan = Plan(table)
        return self.plan

    def table_changed(self, table: RouteTable) -> None:
        self.use_plan(table)
        old = self.endpoints
        new: dict[tuple[str, str], Endpoint] = {}
        backends: dict[str, Backend] = {}
        for name, version in table.versions.items():
            eps = []
            for url in dict.fromkeys(version.endpoints):
                ep = old.get((name, url))
                if ep is None:
                    ep = Endpoint(name, url)
                new[(name, url)] = ep
                eps.append(ep)
                self.health.watch(ep, version.spec.health)
            backends[name] = Backend(name, eps)
        for key, ep in old.items():
            if key not in new:
                ep.removed = True
                self.health.forget(ep)
        self.endpoints = new
        self.backends = backends

    def health_view(self) -> Mapping[str, Mapping[str, bool]]:
        return {name: {ep.url: ep.healthy for ep in b.endpoints} for name, b in self.backends.items()}

    async def shutdown(self, grace: float) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
        started = time.monotonic()
        if self.conns:
            # A keep-alive connection idle right now may have a request on the wire: closing it at once would
            # lose that request (the client sees a reset, not a response). So idle connections get a short
            # window in which their next request is answered with `Connection: close`; only those still
            # idle after it are closed. Busy clients thus move to another worker without an error.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), min(DRAIN_IDLE, grace))
            for c in list(self.conns):
                c.close_if_idle()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), max(0.0, grace - (time.monotonic() - started)))
        for c in list(self.conns):
            c.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.mirror.close()
        await self.health.close()
        for u in list(self.uconns):
            u.close()
        log = self.access_log
        if log is not None:
            self.access_log = None
            await log.aclose()
        await asyncio.sleep(0)

    # -- request-path helpers

    def version_header(self, version: str) -> bytes:
        line = self._version_lines.get(version)
        if line is None:
            line = self._version_lines[version] = b"X-Turnout-Version: " + version.encode() + _CRLF
        return line

    def cookie_header(self, cookie: str, version: str) -> bytes:
        key = (cookie, version)
        line = self._cookie_lines.get(key)
        if line is None:
            line = self._cookie_lines[key] = (f"Set-Cookie: {cookie}={version}; Path=/; HttpOnly; SameSite=Lax"
                                              .encode() + _CRLF)
        return line

    def request_head(self, c: ClientConnection, ex: Exchange, route: str) -> bytes:
        fwd = ex.fwd
        if fwd is None:
            # The lines the proxy adds depend only on (peer, Host, route): a keep-alive client repeats them.
            if ex.host_raw == c.tail_host and route == c.tail_route:
                tail = c.tail
            else:
                tail = c.fwd_lines
                if ex.host_raw is not None:
                    tail += b"X-Forwarded-Host: " + ex.host_raw + _CRLF
                c.tail = tail = tail + self.route_header(route)
                c.tail_host = ex.host_raw
                c.tail_route = route
            return b"".join([ex.method_b, b" ", ex.target, b" HTTP/1.1\r\n", *ex.lines, tail])
        # Only ever set for trusted peers: their chain is extended, not replaced.
        parts = [ex.method_b, b" ", ex.target, b" HTTP/1.1\r\n", *ex.lines]
        ext = parts.extend
        prior = fwd.get(b"x-forwarded-for")
        peer = c.peer.encode()
        ext((b"X-Forwarded-For: ", prior + b", " + peer if prior else peer, _CRLF,
             b"X-Forwarded-Proto: ", fwd.get(b"x-forwarded-proto") or b"http", _CRLF))
        host = fwd.get(b"x-forwarded-host") or ex.host_raw
        if host is not None:
            ext((b"X-Forwarded-Host: ", host, _CRLF))
        if b"forwarded" in fwd:
            ext((b"Forwarded: ", fwd[b"forwarded"], _CRLF))
        parts.append(self.route_header(route))
        return b"".join(parts)

    def route_header(self, route: str) -> bytes:
        line = self._route_lines.get(route)
        if line is None:
            line = self._route_lines[route] = b"X-Turnout-Route: " + route.encode() + _CRLF
        return line

    def connect(self, ep: Endpoint, ex: Exchange) -> None:
        task = self.loop.create_task(self._connect(ep, ex))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, ep: Endpoint, ex: Exchange) -> None:
        try:
            async with asyncio.timeout(self.t_connect):
                _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self, ep), ep.host, ep.port)
        except TimeoutError:
            ex.client.upstream_failed(ex, None, "connect_timeout", True)
        except OSError:
            ex.client.upstream_failed(ex, None, "connect", True)
        else:
            ex.client.attach(ex, conn)

    def release(self, conn: UpstreamConnection) -> None:
        ep = conn.endpoint
        if conn.reusable() and not ep.ejected and not ep.removed and len(ep.idle) < self.pool_size \
                and not self.draining:
            ep.idle.append(conn)
            conn.deadline = self.now() + self.t_pool_idle
        else:
            conn.close()

    # -- timers

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = self.now()
            for c in list(self.conns):
                d = c.deadline
                if d and d <= now:
                    c.on_deadline()
            for u in list(self.uconns):
                d = u.deadline
                if d and d <= now:
                    u.on_deadline()

    async def serve(self, *, reuse_port: bool, sock: socket.socket | None) -> None:
        self.table_changed(self.holder.table)
        if sock is not None:
            self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024)
        else:
            host, port = self.settings.listen
            self.server = await self.loop.create_server(lambda: ClientConnection(self), host, port,
                                                        reuse_port=reuse_port or None, backlog=1024)
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self.server is not None
        sockets = self.server.sockets  # type: ignore[attr-defined]
        return int(sockets[0].getsockname()[1])


async def start_dataplane(settings: Settings, holder: TableHolder, stats: Stats, *,
                          reuse_port: bool = False, sock: socket.socket | None = None) -> DataPlane:
    dp = DataPlane(settings, holder, stats)
    if settings.access_log:
        dp.access_log = AccessLog.open(settings, stats, state_dir=state_dir(settings))
    try:
        await dp.serve(reuse_port=reuse_port, sock=sock)
    except BaseException:
        if dp.access_log is not None:
            await dp.access_log.aclose()
        raise
    return dp
