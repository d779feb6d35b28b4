"""The per-endpoint cap on upstream connections (limits.max_upstream_connections): a burst of HTTP/2 streams
through turnout to one HTTP/1.1 upstream waits, first come first served, for the connections there are
instead of opening one per stream, every request succeeds, and a wait past upstream_connect is a 504 that
does not eject the endpoint."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.settings import Limits, Listener, Settings, Timeouts
from tests.dataplane.helpers import Client, Proxy, Request, Upstream, ok, simple_route, start_proxy, table, version


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., asyncio.Future[Proxy]]]:
    started: list[Proxy] = []

    async def make(up: Upstream, **settings: Any) -> Proxy:
        lis = Listener("plain", ("127.0.0.1", 0), protocols=("http/1.1", "h2c"))
        p = await start_proxy(table([version("v1", up)], [simple_route(("v1", 1.0))]),
                              Settings(listen=lis.address, listeners=(lis,), **settings))
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        await p.dp.shutdown(0.5)


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling state of the object under test
            await asyncio.sleep(0.01)


def conns(up: Upstream) -> int:
    """Upstream connections that carried requests (health checks have their own)."""
    return len({r.conn for r in up.traffic})


async def h2load(port: int, n: int, c: int, m: int) -> str:
    proc = await asyncio.create_subprocess_exec("h2load", "-n", str(n), "-c", str(c), "-m", str(m),
                                                f"http://127.0.0.1:{port}/", stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    return (await asyncio.wait_for(proc.communicate(), 60))[0].decode()


async def test_a_thousand_concurrent_h2_streams_share_the_capped_upstream_connections_and_all_succeed(
        upstreams: Any, proxies: Any) -> None:
    # 10 connections x 100 streams: before the cap each stream opened its own upstream connection and the
    # connect storm ended in connect timeouts, ejection and 503s.
    a: Upstream = await upstreams(name="a")
    p = await proxies(a)
    out = await h2load(p.port, 3000, 10, 100)
    assert re.search(r"requests: 3000 total, 3000 started, 3000 done, 3000 succeeded, 0 failed", out), out
    assert (len(a.traffic), conns(a)) == (3000, 256)
    assert (p.stats.upstream_errors, p.stats.rejected) == ({}, {})


async def test_one_allowed_connection_serves_every_stream_in_turn(upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(a, limits=Limits(max_upstream_connections=1))
    out = await h2load(p.port, 400, 2, 20)
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed", out), out
    assert (len(a.traffic), conns(a)) == (400, 1)
    (ep,) = p.dp.endpoints.values()
    assert (ep.conns, len(ep.waiting), len(ep.idle)) == (1, 0, 1)


async def test_a_wait_past_upstream_connect_is_a_504_and_does_not_eject_the_endpoint(
        upstreams: Any, proxies: Any) -> None:
    release = asyncio.Event()

    async def held(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if req.target == "/hold":
            await release.wait()
        return ok(req.target.encode())

    a: Upstream = await upstreams(handler=held, name="a")
    p = await proxies(a, limits=Limits(max_upstream_connections=2), passive_eject_after=1,
                      timeouts=Timeouts(upstream_connect=0.3))
    holders = [await Client.open(p.port) for _ in range(2)]
    for c in holders:
        await c.send(b"GET /hold HTTP/1.1\r\nHost: app\r\n\r\n")
    await until(lambda: len(a.traffic) == 2)
    late = await Client.open(p.port)
    r = await late.get("/late")
    assert r.status == 504
    (ep,) = p.dp.endpoints.values()
    assert (ep.ejected, ep.failures, len(ep.waiting)) == (False, 0, 0)
    assert p.stats.upstream_errors == {("v1", "timeout"): 1}
    # A waiter still in the queue gets the first connection that comes free.
    waiting = asyncio.ensure_future(late.get("/next"))
    await until(lambda: len(ep.waiting) == 1)
    release.set()
    r = await asyncio.wait_for(waiting, 5)
    assert (r.status, r.body) == (200, b"/next")
    assert [(await c.request(b"")).status for c in holders] == [200, 200]
    assert conns(a) == 2
    for c in (*holders, late):
        c.close()
