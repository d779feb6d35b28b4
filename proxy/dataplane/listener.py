"""The DataPlane object: listening, route-table changes, the deadline sweeper and the graceful stop.

Design rule: per-request timeouts are deadlines (floats) on connection objects that one sweeper checks a
few times per second, instead of a timer handle per request. The state requests read is PlaneState's
(proxy.dataplane.plane); this class only adds what starts, changes and stops the plane, and writes no
field of the connections, endpoints or exchanges it holds (it calls their methods).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.plane import PlaneState
from proxy.dataplane.pool import Backend, Endpoint
from proxy.dataplane.tls_contexts import UpstreamContexts
from proxy.dataplane.upstream import UpstreamConnection
from proxy.settings import Settings
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.stats import Stats

# On a graceful stop, how long an idle keep-alive connection may still bring one request (answered with
# `Connection: close`).
STOP_IDLE = 1.0


class DataPlane(PlaneState):
    def __init__(self, settings: Settings, holder: TableHolder, stats: Stats) -> None:
        super().__init__(settings, holder, stats)
        self.server: asyncio.AbstractServer | None = None
        t = settings.timeouts
        fastest = min(t.header_read, t.keepalive_idle, t.body_read_idle, t.upstream_response, t.upstream_idle,
                      t.upstream_pool_idle)
        # Deadline resolution: a tenth of the shortest timeout, between 20 ms and 1 s.
        self.tick = max(0.02, min(1.0, fastest / 10))
        self._sweeper: asyncio.Task[None] | None = None
        self.upstream_tls = UpstreamContexts()

    def __repr__(self) -> str:
        idle = sum(len(e.idle) for e in self.endpoints.values())
        return (f"<DataPlane [Clients: {len(self.conns)} | Upstreams: {len(self.uconns)} open, {idle} idle | "
                f"Versions: {len(self.backends)}{' | stopping' if self.stopping else ''}]>")

    # -- interface for `turnout serve`

    def table_changed(self, table: RouteTable) -> None:
        self.use_plan(table)
        old = self.endpoints
        new: dict[tuple[str, str], Endpoint] = {}
        backends: dict[str, Backend] = {}
        contexts = self.upstream_tls.refresh(list(table.versions.values()))
        for name, version in table.versions.items():
            eps = []
            ctx = contexts.get(name)
            server_name = version.spec.tls.server_name if version.spec.tls is not None else None
            for url in dict.fromkeys(version.endpoints):
                ep = old.get((name, url))
                if ep is not None and ep.https and (ep.ssl is not ctx
                                                    or ep.server_hostname != (server_name or ep.host)):
                    # Same name and URL, other TLS settings (a version re-registered, a rotated file): its
                    # pooled connections were verified under the old ones. Retired below, as removed.
                    ep = None
                if ep is None:
                    ep = Endpoint(name, url, ctx, server_name)
                new[(name, url)] = ep
                eps.append(ep)
                self.health.watch(ep, version.spec.health)
            backends[name] = Backend(name, eps)
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
        if self.server is not None:
            self.server.close()
        started = time.monotonic()
        if self.conns:
            # A keep-alive connection idle right now may have a request on the wire: closing it at once would
            # lose that request (the client sees a reset, not a response). So idle connections get a short
            # window in which their next request is answered with `Connection: close`; only those still
            # idle after it are closed. Busy clients thus move to another worker without an error.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients_gone.wait(), min(STOP_IDLE, grace))
            for c in list(self.conns):
                cast(ClientConnection, c).close_if_idle()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients_gone.wait(), max(0.0, grace - (time.monotonic() - started)))
        for c in list(self.conns):
            cast(ClientConnection, c).abort()
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
                cc = cast(ClientConnection, c)
                d = cc.deadline
                if d and d <= now:
                    cc.on_deadline()
            for u in list(self.uconns):
                uc = cast(UpstreamConnection, u)
                d = uc.deadline
                if d and d <= now:
                    uc.on_deadline()

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
                          reuse_port: bool = False, sock: socket.socket | None = None,
                          state_dir: Path | None = None) -> DataPlane:
    """`state_dir` holds the access log's hash key (default settings.state_dir)."""
    dp = DataPlane(settings, holder, stats)
    if settings.access_log:
        dp.access_log = AccessLog.open(settings, stats, state_dir=state_dir)
    try:
        await dp.serve(reuse_port=reuse_port, sock=sock)
    except BaseException:
        if dp.access_log is not None:
            await dp.access_log.aclose()
        raise
    return dp
