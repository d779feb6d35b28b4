"""What the data plane reports beyond the response: the access log, mirror counters, per-route errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxy.model import IdentitySource, Mirror
from proxy.settings import Settings
from tests.dataplane.helpers import Client, simple_route, start_proxy, table, version

ID = (IdentitySource(kind="header", name="x-client"),)


async def test_access_log_writes_one_line_per_request(upstreams, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    log_path = tmp_path / "access.log"
    settings = Settings(listen=("127.0.0.1", 0), access_log=str(log_path), access_log_client_ids=True,
                        state_dir=str(tmp_path))
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), identity=ID)]), settings)
    try:
        c = await Client.open(p.port)
        r = await c.request(b"POST /x?q=1 HTTP/1.1\r\nHost: app\r\nX-Client: alice\r\nContent-Length: 3\r\n\r\nabc")
        c.close()
        assert r.status == 200 and r.body == b"a POST /x?q=1"
    finally:
        await p.dp.shutdown(0.5)  # flushes and closes the log
    lines = log_path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry.pop("time").endswith("Z")
    assert entry.pop("duration") >= 0
    assert entry == {
        "route": "web", "version": "v1", "method": "POST", "path": "/x?q=1", "status": 200, "bytes_in": 3,
        "bytes_out": len(b"a POST /x?q=1"), "upstream": a.url, "retried": False, "fallback": False,
        "client": "alice",
    }
    assert p.dp.access_log is None


async def test_access_log_records_fallback_and_hashes_clients(upstreams, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def hang_up(req, reader, writer):  # type: ignore[no-untyped-def]
        return None  # closes the connection without an answer (health checks still pass)

    a, b = await upstreams(hang_up, name="a"), await upstreams(name="b")
    log_path = tmp_path / "access.log"
    settings = Settings(listen=("127.0.0.1", 0), access_log=str(log_path), state_dir=str(tmp_path))
    t = table([version("v1", a), version("v2", b)],
              [simple_route(("v1", 1.0), identity=ID, fallback=("v2",))])
    p = await start_proxy(t, settings)
    try:
        c = await Client.open(p.port)
        r = await c.get("/y?secret=1", extra="X-Client: bob\r\n")
        c.close()
        assert r.status == 200 and r.body == b"b GET /y?secret=1"
    finally:
        await p.dp.shutdown(0.5)
    entry = json.loads(log_path.read_text())
    assert (entry["route"], entry["version"], entry["path"], entry["upstream"]) == ("web", "v2", "/y", b.url)
    assert (entry["retried"], entry["fallback"]) == (True, True)
    assert entry["client"] != "bob" and len(entry["client"]) == 12
    # The reset is counted per route too (the canary's error ratio reads it).
    assert p.stats.cells["web"]["v1"].upstream_errors == 1
    assert p.stats.upstream_errors == {("v1", "reset"): 1}


async def test_access_log_off_by_default(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        assert p.dp.access_log is None
        c = await Client.open(p.port)
        assert (await c.get()).status == 200
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_mirror_outcomes_reach_stats(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, m = await upstreams(name="a"), await upstreams(name="m")
    p = await start_proxy(table([version("v1", a), version("vm", m)],
                                [simple_route(("v1", 1.0), mirrors=(Mirror("vm", 100.0),))]))
    try:
        c = await Client.open(p.port)
        for _ in range(2):
            assert (await c.get()).status == 200
        c.close()
        for _ in range(100):
            if p.stats.mirrors.get(("web", "vm", "200")) == 2:
                break
            await asyncio.sleep(0.02)
        assert p.stats.mirrors == {("web", "vm", "200"): 2}
        assert p.stats.snapshot()["mirrors"] == [["web", "vm", "200", 2]]
    finally:
        await p.dp.shutdown(0.5)
