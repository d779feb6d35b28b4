"""Per-table request-path plan: captured headers, remembered picks, and tables that change under a request."""

from __future__ import annotations

from proxy.dataplane.plan import Plan
from proxy.model import IdentitySource, Match
from proxy.settings import Settings
from tests.dataplane.helpers import Client, simple_route, start_proxy, table, version

ID = (IdentitySource(kind="header", name="x-client"),)


async def test_captured_headers_route_and_identify(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    t = table([version("v1", a), version("v2", b)], [
        simple_route(("v2", 1.0), name="beta", match=Match(headers=(("x-beta", "1"),))),
        simple_route(("v1", 1.0), identity=ID, pins={"acme, corp": "v2", "acme": "v2"}),
    ])
    p = await start_proxy(t, Settings(listen=("127.0.0.1", 0)))
    try:
        c = await Client.open(p.port)
        assert (await c.get(extra="X-Beta: 1\r\n")).body == b"b GET /"
        assert (await c.get(extra="x-beta: 2\r\n")).body == b"a GET /"
        assert (await c.get(extra="X-Client: acme\r\n")).body == b"b GET /"
        # Repeated headers are joined the way a header dict would present them.
        assert (await c.get(extra="X-Client: acme\r\nX-Client: corp\r\n")).body == b"b GET /"
        # A header named in Connection is hop-by-hop: neither forwarded nor read for identity.
        assert (await c.get(extra="Connection: X-Client\r\nX-Client: acme\r\n")).body == b"a GET /"
        c.close()
        assert a.traffic[-1].header("x-client") is None
        assert p.dp.plan.exact and p.dp.plan.single is None
    finally:
        await p.dp.shutdown(0.5)


async def test_new_table_is_used_even_without_table_changed(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    t1 = table([version("v1", a), version("v2", b)], [simple_route(("v1", 1.0), identity=ID)], revision=1)
    p = await start_proxy(t1, Settings(listen=("127.0.0.1", 0)))
    try:
        c = await Client.open(p.port)
        assert (await c.get(extra="X-Client: acme\r\n")).body == b"a GET /"
        assert p.dp.plan.single is not None
        # Only the holder changes (as between a store commit and its listeners): the next request sees it.
        p.holder.offer(table([version("v1", a), version("v2", b)],
                             [simple_route(("v1", 1.0), identity=ID, pins={"acme": "v2"})], revision=2))
        assert (await c.get(extra="X-Client: acme\r\n")).body == b"b GET /"
        assert p.dp.plan.table is p.holder.table
        c.close()
    finally:
        await p.dp.shutdown(0.5)


def test_plan_remembers_only_stable_picks() -> None:
    t = table([version("v1", "http://127.0.0.1:1"), version("v2", "http://127.0.0.1:2")], [
        simple_route(("v1", 1.0), ("v2", 1.0), identity=ID, pins={"p": "v2"}),
        simple_route(("v1", 1.0), ("v2", 1.0), name="loose", identity=ID, sticky=False,
                     match=Match(path_prefix="/loose")),
    ])
    plan = Plan(t)
    sticky, loose = t.route("web"), t.route("loose")
    assert sticky is not None and loose is not None
    assert plan.pick(sticky, "p") == ("pin", ("v2",))
    first = plan.pick(sticky, "someone")
    assert first[0] == "sticky" and [plan.pick(sticky, "someone") for _ in range(5)] == [first] * 5
    assert set(plan.picks["web"]) == {"p", "someone"}
    # Non-sticky picks go round the weighted cycle and are never remembered.
    assert [plan.pick(loose, "x")[1][0] for _ in range(4)] == ["v1", "v2", "v1", "v2"]
    assert plan.picks["loose"] == {}
    assert plan.pick(sticky, None)[0] == "weighted"
