"""The status page's numbers that must add up: the proxy's own answers per route and what mirror targets
answered, counted by the real data plane and read through the stats view (proxy.admin.cockpit)."""

from __future__ import annotations

import asyncio

from proxy.admin.observe import stats_view
from proxy.model import Match, Mirror, Version, VersionSpec
from proxy.settings import Limits, Settings
from proxy.telemetry.metrics import aggregate
from tests.dataplane.helpers import Client, Request, Upstream, simple_route, start_proxy, table, version


async def _fail(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    return b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops"


async def test_proxy_answers_per_route_add_up_to_what_clients_saw() -> None:
    up = await Upstream(name="v1").start()
    empty = Version(name="v0", spec=VersionSpec(kind="static", endpoints=()), endpoints=())
    t = table([version("v1", up), empty],
              [simple_route(("v1", 1.0), name="web", match=Match(host="app")),
               simple_route(("v0", 1.0), name="down", match=Match(host="down"))])
    p = await start_proxy(t, Settings(listen=("127.0.0.1", 0), limits=Limits(max_body_bytes=1000)))
    try:
        c = await Client.open(p.port)
        statuses = [(await c.get("/", host="app")).status for _ in range(3)]
        statuses += [(await c.get("/", host="nowhere")).status for _ in range(2)]
        statuses += [(await c.get("/", host="down")).status]
        c.close()
        # A chunked body over the limit is noticed after the request was routed and sent on: refused on `web`.
        c = await Client.open(p.port)
        chunk = b"200\r\n" + b"x" * 512 + b"\r\n"
        big = b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
        statuses.append((await c.request(big)).status)
        c.close()
        assert statuses == [200, 200, 200, 404, 404, 503, 413]
        assert p.stats.answers == {("", "no_route"): 2, ("down", "no_healthy_version"): 1, ("web", "too_large"): 1}

        view = stats_view(aggregate(p.stats, None), None, p.holder.table, {})
        web, down = view["routes"]
        assert web["answers"] == {"too_large": {"total": 1, "recent": None, "status": 413,
                                                "in_version_counts": False}}
        assert web["clients"] == {"versions": 3, "proxy": 1, "total": 4}
        # The 503 is one of v0's requests already (its error ratio shows it), so it is not added twice.
        assert down["answers"]["no_healthy_version"]["in_version_counts"] is True
        assert down["clients"] == {"versions": 1, "proxy": 0, "total": 1}
        assert view["unrouted"] == {"no_route": {"total": 2, "recent": None, "status": 404,
                                                 "in_version_counts": False}}
        seen = web["clients"]["total"] + down["clients"]["total"] + view["unrouted"]["no_route"]["total"]
        assert seen == len(statuses)
    finally:
        await p.dp.shutdown(0.5)
        await up.stop()


async def test_mirrored_answers_are_counted_per_version_and_code() -> None:
    main = await Upstream(name="v1").start()
    shadow = await Upstream(handler=_fail, name="v2").start()
    t = table([version("v1", main), version("v2", shadow)],
              [simple_route(("v1", 1.0), name="web", mirrors=(Mirror("v2", 100.0),))])
    p = await start_proxy(t)
    try:
        base = aggregate(p.stats, None)
        c = await Client.open(p.port)
        assert [(await c.get("/", host="app")).status for _ in range(4)] == [200] * 4
        c.close()
        for _ in range(100):
            if sum(p.stats.mirrors.values()) == 4:
                break
            await asyncio.sleep(0.02)
        now = aggregate(p.stats, None)
        object.__setattr__(now, "time", base.time + 2.0)  # a 2-second window for the rate
        view = stats_view(now, base, p.holder.table, {})
        (web,) = view["routes"]
        assert web["mirrored"] == [{"version": "v2", "codes": {"500": 4}, "total": 4, "recent": {"500": 4},
                                    "rps": 2.0, "error_ratio": 1.0}]
        rows = {v["name"]: v["requests"] for v in web["versions"]}
        assert rows == {"v1": 4, "v2": 0}  # the copies are not the version's own requests
    finally:
        await p.dp.shutdown(0.5)
        await main.stop()
        await shadow.stop()
