"""A split version without a healthy endpoint: its requests go to the split's healthy versions, and what the
proxy answers itself (503/502/504) is counted under the route and the version the request was meant for."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from proxy.control.canary.analysis import counters_of
from proxy.model import IdentitySource
from proxy.settings import Settings
from proxy.table import RouteTable
from proxy.telemetry.metrics import aggregate, render
from tests.dataplane.helpers import Client, Proxy, simple_route, start_proxy, table, version

ID = (IdentitySource(kind="header", name="x-client"),)
FAIL = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"


async def proxy_for(t: RouteTable, **settings: object) -> Proxy:
    return await start_proxy(t, Settings(listen=("127.0.0.1", 0), **settings))  # type: ignore[arg-type]


def exposition(p: Proxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of the /metrics body (the same render the admin API serves)."""
    body = render(aggregate(p.stats, None), p.holder.table, p.dp.health_view()).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def requests_series(route: str, version: str, code: int) -> tuple[str, frozenset[tuple[str, str]]]:
    return ("turnout_requests_total", frozenset({("route", route), ("version", version), ("code", str(code))}))


async def test_ejected_version_without_fallback_is_served_by_the_healthy_one(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def failing(req, reader, writer):  # type: ignore[no-untyped-def]
        return FAIL

    a = await upstreams(name="a")
    b = await upstreams(failing, name="b")
    p = await proxy_for(table([version("v1", a), version("v2", b)],
                              [simple_route(("v1", 1.0), ("v2", 1.0), sticky=False)]), passive_eject_after=3)
    p.dp.health.eject_base = 60.0  # stays ejected for the whole test
    try:
        c = await Client.open(p.port)
        # The cycle alternates v1, v2: v2's third 500 ejects its only endpoint.
        first = [(await c.get()).status for _ in range(6)]
        assert first == [200, 500, 200, 500, 200, 500]
        assert p.dp.backends["v2"].endpoints[0].ejected
        rest = [(await c.get()) for _ in range(100)]
        c.close()
        assert [r.status for r in rest] == [200] * 100
        assert {r.body for r in rest} == {b"a GET /"}
        assert (len(a.traffic), len(b.traffic)) == (103, 3)
        assert p.stats.requests == {("web", "v1", 200): 103, ("web", "v2", 500): 3}
        assert p.stats.fallbacks == {("web", "v2", "v1"): 50}
        assert p.stats.rejected == {}
    finally:
        await p.dp.shutdown(0.5)


async def test_requests_of_an_unhealthy_version_are_weighted_among_the_healthy(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b, c3 = await upstreams(name="a"), await upstreams(name="b"), await upstreams(name="c")
    p = await proxy_for(table([version("v1", a), version("v2", b), version("v3", c3)],
                              [simple_route(("v1", 5.0), ("v2", 3.0), ("v3", 2.0), sticky=False)]))
    try:
        p.dp.backends["v3"].endpoints[0].ejected = True
        c = await Client.open(p.port)
        # 12 cycles of 10: 60 v1, 36 v2 and 24 meant for v3, which go 5:3 to v1 and v2 (3 cycles of 8).
        bodies = [(await c.get()).body for _ in range(120)]
        c.close()
        assert (bodies.count(b"a GET /"), bodies.count(b"b GET /"), len(c3.traffic)) == (75, 45, 0)
        assert p.stats.fallbacks == {("web", "v3", "v1"): 15, ("web", "v3", "v2"): 9}
    finally:
        await p.dp.shutdown(0.5)


async def test_sticky_clients_of_an_unhealthy_version_move_only_while_it_is_unhealthy(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    t = table([version("v1", a), version("v2", b)],
              [simple_route(("v1", 1.0), ("v2", 1.0), identity=ID, assignment_cookie="tv")])
    p = await proxy_for(t)
    route = t.routes[0]
    on_v2 = [f"client-{i}" for i in range(200) if route.pick(f"client-{i}")[1][0] == "v2"][:10]
    try:
        ep = p.dp.backends["v2"].endpoints[0]
        ep.ejected = True
        c = await Client.open(p.port)
        during = [await c.get(extra=f"X-Client: {cid}\r\n") for cid in on_v2]
        assert {r.body for r in during} == {b"a GET /"}
        # The assignment is not rewritten to the version that stood in.
        assert [r.header("set-cookie") for r in during] == [None] * 10
        ep.ejected = False
        after = [await c.get(extra=f"X-Client: {cid}\r\n") for cid in on_v2]
        c.close()
        assert {r.body for r in after} == {b"b GET /"}
        assert p.stats.fallbacks == {("web", "v2", "v1"): 10}
    finally:
        await p.dp.shutdown(0.5)


async def test_a_pin_keeps_its_fallback_chain_and_is_not_spread(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, d = await upstreams(name="a"), await upstreams(name="d")
    p = await proxy_for(table([version("v1", a), version("dedicated", d)],
                              [simple_route(("v1", 1.0), identity=ID, pins={"acme": "dedicated"})]))
    try:
        p.dp.backends["dedicated"].endpoints[0].ejected = True
        c = await Client.open(p.port)
        r = await c.get(extra="X-Client: acme\r\n")
        c.close()
        assert (r.status, len(a.traffic), len(d.traffic)) == (503, 0, 0)
        assert p.stats.requests == {("web", "dedicated", 503): 1}
    finally:
        await p.dp.shutdown(0.5)


async def test_no_healthy_version_503_is_counted_under_route_and_intended_version(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    p = await proxy_for(table([version("v1", a), version("v2", b)],
                              [simple_route(("v1", 1.0), ("v2", 1.0), sticky=False)]))
    try:
        p.dp.backends["v1"].endpoints[0].ejected = True
        p.dp.backends["v2"].endpoints[0].ejected = True
        c = await Client.open(p.port)
        statuses = [(await c.get()).status for _ in range(4)]
        c.close()
        assert statuses == [503] * 4
        m = exposition(p)
        assert (m[requests_series("web", "v1", 503)], m[requests_series("web", "v2", 503)]) == (2.0, 2.0)
        assert m[("turnout_requests_rejected_total", frozenset({("reason", "no_healthy_version")}))] == 4.0
        count = ("turnout_request_duration_seconds_count", frozenset({("route", "web"), ("version", "v1")}))
        assert m[count] == 2.0
        # Canary analysis reads the same cells: both of v2's requests were errors.
        seen = counters_of(aggregate(p.stats, None), "web", ["v2"])
        assert (seen.requests, seen.errors) == (2, 2)
    finally:
        await p.dp.shutdown(0.5)


async def test_a_failed_connect_moves_to_a_healthy_split_version(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    # Nothing listens on port 1; the endpoint is taken for healthy, as before its first failed check.
    p = await proxy_for(table([version("v1", a), version("v2", "http://127.0.0.1:1")],
                              [simple_route(("v1", 1.0), ("v2", 1.0), sticky=False)]), passive_eject_after=100)
    try:
        ep = p.dp.backends["v2"].endpoints[0]
        for _ in range(100):  # the first active check runs at once and fails
            if not ep.active_ok:
                break
            await asyncio.sleep(0.02)
        ep.active_ok = True
        c = await Client.open(p.port)
        bodies = [(await c.get()).body for _ in range(4)]
        c.close()
        assert bodies == [b"a GET /"] * 4
        assert p.stats.requests == {("web", "v1", 200): 4}
        assert p.stats.upstream_errors == {("v2", "connect"): 2}
        assert p.stats.fallbacks == {("web", "v2", "v1"): 2}
    finally:
        await p.dp.shutdown(0.5)


async def test_access_log_names_the_stand_in_and_the_version_a_503_was_meant_for(upstreams, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    out = tmp_path / "access.log"
    p = await proxy_for(table([version("v1", a), version("v2", b)],
                              [simple_route(("v1", 1.0), ("v2", 1.0), sticky=False)]),
                        access_log=str(out), state_dir=str(tmp_path / "state"))
    try:
        p.dp.backends["v2"].endpoints[0].ejected = True
        c = await Client.open(p.port)
        served = [(await c.get()).status for _ in range(2)]
        p.dp.backends["v1"].endpoints[0].ejected = True
        refused = [(await c.get()).status for _ in range(2)]
        c.close()
    finally:
        await p.dp.shutdown(0.5)
    assert (served, refused) == ([200, 200], [503, 503])
    logged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["version"], e["status"], e["fallback"], e["upstream"]) for e in logged] == [
        ("v1", 200, False, a.url), ("v1", 200, True, a.url), ("v1", 503, False, ""), ("v2", 503, False, "")]
