"""Zones end to end through the data plane: real upstream servers in three zones, proxy replicas in two of
them, exact counts per endpoint (the rule is proxy.zones; tests/test_zones.py states its arithmetic)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from proxy.model import HealthCheck, Route, Version, VersionSpec
from proxy.settings import Settings
from proxy.table import RouteTable
from tests.dataplane.helpers import Client, Proxy, Upstream, simple_route, start_proxy, table

ZONES = ("a", "b", "c")


def zoned(name: str, ups: dict[str, list[Upstream]], interval: float = 60.0) -> Version:
    pairs = tuple((u.url, z) for z in ZONES for u in ups[z])
    spec = VersionSpec(kind="static", endpoints=tuple(u for u, _ in pairs), endpoint_zones=pairs,
                       health=HealthCheck(path="/healthz", interval=interval, timeout=0.5))
    return Version(name=name, spec=spec, endpoints=spec.endpoints, zones=pairs)


async def three_zones(upstreams, name: str = "x") -> dict[str, list[Upstream]]:  # type: ignore[no-untyped-def]
    return {z: [await upstreams(name=f"{name}-{z}{i}") for i in range(3)] for z in ZONES}


async def proxy(t: RouteTable, zone: str | None) -> Proxy:
    return await start_proxy(t, Settings(listen=("127.0.0.1", 0), zone=zone))


async def get_many(p: Proxy, n: int) -> Counter[bytes]:
    c = await Client.open(p.port)
    got: Counter[bytes] = Counter()
    for _ in range(n):
        r = await c.get()
        assert r.status == 200
        got[r.body.split(b" ")[0]] += 1
    c.close()
    return got


def served(ups: dict[str, list[Upstream]], before: dict[str, int] | None = None) -> dict[str, int]:
    now = {u.name: len(u.traffic) for us in ups.values() for u in us}
    return {k: n - (before or {}).get(k, 0) for k, n in now.items()}


async def until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_each_replica_keeps_its_traffic_in_its_zone(upstreams) -> None:  # type: ignore[no-untyped-def]
    ups = await three_zones(upstreams)
    t = table([zoned("v1", ups)], [simple_route(("v1", 1.0), sticky=False)])
    pa, pb = await proxy(t, "a"), await proxy(t, "b")
    try:
        await get_many(pa, 90)
        assert served(ups) == {"x-a0": 30, "x-a1": 30, "x-a2": 30, **{f"x-{z}{i}": 0 for z in "bc" for i in range(3)}}
        before = served(ups)
        await get_many(pb, 90)
        assert served(ups, before) == {**{f"x-{z}{i}": 0 for z in "ac" for i in range(3)},
                                       "x-b0": 30, "x-b1": 30, "x-b2": 30}
        assert pa.stats.zone_requests == {"v1": {"a": 90}}
        assert pb.stats.zone_requests == {"v1": {"b": 90}}
    finally:
        await pa.dp.shutdown(0.5)
        await pb.dp.shutdown(0.5)


async def test_without_a_proxy_zone_the_pick_is_plain_round_robin(upstreams) -> None:  # type: ignore[no-untyped-def]
    ups = await three_zones(upstreams)
    t = table([zoned("v1", ups)], [simple_route(("v1", 1.0), sticky=False)])
    p = await proxy(t, None)
    try:
        assert not p.dp.backends["v1"].zoned
        await get_many(p, 90)
        assert served(ups) == {f"x-{z}{i}": 10 for z in ZONES for i in range(3)}
    finally:
        await p.dp.shutdown(0.5)


async def test_zone_affinity_false_is_round_robin_over_every_zone(upstreams) -> None:  # type: ignore[no-untyped-def]
    ups = await three_zones(upstreams)
    t = table([zoned("v1", ups)], [simple_route(("v1", 1.0), sticky=False, zone_affinity=False)])
    p = await proxy(t, "a")
    try:
        await get_many(p, 90)
        assert served(ups) == {f"x-{z}{i}": 10 for z in ZONES for i in range(3)}
    finally:
        await p.dp.shutdown(0.5)


async def test_two_of_three_down_in_a_zone_spills_exactly_the_excess(upstreams) -> None:  # type: ignore[no-untyped-def]
    ups = await three_zones(upstreams)
    t = table([zoned("v1", ups, interval=0.05)], [simple_route(("v1", 1.0), sticky=False)])
    pa, pb = await proxy(t, "a"), await proxy(t, "b")
    try:
        for u in ups["a"][1:]:
            await u.stop()
        for p in (pa, pb):
            await until(lambda p=p: [e.healthy for e in p.dp.backends["v1"].endpoints[:3]] == [True, False, False])
        before = served(ups)
        await get_many(pa, 126)
        # Zone a keeps 3/7 (its one endpoint carries its fair load); b and c get 2/7 each, split over 3.
        assert served(ups, before) == {"x-a0": 54, "x-a1": 0, "x-a2": 0,
                                       **{f"x-{z}{i}": 12 for z in "bc" for i in range(3)}}
        assert pa.stats.zone_requests == {"v1": {"a": 54, "b": 36, "c": 36}}
        assert pa.dp.backends["v1"].zone_shares() == {"a": 3 / 7, "b": 2 / 7, "c": 2 / 7}
        before = served(ups)
        await get_many(pb, 90)  # zone b is whole: it stays local
        assert served(ups, before) == {**{f"x-{z}{i}": 0 for z in "ac" for i in range(3)},
                                       "x-b0": 30, "x-b1": 30, "x-b2": 30}
    finally:
        await pa.dp.shutdown(0.5)
        await pb.dp.shutdown(0.5)


async def test_losing_a_whole_zone_under_load_fails_no_request(upstreams) -> None:  # type: ignore[no-untyped-def]
    ups = await three_zones(upstreams)
    t = table([zoned("v1", ups, interval=0.2)], [simple_route(("v1", 1.0), sticky=False)])
    p = await proxy(t, "a")
    statuses: Counter[int] = Counter()
    sent = 0

    async def load() -> None:
        nonlocal sent
        c = await Client.open(p.port)
        for _ in range(150):
            r = await c.get()
            statuses[r.status] += 1
            sent += 1
        c.close()

    try:
        clients = [asyncio.ensure_future(load()) for _ in range(4)]
        await until(lambda: sent >= 100)
        for u in ups["a"]:
            await u.stop()  # the whole zone, mid-load
        await asyncio.gather(*clients)
        assert statuses == {200: 600}
        after = served(ups)
        assert sum(after[f"x-{z}{i}"] for z in "bc" for i in range(3)) > 0
        assert p.stats.rejected == {}
        assert p.stats.retries["web"] > 0  # some requests met a dead endpoint and moved to another
    finally:
        await p.dp.shutdown(0.5)


def with_split(t: RouteTable, split: tuple[tuple[str, float], ...], revision: int) -> RouteTable:
    route: Route = dataclasses.replace(t.state.routes[0], split=split)
    return RouteTable(dataclasses.replace(t.state, routes=(route,)), revision)


async def test_a_weight_change_and_a_rollback_mean_the_same_with_zones(upstreams) -> None:  # type: ignore[no-untyped-def]
    one, two = await three_zones(upstreams, "one"), await three_zones(upstreams, "two")
    t1 = table([zoned("v1", one), zoned("v2", two)], [simple_route(("v1", 1.0), ("v2", 0.0), sticky=False)])
    t2 = with_split(t1, (("v1", 3.0), ("v2", 1.0)), 2)
    t3 = with_split(t1, (("v1", 1.0), ("v2", 0.0)), 3)  # the rollback
    zoned_proxy, plain_proxy = await proxy(t1, "b"), await proxy(t1, None)
    try:
        counts = {}
        for name, p in (("zoned", zoned_proxy), ("plain", plain_proxy)):
            got = []
            for t in (t1, t2, t3):
                p.set_table(t)
                got.append(await get_many(p, 72))
            counts[name] = [{k: n for k, n in sorted(g.items())} for g in got]

        def versions(g: dict[bytes, int]) -> dict[str, int]:
            out: Counter[str] = Counter()
            for k, n in g.items():
                out[k.decode().split("-")[0]] += n
            return dict(out)

        # The version each request went to is the same with and without zones: 72, then 54:18, then 72.
        assert [versions(g) for g in counts["zoned"]] == [versions(g) for g in counts["plain"]] == [
            {"one": 72}, {"one": 54, "two": 18}, {"one": 72}]
        # ... and with zones every request stayed in zone b.
        assert all(k.decode().split("-")[1].startswith("b") for g in counts["zoned"] for k in g)
        assert counts["zoned"][1] == {b"one-b0": 18, b"one-b1": 18, b"one-b2": 18,
                                      b"two-b0": 6, b"two-b1": 6, b"two-b2": 6}
    finally:
        await zoned_proxy.dp.shutdown(0.5)
        await plain_proxy.dp.shutdown(0.5)
