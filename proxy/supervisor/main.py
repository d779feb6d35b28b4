"""`turnout serve`: one supervisor process wiring store, watcher, data plane, admin API and services.

Design rule: this module only wires; each part keeps its own rule. One Watcher (proxy.control.watcher)
installs every revision: the store's watch and the admin API's commits both reach it, and its listeners tell
the data plane. Process model:
- workers == 1: the data plane runs in the supervisor's own event loop and listens to the watcher, so an
  admin write is serving in the same process when it is answered (rollback in a few milliseconds).
- workers > 1: the supervisor runs the admin API, providers and controllers; N worker processes
  (proxy.supervisor.workers, proxy.supervisor.worker) follow the store with their own watchers. The
  supervisor's watcher pokes them at each revision and its `installed` waits (bounded) until each routes
  with it, so an admin write is answered once every worker serves it. On SIGTERM the supervisor stops
  gracefully: services first, then the data plane or the workers finish what is in flight.
Every port is bound before the route file (proxy.supervisor.seed) is committed: a proxy that cannot listen
exits without having changed the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import uvloop
from aiohttp import web

from proxy import data_plane_build
from proxy.admin.app import create_app
from proxy.admin.auth import load_tokens
from proxy.admin.context import AdminContext
from proxy.admin.tokens import TOKEN_FILE_NAME
from proxy.control.canary.controller import CanaryController
from proxy.control.leader import leader_for
from proxy.control.rechecks import Rechecker
from proxy.control.watcher import Watcher
from proxy.dataplane.listener import DataPlane, start_dataplane
from proxy.providers.containers import DockerProvider
from proxy.providers.docker_zones import DockerZones
from proxy.providers.local import LocalProvider
from proxy.settings import Settings, listeners_of
from proxy.store import open_store
from proxy.supervisor.process import (
    StopSignal,
    hostport,
    listen_socket,
    listener_option,
    log,
    metrics_dir,
    state_dir,
    store_url,
)
from proxy.supervisor.seed import seed_from_file
from proxy.supervisor.workers import Workers
from proxy.table import TableHolder
from proxy.telemetry.metrics import StatsSnapshot, aggregate
from proxy.telemetry.stats import Stats


class Service(Protocol):
    """What the supervisor runs beside the data plane (providers, the canary controller)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.store = open_store(store_url(settings))
        self.holder = TableHolder()
        self.watcher = Watcher(self.store, self.holder, self.stats)
        self.dataplane: DataPlane | None = None  # with one worker
        self.workers = Workers(settings) if settings.workers > 1 else None
        self._listeners: list[socket.socket] = []  # the data plane's (one per listener), with one worker
        self._admin_sock: socket.socket | None = None
        self.admin_runner: web.AppRunner | None = None
        self.services: list[Service] = []  # started ones, stopped in reverse order
        self.ctx: AdminContext | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.settings.workers} worker(s) [revision {self.holder.table.revision}]>"

    async def start(self) -> None:
        s = self.settings
        self._bind()
        if s.routes:
            rev = await seed_from_file(self.store, s.routes, self.stats)
        else:
            rev = await self.store.current()
        self.watcher.receive(rev)
        if self.workers is None:
            self.dataplane = await start_dataplane(s, self.holder, self.stats, socks=self._listeners,
                                                   state_dir=state_dir(s))
            self.watcher.listeners.append(self.dataplane.table_changed)
        else:
            await self.workers.spawn()
            self.watcher.listeners.append(self.workers.table_changed)
            self.watcher.routed = self.workers.routed
        self.watcher.start()
        # Installed with one worker too: SIGHUP's default action would kill the proxy on the spot.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.restart_workers)
        await self._start_admin()
        urls = ", ".join(f"{'https' if li.tls else 'http'}://{hostport(li.address)}" for li in listeners_of(s))
        log(f"proxy listening on {urls} ({s.workers} worker(s), data plane "
            f"{data_plane_build()}); "
            f"admin API on http://{hostport(s.admin)}; store {self.store.url}; revision {rev.number}")

    def _bind(self) -> None:
        s = self.settings
        if self.workers is None:
            for i, li in enumerate(listeners_of(s)):
                self._listeners.append(listen_socket(li.address, listener_option(s, i)))
        else:
            self.workers.bind()
        self._admin_sock = listen_socket(s.admin, "--admin")

    def restart_workers(self) -> None:
        if self.workers is None:
            if self.dataplane is not None and self.dataplane.tls:
                self.dataplane.reload_certificates()
                return
            log("SIGHUP ignored: a rolling restart replaces worker processes; this proxy runs one process "
                "(start it with --workers 2 or more)")
            return
        self.workers.restart()

    def health_view(self) -> dict[str, dict[str, bool]]:
        if self.dataplane is not None:
            return {v: dict(eps) for v, eps in self.dataplane.health_view().items()}
        assert self.workers is not None
        return self.workers.health_view()

    async def _start_admin(self) -> None:
        s = self.settings
        sdir = state_dir(s)
        # Whether this start creates the generated token file or reuses it (then it is not "written").
        existed = (sdir / TOKEN_FILE_NAME).exists()
        tokens, written = load_tokens(s, sdir)
        if written is not None:
            log(f"admin token read from {written}" if existed else f"admin token written to {written} (mode 0600)")
        directory = metrics_dir(s) if self.workers is not None else None
        # One election for both providers, so with several replicas on etcd the same replica runs the local
        # processes and the containers.
        providers = leader_for(self.store, "providers")
        # Always on: with no docker versions it only watches the store, and an absent engine is reported
        # once, not fatal, so `turnout deploy` works against any running proxy.
        docker = DockerZones(self.store, s.docker_engines, leader=providers) if s.docker_engines else \
            DockerProvider(self.store, leader=providers)
        canary = CanaryController(self.store, self.stats, self.health_view, self._stats_source(directory))
        rechecks = Rechecker(self.store, self.stats, interval=s.check_interval)
        ctx = AdminContext(settings=s, store=self.store, watcher=self.watcher, stats=self.stats,
                           health=self.health_view, tokens=tokens, docker=docker, metrics_dir=directory)
        self.ctx = ctx
        self.admin_runner = web.AppRunner(create_app(ctx), access_log=None, handle_signals=False)
        await self.admin_runner.setup()
        assert self._admin_sock is not None
        await web.SockSite(self.admin_runner, self._admin_sock).start()
        services: list[Service] = [LocalProvider(self.store, leader=providers, state_dir=sdir,
                                                     zone=self.settings.zone), canary, rechecks, docker]
        for svc in services:
            try:
                await svc.start()
                self.services.append(svc)
            except Exception as e:
                log(f"{type(svc).__name__} did not start: {e}")
        # The admin API drives rollouts through the controller once it runs (a fallback one until then).
        ctx.canary = canary if canary in self.services else None
        ctx.rechecks = rechecks if rechecks in self.services else None

    def _stats_source(self, directory: Path | None) -> Callable[[], StatsSnapshot]:
        return lambda: aggregate(self.stats, directory)

    async def stop(self) -> None:
        grace = self.settings.timeouts.shutdown_grace
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.workers is not None:
            await self.workers.stop_restarts()
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                await svc.stop()
        if self.dataplane is not None:
            await self.dataplane.shutdown(grace)
        if self.workers is not None:
            await self.workers.stop()
        await self.watcher.stop()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        for own in (*self._listeners, self._admin_sock):
            if own is not None:
                own.close()
        await self.store.close()


async def run_supervisor(settings: Settings, on_ready: Callable[[Supervisor], None] | None = None) -> None:
    stopper = StopSignal()
    sup = Supervisor(settings)
    try:
        await sup.start()
        if on_ready is not None:
            on_ready(sup)
        await stopper.wait()
        log("stopping: finishing in-flight requests")
    finally:
        stopper.close()
        await sup.stop()


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)
