"""create_app: feature modules are included when present, skipped when absent, and share the auth rule."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.admin import app as admin_app
from proxy.admin.context import AdminContext
from proxy.control.watcher import Watcher
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats
from tests.admin.conftest import ALICE, TOKENS, listening_socket


@pytest.fixture
async def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(admin_app, "FEATURE_MODULES", ("tests.admin.fake_feature", "proxy.admin.not_written_yet"))
    store = SQLiteStore(tmp_path / "state.db")
    stats = Stats()
    ctx = AdminContext(settings=Settings(), store=store, watcher=Watcher(store, TableHolder(), stats), stats=stats,
                       tokens=dict(TOKENS))
    runner = web.AppRunner(admin_app.create_app(ctx), access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        await store.close()


async def test_feature_routes_are_protected_unless_marked_public(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/v1/fake/whoami") as r:
            assert (r.status, r.content_type) == (401, "application/problem+json")
        async with s.get(f"{url}/api/v1/fake/whoami", headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert (r.status, await r.json()) == (200, {"actor": "alice", "revision": 0})
        async with s.get(f"{url}/fake-ui") as r:
            assert (r.status, await r.text()) == (200, "status page")


async def test_unknown_path_with_a_token_is_a_404_problem(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v1/nope",
                                                   headers={"Authorization": f"Bearer {ALICE}"}) as r:
        body = json.loads(await r.read())
        assert (r.status, r.content_type) == (404, "application/problem+json")
        assert (body["type"], body["status"], body["errors"]) == ("urn:turnout:problem:not-found", 404, [])


def test_absent_feature_modules_are_skipped_but_broken_ones_are_not_hidden() -> None:
    assert admin_app._optional("proxy.admin.not_written_yet") is None
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        admin_app._optional("tests.admin.broken_feature")
