"""The status page's log tail of one replica: GET /api/v1/docker/versions/{name}/logs?replica=I&tail=N through
the real admin app, against containers in the private engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.admin.app import create_app
from proxy.admin.context import AdminContext
from proxy.control.watcher import Watcher
from proxy.providers.containers import DockerProvider
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats
from tests.observability.conftest import listening_socket

from .conftest import Images
from .engine import Dockerd
from .test_provider import register

pytestmark = pytest.mark.docker
TOKEN = "logs-token-0123456789"


@pytest.fixture
async def api(tmp_path: Path, clean_engine: Dockerd) -> AsyncIterator[tuple[str, SQLiteStore, DockerProvider]]:
    store = SQLiteStore(tmp_path / "state.db")
    provider = DockerProvider(store, base_url=clean_engine.url, log=lambda msg: None)
    await provider.start()
    stats = Stats()
    ctx = AdminContext(settings=Settings(), store=store, watcher=Watcher(store, TableHolder(), stats), stats=stats,
                       tokens={TOKEN: "ops"}, docker=provider)
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", store, provider
    finally:
        await runner.cleanup()
        await provider.stop()
        await store.close()


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, json.loads(await r.read())


async def test_log_tail_of_one_replica(api: tuple[str, SQLiteStore, DockerProvider], images: Images) -> None:
    url, store, provider = api
    await register(store, "bad", images.broken, replicas=2)  # prints two lines, then exits (and is restarted)
    provider.kick()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    body: Any = None
    while loop.time() < deadline:
        status, body = await _get(f"{url}/api/v1/docker/versions/bad/logs?replica=1&tail=2")
        if status == 200 and len([lines for lines in body["containers"].values() if len(lines) == 2]) == 1:
            break
        await asyncio.sleep(0.2)
    assert body["replica"] == 1
    (name,) = body["containers"]  # only replica 1's container
    assert "-bad-1-" in name or name == "bad replica 1 (exited)"
    # stdout and stderr lines of one instant: their order is the engine's
    assert sorted(body["containers"][name]) == ["fatal: DATABASE_URL is not set", "starting web"]

    status, one = await _get(f"{url}/api/v1/docker/versions/bad/logs?replica=1&tail=1")
    assert (status, [len(lines) for lines in one["containers"].values()]) == (200, [1])
    status, both = await _get(f"{url}/api/v1/docker/versions/bad/logs?tail=2")
    assert (status, len(both["containers"]), both["replica"]) == (200, 2, None)
    status, bad = await _get(f"{url}/api/v1/docker/versions/bad/logs?replica=one")
    assert (status, bad["errors"][0]["path"]) == (422, "replica")
