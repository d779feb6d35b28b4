"""The status page's Docker view in real headless Chromium against containers in the private engine: image
digest, replicas healthy/desired, container age, and one replica's log tail on a click.

The screenshot goes to docs/img/cockpit-docker.png only with TURNOUT_UPDATE_DOCS=1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy import changes
from proxy.admin.app import create_app
from proxy.admin.context import AdminContext
from proxy.control.watcher import Watcher
from proxy.model import Route
from proxy.providers.containers import DockerProvider
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats
from tests.observability.cdp import chromium_page
from tests.observability.conftest import listening_socket

from .conftest import Images
from .engine import Dockerd
from .test_provider import register

pytestmark = [pytest.mark.docker, pytest.mark.browser, pytest.mark.slow]
TOKEN = "docker-page-token-0123456789"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


@pytest.fixture
async def admin_url(tmp_path: Path, clean_engine: Dockerd) -> AsyncIterator[tuple[str, SQLiteStore, DockerProvider]]:
    store = SQLiteStore(tmp_path / "state.db")
    provider = DockerProvider(store, base_url=clean_engine.url, log=lambda msg: None)
    await provider.start()
    stats = Stats()
    watcher = Watcher(store, TableHolder(), stats)
    watcher.start()
    ctx = AdminContext(settings=Settings(), store=store, watcher=watcher, stats=stats, tokens={TOKEN: "ops"},
                       docker=provider)
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", store, provider
    finally:
        await runner.cleanup()
        await watcher.stop()
        await provider.stop()
        await store.close()


async def test_docker_view_shows_replicas_and_a_replica_log_tail(
        admin_url: tuple[str, SQLiteStore, DockerProvider], images: Images, tmp_path: Path) -> None:
    url, store, provider = admin_url
    await register(store, "v1", images.v1, replicas=2)
    await register(store, "bad", images.broken, replicas=1)  # prints why it cannot start, exits, is restarted
    await store.update(lambda s: changes.put_route(s, Route("web", split=(("v1", 100.0),))), actor="ops")
    provider.kick()
    async with chromium_page(tmp_path / "profile") as page:
        await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                        mobile=False)
        await page.send("Page.navigate", url=url + "/ui#docker")
        await page.wait_for("document.getElementById('login').classList.contains('show')")
        await page.click("#token-input")
        await page.type(TOKEN)
        await page.click("#token-submit")
        card = '.docker-version[data-version="v1"]'
        await page.wait_for(f"document.querySelector('{card} .replicas b')?.textContent === '2/2'", timeout=60)
        digest = images.v1.split("@")[1][:19]  # sha256: and the first 12 hex digits
        assert await page.eval(f"document.querySelector('{card} .match').textContent") == digest
        ages = await page.eval(f"[...document.querySelectorAll('{card} .replica .age')].map(e => e.textContent)")
        assert len(ages) == 2 and all(a.endswith(" s") for a in ages), ages

        bad = '.docker-version[data-version="bad"]'
        await page.wait_for(f"!!document.querySelector('{bad} .replicas b')")
        assert await page.eval(f"document.querySelector('{bad} .replicas b').textContent") == "0/1"
        button = f'{bad} button.show-logs[data-replica="0"]'
        for _ in range(60):  # the log shows once the container has printed its two lines
            await page.click(button)
            await page.wait_for(f"!!document.querySelector('{bad} pre.log')")
            text = await page.eval(f"document.querySelector('{bad} pre.log').textContent")
            if "fatal: DATABASE_URL is not set" in text:
                break
            await page.click(button)  # hide, and ask again
            await asyncio.sleep(0.5)
        assert sorted(text.split("\n")) == ["fatal: DATABASE_URL is not set", "starting web"]
        assert await page.eval("document.activeElement.textContent") == "Hide log"  # focus stays on the button

        path = DOCS_IMG / "cockpit-docker.png" if os.environ.get("TURNOUT_UPDATE_DOCS") == "1" else \
            tmp_path / "cockpit-docker.png"
        await page.eval("window.scrollTo(0, 0)")
        height = await page.eval("document.documentElement.scrollHeight")
        res = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": 1280, "height": min(height, 1100), "scale": 1})
        path.write_bytes(base64.b64decode(res["data"]))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads(await page.eval("JSON.stringify(sessionStorage.getItem('turnout.admin.token'))")) == TOKEN
