"""End to end: real upstreams whose error rate the test controls, the real data plane, the admin API with
its token check, the canary controller's own loop, and the `turnout` CLI as a subprocess.

Intervals are a few tenths of a second so every test finishes in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.admin.app import create_app
from proxy.admin.context import AdminContext
from proxy.control.canary import CanaryController, load_rollout
from proxy.control.canary.drain import load_drain
from proxy.control.gates import HealthMap
from proxy.control.watcher import Watcher
from proxy.dataplane.listener import DataPlane, start_dataplane
from proxy.model import HealthCheck, IdentitySource, Route, State, Version, VersionSpec
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.metrics import aggregate
from proxy.telemetry.stats import Stats
from tests.control.conftest import Clock, seed

TOKEN = "canary-test-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Upstream:
    name: str
    url: str = ""
    fail_every: int = 0  # every n-th request answers 500 (0: never)
    served: int = 0


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def start_upstream(u: Upstream) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/healthz":
            return web.Response(text="ok")
        u.served += 1
        if u.fail_every and u.served % u.fail_every == 0:
            return web.Response(status=500, text=f"{u.name} failed")
        return web.Response(text=u.name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, port = await _serve(app)
    u.url = f"http://127.0.0.1:{port}"
    return runner


@dataclass
class Stack:
    tmp: Path
    store: SQLiteStore
    stats: Stats
    dp: DataPlane
    ctx: AdminContext
    controller: CanaryController
    proxy_url: str
    admin_url: str
    v1: Upstream
    v2: Upstream
    session: aiohttp.ClientSession
    cleanups: list[web.AppRunner] = field(default_factory=list)

    async def get(self, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, str, str | None]:
        async with self.session.get(self.proxy_url + path, headers=headers) as r:
            cookie = r.cookies.get("tv")
            return r.status, await r.text(), None if cookie is None else cookie.value

    async def split(self) -> dict[str, float]:
        r = (await self.store.current()).state.route("web")
        assert r is not None
        return dict(r.split)

    async def cli(self, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
        token_file = self.tmp / "token"
        token_file.write_text(TOKEN)
        env = {**os.environ, "TURNOUT_ADMIN": self.admin_url}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, "--token-file", str(token_file), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


def state_for(v1: Upstream, v2: Upstream) -> State:
    hc = HealthCheck(path="/healthz", interval=0.2, timeout=0.5)
    versions = {u.name: Version(u.name, VersionSpec(kind="static", endpoints=(u.url,), health=hc), (u.url,))
                for u in (v1, v2)}
    route = Route("web", identity=(IdentitySource("cookie", "sid"), IdentitySource("header", "x-user")),
                  split=(("v1", 100.0),), sticky=True, assignment_cookie="tv")
    return State(versions=versions, routes=(route,))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    v1, v2 = Upstream("v1"), Upstream("v2")
    runners = [await start_upstream(v1), await start_upstream(v2)]
    store = SQLiteStore(tmp_path / "state.db")
    await seed(store, state_for(v1, v2))
    stats = Stats()
    holder = TableHolder()
    settings = Settings(listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
    watcher = Watcher(store, holder, stats)
    watcher.receive(await store.current())
    dp = await start_dataplane(settings, holder, stats)
    dp.table_changed(holder.table)
    watcher.listeners.append(dp.table_changed)
    watcher.start()
    ctx = AdminContext(settings=settings, store=store, watcher=watcher, stats=stats, health=dp.health_view,
                       tokens={TOKEN: "alice"})
    admin_runner, admin_port = await _serve(create_app(ctx))
    def health() -> HealthMap:  # through ctx: a test replaces ctx.health to make a version unready
        return ctx.health()

    controller = CanaryController(store, stats, health, lambda: aggregate(stats, None), tick=0.05)
    await controller.start()
    ctx.canary = controller
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    s = Stack(tmp_path, store, stats, dp, ctx, controller, f"http://127.0.0.1:{dp.port}",
              f"http://127.0.0.1:{admin_port}", v1, v2, session)
    try:
        yield s
    finally:
        await session.close()
        await controller.stop()
        await watcher.stop()
        await dp.shutdown(0.1)
        await admin_runner.cleanup()
        for r in runners:
            await r.cleanup()
        await store.close()


@contextlib.asynccontextmanager
async def load(stack: Stack, users: int = 200, concurrency: int = 4) -> AsyncIterator[dict[str, int]]:
    """Requests from `users` distinct users (x-user header) in a loop until the block ends (bounded: 20 s)."""
    answered: dict[str, int] = {}
    ids = itertools.cycle(range(users))

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20.0
        while loop.time() < deadline:
            _, body, _ = await stack.get(headers={"x-user": f"user-{next(ids)}"})
            answered[body] = answered.get(body, 0) + 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        yield answered
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def wait_for_status(stack: Stack, want: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        r = await load_rollout(stack.store, "web")
        if r is not None and r.status == want:
            return
        await asyncio.sleep(0.05)
    r = await load_rollout(stack.store, "web")
    raise AssertionError(f"rollout did not become {want}: {r}")


async def test_cli_canary_promotes_a_healthy_version_through_the_real_proxy(stack: Stack) -> None:
    # Two identical upstreams on a shared 2-core machine: p99 over a few hundred requests still swings
    # several-fold between them, so this test allows 20x; latency verdicts are tested exactly elsewhere.
    async with load(stack) as answered:
        code, out, err = await stack.cli("canary", "start", "web", "--to", "v2", "--steps", "10,50,100",
                                         "--interval", "0.3s", "--min-requests", "10", "--max-p99-ratio", "20",
                                         "--wait")
    assert (code, err) == (0, ""), out
    assert await stack.split() == {"v1": 0.0, "v2": 100.0}
    assert answered["v2"] > 0 and answered["v1"] > 0
    first, last = out.splitlines()[0], out.strip().splitlines()
    assert first == "web: v2 vs v1  [##..................] 10%  step 1/3  running"
    assert any(line.startswith("web: v2 vs v1  [####################] 100%  step 3/3  promoted") for line in last)
    summaries = [i.summary for i in reversed(await stack.store.history(route="web", limit=10)) if i.actor == "canary"]
    assert summaries == ["split web: v1=100 -> v1=90 v2=10", "split web: v1=90 v2=10 -> v1=50 v2=50",
                         "split web: v1=50 v2=50 -> v1=0 v2=100"]
    code, out, _ = await stack.cli("canary", "status")
    assert code == 0 and out.startswith("web: v2 vs v1  [####################] 100%  step 3/3  promoted\n"
                                        "  last analysis: pass  canary ")


async def test_failing_canary_is_rolled_back_through_the_real_proxy(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"to": "v2", "steps": [20, 100], "interval": 0.4, "min_requests": 20}
    async with load(stack):
        async with stack.session.post(f"{stack.admin_url}/api/v1/canary/web", json=body, headers=headers) as r:
            assert r.status == 201
            assert (await r.json())["status"] == "running"
        assert await stack.split() == {"v1": 80.0, "v2": 20.0}
        stack.v2.fail_every = 2  # half of v2's answers are now 500
        await wait_for_status(stack, "rolled_back", timeout=10.0)
    assert await stack.split() == {"v1": 100.0, "v2": 0.0}
    info = (await stack.store.history(route="web", limit=1))[0]
    assert (info.actor, info.summary) == ("canary", "split web: v1=80 v2=20 -> v1=100 v2=0")
    # Decided at the first analysis after the failures began: either the rate over enough requests, or
    # errors that already exceed what the limit allows over min_requests.
    assert re.fullmatch(r"canary web: rolled back v2 to 0%; analysis failed at 20%: (error rate \d\.\d{4} "
                        r"\(\d+/\d+\) > max 0\.01|\d+ errors in the first \d+ requests already exceed max error "
                        r"rate 0\.01 of 20 requests)", info.reason), info.reason
    r = await load_rollout(stack.store, "web")
    assert r is not None and r.analysis is not None and r.analysis.verdict == "fail"
    assert r.analysis.canary.errors > 0


async def test_api_refuses_without_a_token_and_with_an_unready_canary(stack: Stack) -> None:
    async with stack.session.post(f"{stack.admin_url}/api/v1/canary/web", json={"to": "v2"}) as r:
        assert r.status == 401
    stack.ctx.health = lambda: {"v2": {stack.v2.url: False}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with stack.session.post(f"{stack.admin_url}/api/v1/canary/web", json={"to": "v2"}, headers=headers) as r:
        assert r.status == 409
        problem = await r.json()
    assert problem["detail"] == "version 'v2' has no healthy endpoint (0 of 1 healthy) (use force to override)"
    code, _, err = await stack.cli("canary", "start", "web", "--to", "v2")
    assert code == 1
    assert err.startswith("error: Conflicts with the current state (409): version 'v2' has no healthy endpoint")
    assert await stack.split() == {"v1": 100.0}


async def test_drain_keeps_old_sessions_while_new_ones_move(stack: Stack) -> None:
    # 20 sessions start while v1 has all the traffic: each is told (cookie tv=v1) where it belongs.
    old = {}
    for i in range(20):
        status, body, tv = await stack.get(headers={"cookie": f"sid=old-{i}"})
        assert (status, body, tv) == (200, "v1", "v1")
        old[f"old-{i}"] = tv
    # Quiet long enough for the `--status` CLI below (a Python start, slow on a busy machine) to see it draining.
    code, out, err = await stack.cli("drain", "web", "--from", "v1", "--to", "v2", "--quiet", "2s")
    assert (code, err) == (0, "")
    assert out.startswith("web: draining v1 -> v2  0 old-session request(s) so far")
    assert await stack.split() == {"v1": 0.0, "v2": 100.0}
    for _ in range(3):
        for sid, tv in old.items():
            assert (await stack.get(headers={"cookie": f"sid={sid}; tv={tv}"}))[1] == "v1"
        for i in range(20):
            status, body, tv = await stack.get(headers={"cookie": f"sid=new-{i}"})
            assert (status, body, tv) == (200, "v2", "v2")
        await asyncio.sleep(0.15)
    d = await load_drain(stack.store, "web")
    assert d is not None and d.status == "draining"
    # Old sessions end; the drain is reported once v1 saw none for the quiet period.
    code, out, _ = await stack.cli("drain", "web", "--status")
    assert code == 0 and out.startswith("web: draining v1 -> v2")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        d = await load_drain(stack.store, "web")
        if d is not None and d.status == "drained":
            break
        await asyncio.sleep(0.05)
    assert d is not None and d.status == "drained"
    assert d.old_requests >= 40  # at least the last two rounds of old sessions were seen after the first look
    info = (await stack.store.history(route="web", limit=1))[0]
    assert (info.actor, info.summary) == ("alice", "drain web: v1 drained into v2")


async def test_drain_counts_old_sessions_from_its_start_and_releases_them_once_drained(stack: Stack) -> None:
    # The test drives the drain tracker itself, on its own clock: ticks come exactly where it says.
    await stack.controller.stop()
    clock = Clock(time.time())
    ctl = CanaryController(stack.store, stack.stats, stack.ctx.health, lambda: aggregate(stack.stats, None),
                           clock=clock)
    stack.ctx.canary = ctl
    old = []
    for i in range(5):
        status, body, tv = await stack.get(headers={"cookie": f"sid=old-{i}"})
        assert (status, body, tv) == (200, "v1", "v1")
        old.append(f"sid=old-{i}; tv={tv}")
    started = clock()
    code, out, err = await stack.cli("drain", "web", "--from", "v1", "--to", "v2", "--quiet", "30s")
    assert (code, err) == (0, "")
    # Old sessions come back at once, before the tracker has looked even once.
    for cookie in old:
        assert (await stack.get(headers={"cookie": cookie}))[:2] == (200, "v1")
    clock.advance(20.0)
    await ctl.tick()
    clock.advance(29.0)
    await ctl.tick()
    d = await load_drain(stack.store, "web")
    assert d is not None
    assert (d.status, d.old_requests, d.last_seen) == ("draining", 5, started + 20.0)
    clock.advance(1.0)
    await ctl.tick()
    d = await load_drain(stack.store, "web")
    assert d is not None and (d.status, d.old_requests) == ("drained", 5)
    # Released: sessions holding tv=v1 now follow the split to v2, and are told so in a new cookie.
    await asyncio.sleep(0.2)  # the watcher installs the release revision
    assert await stack.split() == {"v2": 100.0}
    for cookie in old:
        assert await stack.get(headers={"cookie": cookie}) == (200, "v2", "v2")
    code, out, _ = await stack.cli("drain", "web", "--status")
    assert (code, out) == (0, "web: drained v1 -> v2  v1 drained: no session traffic for 30.0s (5 request(s) "
                              "served to old sessions since the drain began); released: its sessions now follow "
                              "the split\n")
