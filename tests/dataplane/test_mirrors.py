"""Several mirrors per route with one sample: one draw per request decides for every mirror, so mirrors of
equal percent see exactly the same requests (real upstreams, the real data plane, request ids in paths)."""

from __future__ import annotations

import asyncio

from proxy.dataplane.mirror import draw
from proxy.model import Mirror
from tests.dataplane.helpers import Client, simple_route, start_proxy, table, version

REQUESTS = 200


def test_the_draw_is_uniform_and_evenly_spread() -> None:
    assert [draw(n) for n in range(8)] == [0.0, 50.0, 25.0, 75.0, 12.5, 62.5, 37.5, 87.5]
    # Any percent gets its share of a run of n requests to within log2(n) requests.
    for pct in (1.0, 12.5, 30.0, 50.0, 99.0):
        taken = sum(1 for n in range(1024) if draw(n) < pct)
        assert abs(taken - 1024 * pct / 100) <= 10, (pct, taken)


async def test_equal_percents_see_the_same_requests_and_a_larger_one_sees_more(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    m1, m2, m3 = [await upstreams(name=n) for n in ("m1", "m2", "m3")]
    route = simple_route(("v1", 1.0), mirrors=(Mirror("vm1", 30.0), Mirror("vm2", 30.0), Mirror("vm3", 60.0)))
    p = await start_proxy(table([version("v1", a), version("vm1", m1), version("vm2", m2), version("vm3", m3)],
                                [route]))
    try:
        c = await Client.open(p.port)
        for i in range(REQUESTS):
            r = await c.get(f"/req/{i}")
            assert r.status == 200
            # At most a few copies in flight at a time, far below the Mirrorer's bound: nothing is dropped.
            if i % 8 == 7:
                await asyncio.sleep(0.01)
        c.close()
        # 30% and 60% of 200 requests, to within one request (the sequence's first 200 points).
        want = {"vm1": 61, "vm2": 61, "vm3": 121}
        for _ in range(250):
            if all(p.stats.mirrors.get(("web", v, "200")) == n for v, n in want.items()):
                break
            await asyncio.sleep(0.02)
        assert p.stats.mirrors == {("web", v, "200"): n for v, n in want.items()}
        seen = {name: {r.target for r in u.traffic} for name, u in (("m1", m1), ("m2", m2), ("m3", m3))}
        assert seen["m1"] == seen["m2"]
        assert seen["m1"] < seen["m3"]
        assert seen["m1"] == {f"/req/{i}" for i in range(REQUESTS) if draw(i) < 30.0}
        assert {r.header("x-turnout-version") for r in m2.traffic} == {"vm2"}
        assert len(a.traffic) == REQUESTS
    finally:
        await p.dp.shutdown(0.5)
