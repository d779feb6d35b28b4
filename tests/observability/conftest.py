"""A live admin application (the real proxy.admin.app, so observe's routes sit behind the real token
middleware) on a loopback socket, backed by a SQLite store in tmp_path, plus a fake traffic source."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.admin.app import create_app
from proxy.admin.context import AdminContext
from proxy.admin.observe import Observe
from proxy.control.watcher import Watcher
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats

TOKEN = "observe-token-0123456789abcdef"
TOKENS = {TOKEN: "ops"}
EP = {"v1": "http://127.0.0.1:9201", "v2": "http://127.0.0.1:9202", "v3": "http://127.0.0.1:9203"}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class Admin:
    url: str
    ctx: AdminContext
    session: aiohttp.ClientSession
    health: dict[str, dict[str, bool]] = field(default_factory=dict)
    app: web.Application | None = None

    def observe(self) -> Observe:
        """The Observe instance serving /api/v1/stats (its sampler holds the rate window)."""
        assert self.app is not None
        for r in self.app.router.routes():
            if r.resource is not None and r.resource.canonical == "/api/v1/stats":
                observe = getattr(r.handler, "__self__", None)
                assert isinstance(observe, Observe)
                return observe
        raise LookupError("no /api/v1/stats route")

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
                   headers: dict[str, str] | None = None) -> Reply:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body)
            h["Content-Type"] = "application/json"
        async with self.session.request(method, self.url + path, data=data, headers=h) as resp:
            raw = await resp.read()
            parsed: Any = json.loads(raw) if raw and "json" in resp.content_type else raw.decode()
            return Reply(resp.status, resp.headers, parsed)

    async def seed(self) -> None:
        """Versions v1, v2, v3; route `web` v1=90 v2=10 fallback v1 with one pin to v3; route `api` v1=100.

        Revisions: 1-3 versions, 4 web, 5 api, 6 pin.
        """
        for name, ep in EP.items():
            r = await self.call("PUT", f"/api/v1/versions/{name}", {"endpoints": [ep]})
            assert r.status == 201, r.body
        r = await self.call("PUT", "/api/v1/routes/web", {"split": {"v1": 90, "v2": 10}, "fallback": ["v1"],
                                                          "identity": [{"header": "X-Client-Id"}]})
        assert r.status == 201, r.body
        r = await self.call("PUT", "/api/v1/routes/api", {"match": {"path_prefix": "/api"}, "split": {"v1": 100}})
        assert r.status == 201, r.body
        r = await self.call("PUT", "/api/v1/routes/web/pins/big-customer", {"version": "v3"})
        assert r.status == 200, r.body
        self.health.update({"v1": {EP["v1"]: True}, "v2": {EP["v2"]: False}, "v3": {EP["v3"]: True}})


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def start_admin(tmp_path: Path, settings: Settings, metrics_dir: Path | None = None
                      ) -> tuple[web.AppRunner, Admin, aiohttp.ClientSession, SQLiteStore]:
    store = SQLiteStore(tmp_path / "state.db")
    health: dict[str, dict[str, bool]] = {}
    stats = Stats()
    ctx = AdminContext(settings=settings, store=store, watcher=Watcher(store, TableHolder(), stats), stats=stats,
                       health=lambda: health, tokens=dict(TOKENS), metrics_dir=metrics_dir)
    app = create_app(ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    session = aiohttp.ClientSession()
    return runner, Admin(f"http://127.0.0.1:{sock.getsockname()[1]}", ctx, session, health, app), session, store


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("TURNOUT_ADMIN", raising=False)
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(tmp_path / "state-dir"))


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    runner, adm, session, store = await start_admin(tmp_path, Settings())
    try:
        yield adm
    finally:
        await session.close()
        await runner.cleanup()
        await store.close()


def traffic(stats: Stats, route: str, version: str, n: int, *, status: int = 200, duration: float = 0.003) -> None:
    """Fake data-plane traffic: `n` finished requests."""
    for _ in range(n):
        stats.request(route, version, status, duration, 100, 1000)
