"""The DataPlane object: listening, route-table changes, the deadline sweeper and the graceful stop.

Design rule: per-request timeouts are deadlines (floats) on connection objects that one sweeper checks a
few times per second, instead of a timer handle per request. The state requests read is PlaneState's
(proxy.dataplane.plane); this class only adds what starts, changes and stops the plane, and writes no
field of the connections, endpoints or exchanges it holds (it calls their methods).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from proxy.dataplane.certs import ListenerTls, load_listeners
from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.h2accept import H2cSniff
from proxy.dataplane.h2upstream import H2Pool
from proxy.dataplane.plane import PlaneState
from proxy.dataplane.pool import Backend, Endpoint
from proxy.dataplane.tls import reload_all, tls_factory, watch_certificates
from proxy.dataplane.tls_contexts import UpstreamContexts
from proxy.settings import Listener, Settings, listeners_of
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.stats import Stats

# On a graceful stop, how long an idle keep-alive connection may still bring one request (answered with
# `Connection: close`).
STOP_IDLE = 1.0


def _log(msg: str) -> None:
    print(f"turnout: {msg}", file=sys.stderr, flush=True)


def _factory(dp: DataPlane, tls: ListenerTls | None, listener: Listener) -> Callable[[], asyncio.BaseProtocol]:
    if tls is None:
        if "h2c" in listener.protocols:
            # Only listeners that take h2c look at the first bytes; the others go straight to HTTP/1.
            return lambda: H2cSniff(dp, lambda: ClientConnection(dp))
        return lambda: ClientConnection(dp)
    return tls_factory(dp, tls)


class DataPlane(PlaneState):
    def __init__(self, settings: Settings, holder: TableHolder, stats: Stats) -> None:
        super().__init__(settings, holder, stats)
        self.server: asyncio.AbstractServer | None = None  # the first listener's
        self.servers: list[asyncio.AbstractServer] = []  # one per listener (settings.listeners_of)
        self.tls: list[ListenerTls] = []  # the TLS listeners' certificates
        self._cert_watch: asyncio.Task[None] | None = None
        t = settings.timeouts
        fastest = min(t.header_read, t.keepalive_idle, t.body_read_idle, t.upstream_response, t.upstream_idle,
                      t.upstream_pool_idle)
        # Deadline resolution: a tenth of the shortest timeout, between 20 ms and 1 s. A route's own
        # backend_request timeout (table_changed) may shorten it: 500 ms must not fire at 1.5 s.
        self.base_tick = max(0.02, min(1.0, fastest / 10))
        self.tick = self.base_tick
        self._sweeper: asyncio.Task[None] | None = None
        self.upstream_tls = UpstreamContexts()

    def __repr__(self) -> str:
        idle = sum(len(e.idle) for e in self.endpoints.values())
        return (f"<DataPlane [Clients: {len(self.conns)} | Upstreams: {len(self.uconns)} open, {idle} idle | "
                f"Versions: {len(self.backends)}{' | stopping' if self.stopping else ''}]>")

    # -- interface for `turnout serve`

    def table_changed(self, table: RouteTable) -> None:
        self.use_plan(table)
        route_fastest = min((r.actions.t_backend for r in table.routes
                             if r.actions is not None and r.actions.t_backend > 0), default=10.0)
        self.tick = max(0.02, min(self.base_tick, route_fastest / 10))
        old = self.endpoints
        new: dict[tuple[str, str], Endpoint] = {}
        backends: dict[str, Backend] = {}
        contexts = self.upstream_tls.refresh(list(table.versions.values()))
        for name, version in table.versions.items():
            eps = []
            ctx = contexts.get(name)
            server_name = version.spec.tls.server_name if version.spec.tls is not None else None
            zones = dict(version.zones)
            for url in dict.fromkeys(version.endpoints):
                ep = old.get((name, url))
                if ep is not None and ep.https and (ep.ssl is not ctx
                                                    or ep.server_hostname != (server_name or ep.host)):
                    # Same name and URL, other TLS settings (a version re-registered, a rotated file): its
                    # pooled connections were verified under the old ones. Retired below, as removed.
                    ep = None
                if ep is None:
                    ep = Endpoint(name, url, ctx, server_name)
                    if version.spec.protocol != "http1":
                        ep.mux = H2Pool(self, ep)
                ep.zone = zones.get(url, "")
                new[(name, url)] = ep
                eps.append(ep)
                self.health.watch(ep, version.spec.health)
            backends[name] = Backend(name, eps, self.settings.zone)
        for key, ep in old.items():
            if new.get(key) is not ep:
                ep.retire()
                self.health.forget(ep)
        self.endpoints = new
        self.backends = backends

    def health_view(self) -> Mapping[str, Mapping[str, bool]]:
        return {name: {ep.url: ep.healthy for ep in b.endpoints} for name, b in self.backends.items()}

    async def shutdown(self, grace: float) -> None:
        self.stopping = True
        for server in self.servers:
            server.close()
        if self._cert_watch is not None:
            self._cert_watch.cancel()
        started = time.monotonic()
        if self.conns:
            # A keep-alive connection idle right now may have a request on the wire: closing it at once would
            # lose that request (the client sees a reset, not a response). So idle connections get a short
            # window in which their next request is answered with `Connection: close`; only those still
            # idle after it are closed. Busy clients thus move to another worker without an error.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients_gone.wait(), min(STOP_IDLE, grace))
            for c in list(self.conns):
                c.close_if_idle()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients_gone.wait(), max(0.0, grace - (time.monotonic() - started)))
        for c in list(self.conns):
            c.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.mirror.close()
        await self.health.close()
        for u in list(self.uconns):
            u.close()
        log = self.access_log
        if log is not None:
            self.access_log = None
            await log.aclose()
        await asyncio.sleep(0)

    # -- timers

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = self.now()
            for c in list(self.conns):
                d = c.deadline
                if d and d <= now:
                    c.on_deadline()
                elif not c.parser_shed:
                    c.shed(now)
            for u in list(self.uconns):
                d = u.deadline
                if d and d <= now:
                    u.on_deadline()

    def reload_certificates(self) -> None:
        """SIGHUP: look at every TLS listener's files now (they are also checked every few seconds)."""
        reload_all(self.tls, _log)

    async def serve(self, *, reuse_port: bool, socks: Sequence[socket.socket] | None) -> None:
        """Listen on every listener: on `socks` (one per listener, in order) when given."""
        self.table_changed(self.holder.table)
        tls = load_listeners(self.settings)  # ValidationError with field paths when a pair does not load
        try:
            for i, listener in enumerate(listeners_of(self.settings)):
                factory = _factory(self, tls[i], listener)
                server: asyncio.AbstractServer
                if socks:
                    server = await self.loop.create_server(factory, sock=socks[i], backlog=1024)
                else:
                    host, port = listener.address
                    server = await self.loop.create_server(factory, host, port, reuse_port=reuse_port or None,
                                                           backlog=1024)
                self.servers.append(server)
        except BaseException:
            for server in self.servers:
                server.close()
            raise
        self.server = self.servers[0]
        self.tls = [t for t in tls if t is not None]
        now = datetime.datetime.now(datetime.UTC)
        for t in self.tls:
            for line in t.expired(now):
                _log(line)
        if self.tls:
            self._cert_watch = self.loop.create_task(watch_certificates(self.tls, _log))
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def ports(self) -> list[int]:
        """The port of each listener, in order."""
        return [int(s.sockets[0].getsockname()[1]) for s in self.servers]  # type: ignore[attr-defined]


async def start_dataplane(settings: Settings, holder: TableHolder, stats: Stats, *,
                          reuse_port: bool = False, socks: Sequence[socket.socket] | None = None,
                          state_dir: Path | None = None, sock: socket.socket | None = None) -> DataPlane:
    """`state_dir` holds the access log's hash key (default settings.state_dir); `socks` are the listeners'
    bound sockets (one per listener, in order; `sock`: the one listener's), else each listener binds its
    address."""
    if sock is not None:
        socks = [sock]
    dp = DataPlane(settings, holder, stats)
    if settings.access_log:
        dp.access_log = AccessLog.open(settings, stats, state_dir=state_dir)
    try:
        await dp.serve(reuse_port=reuse_port, socks=socks)
    except BaseException:
        if dp.access_log is not None:
            await dp.access_log.aclose()
        raise
    return dp
