"""A live admin application on a real loopback socket, backed by a SQLite store in tmp_path."""

from __future__ import annotations

import io
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
from proxy.control.watcher import Watcher
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
TOKENS = {ALICE: "alice", BOB: "bob"}

# Static endpoints on loopback; nothing listens there and nothing here connects to them.
EP1 = "http://127.0.0.1:9001"
EP2 = "http://127.0.0.1:9002"
EP3 = "http://127.0.0.1:9003"


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any
    content_type: str


@dataclass
class Admin:
    url: str
    ctx: AdminContext
    session: aiohttp.ClientSession
    tables: list[RouteTable] = field(default_factory=list)
    health: dict[str, dict[str, bool]] = field(default_factory=dict)

    async def call(self, method: str, path: str, body: Any = None, *, data: bytes | str | io.BytesIO | None = None,
                   token: str | None = ALICE, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> Reply:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.url + path, data=data, headers=h, params=params) as resp:
            raw = await resp.read()
            parsed: Any = json.loads(raw) if raw and "json" in resp.content_type else raw.decode()
            return Reply(resp.status, resp.headers, parsed, resp.content_type)

    async def revision(self) -> int:
        return (await self.ctx.store.current()).number

    async def seed(self) -> None:
        """Versions v1, v2, v3 and route `web` (v1=100, fallback v1): revisions 1-4."""
        for name, ep in (("v1", EP1), ("v2", EP2), ("v3", EP3)):
            r = await self.call("PUT", f"/api/v1/versions/{name}", {"endpoints": [ep]})
            assert r.status == 201, r.body
        r = await self.call("PUT", "/api/v1/routes/web", {"split": {"v1": 100}, "fallback": ["v1"],
                                                          "identity": [{"header": "X-Client-Id"}]})
        assert r.status == 201, r.body


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own token or state dir must not leak into the tests.
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("TURNOUT_ADMIN", raising=False)
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(tmp_path / "state-dir"))


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    store = SQLiteStore(tmp_path / "state.db")
    health: dict[str, dict[str, bool]] = {}
    stats = Stats()
    watcher = Watcher(store, TableHolder(), stats)
    ctx = AdminContext(settings=Settings(), store=store, watcher=watcher, stats=stats,
                       health=lambda: health, tokens=dict(TOKENS))
    tables: list[RouteTable] = []
    watcher.listeners.append(tables.append)
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    sock = listening_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    port = sock.getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            yield Admin(f"http://127.0.0.1:{port}", ctx, session, tables, health)
    finally:
        await runner.cleanup()
        await store.close()
