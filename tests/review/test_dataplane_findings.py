"""Data plane problems found in review. Each test asserts the CORRECT behaviour and is a strict xfail until
the fix lands (then remove the marker)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy.model import Match
from proxy.settings import Limits, Settings, Timeouts
from tests.dataplane.helpers import Client, ok, shrink_buffers, simple_route, start_proxy, table, version
from tests.review.helpers import read_all

# Long body timeout on purpose: a finding must not be "fixed" by the 408 that body_read_idle gives later.
SLOW_BODY = Timeouts(header_read=2.0, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=2.0,
                     upstream_idle=2.0, body_read_idle=60.0)
SMALL = Limits(max_header_bytes=4096, high_water=16 * 1024, low_water=4 * 1024)


@pytest.fixture
async def env(upstreams):  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=SLOW_BODY, limits=SMALL))
    yield p, a
    await p.dp.shutdown(0.5)


async def test_huge_request_trailer_is_refused_not_buffered(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        await c.send(b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Big: ")
        # 64x the header limit in one trailer field; the proxy must give up on the request long before the end.
        with contextlib.suppress(ConnectionError):
            c.writer.write(b"a" * (64 * SMALL.max_header_bytes))
            await asyncio.wait_for(c.writer.drain(), 2)
        data, closed = await read_all(c.reader, 1.5)
        assert data.startswith(b"HTTP/1.1 431 ")
        assert closed
        assert p.stats.rejected.get("too_large") == 1
        assert a.traffic == []  # the request never completed upstream
    finally:
        c.close()


async def test_pipelined_local_answers_to_a_client_that_never_reads_stay_bounded(env) -> None:  # type: ignore[no-untyped-def]
    p, _ = env
    c = await Client.open(p.port)
    try:
        conn = await shrink_buffers(p, c)
        req = b"GET / HTTP/1.1\r\nHost: no-such-route\r\n\r\n"  # 404, answered by the proxy itself
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(100):
                c.writer.write(req * 200)
                await asyncio.wait_for(c.writer.drain(), 0.5)
        await asyncio.sleep(0.2)
        # Bounded: the high-water mark plus the answers to at most max_pipelined parsed requests and a slice.
        bound = SMALL.high_water + 64 * 1024
        assert conn.closed or conn.transport.get_write_buffer_size() <= bound
    finally:
        c.close()


async def test_host_with_userinfo_or_garbage_is_refused(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.request(b"GET / HTTP/1.1\r\nHost: app:@evil.example\r\n\r\n")
        assert r.status == 400
        assert a.nothing_received
    finally:
        c.close()


async def test_connection_header_cannot_remove_host(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="Connection: host\r\n")
        assert r.status == 200
        assert a.traffic[0].header("host") == "app"
    finally:
        c.close()


async def test_underscore_spellings_of_trusted_headers_are_not_forwarded(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="X_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil\r\n"
                                   "X_Turnout_Version: evil\r\nX_Turnout_Route: evil\r\nX-Kept: yes\r\n")
        assert r.status == 200
        names = {n.lower() for n, _ in a.traffic[0].headers}
        assert names.isdisjoint({"x_forwarded_for", "x_forwarded_host", "x_turnout_version", "x_turnout_route"})
        assert a.traffic[0].header("x-kept") == "yes"
    finally:
        c.close()


async def test_upgrade_other_than_websocket_is_not_forwarded(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.header("upgrade") == "h2c":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            await writer.drain()
            data = await reader.read(1000)
            writer.write(b"TUNNEL:" + data)
            await writer.drain()
            return None
        return ok()

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
        assert r.status == 200
        assert a.traffic[0].header("upgrade") is None
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_body_sent_late_after_head_response_never_reaches_another_client(upstreams) -> None:  # type: ignore[no-untyped-def]
    evil = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"

    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            # A broken upstream: announces a body for HEAD and sends one later (a response-shaped one).
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(evil))
            await writer.drain()
            await asyncio.sleep(0.4)
            return evil
        return ok(b"good")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c1 = await Client.open(p.port)
    c2 = await Client.open(p.port)
    try:
        r = await c1.request(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n", head=True)
        assert r.status == 200
        r2 = await c2.get()
        assert (r2.status, r2.body) == (200, b"good")
    finally:
        c1.close()
        c2.close()
        await p.dp.shutdown(0.5)


async def test_version_name_can_never_put_a_bare_lf_into_the_upstream_request(upstreams) -> None:  # type: ignore[no-untyped-def]
    from proxy.errors import ValidationError
    from proxy.model import State
    from proxy.parse import parse_route_body, parse_version_body
    from proxy.table import RouteTable

    a = await upstreams(name="a")
    try:
        v = parse_version_body({"endpoints": [a.url]}, "v1\n", 0.0)
        route = parse_route_body({"split": {"v1\n": 1}}, "web", State(versions={v.name: v}))
    except ValidationError:
        return  # fixed where it should be: such a name is never stored
    p = await start_proxy(RouteTable(State(versions={v.name: v}, routes=(route,)), 1))
    c = await Client.open(p.port)
    try:
        r = await c.get()
        assert r.status == 200
        # The version's health check (path "/") also lands here; the proxied request is the one for Host app.
        (req,) = [x for x in a.traffic if x.header("host") == "app"]
        assert b"\n" not in req.head.replace(b"\r\n", b"")
    finally:
        c.close()
        await p.dp.shutdown(0.5)


@pytest.fixture
async def pinned(upstreams):  # type: ignore[no-untyped-def]
    """Route `web`: everyone on v1, client `acme` pinned to its dedicated version `acme-only`, cookie `tv`."""
    from proxy.model import IdentitySource, Route

    shared = await upstreams(name="shared")
    dedicated = await upstreams(name="dedicated")
    route = Route(name="web", identity=(IdentitySource("header", "x-client-id"),), split=(("v1", 100.0),),
                  pins={"acme": "acme-only"}, assignment_cookie="tv")
    p = await start_proxy(table([version("v1", shared), version("acme-only", dedicated)], [route]))
    yield p, shared, dedicated
    await p.dp.shutdown(0.5)


async def test_assignment_cookie_cannot_select_another_clients_dedicated_version(pinned) -> None:  # type: ignore[no-untyped-def]
    p, _, dedicated = pinned
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="X-Client-Id: mallory\r\nCookie: tv=acme-only\r\n")
        assert (r.status, r.body) == (200, b"shared GET /")
        assert [x.header("host") for x in dedicated.traffic if x.header("host") == "app"] == []
    finally:
        c.close()


async def test_pin_wins_over_an_older_assignment_cookie(pinned) -> None:  # type: ignore[no-untyped-def]
    p, _, _ = pinned
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="X-Client-Id: acme\r\nCookie: tv=v1\r\n")
        assert (r.status, r.body) == (200, b"dedicated GET /")
    finally:
        c.close()



@pytest.mark.parametrize("target", ["/x/../admin/users", "/./admin/users", "//admin/users", "/%61dmin/users"])
async def test_path_equivalent_to_a_specific_route_never_reaches_the_catch_all_version(upstreams,  # type: ignore[no-untyped-def]
                                                                                       target: str) -> None:
    hardened = await upstreams(name="hardened")
    public = await upstreams(name="public")
    routes = [simple_route(("admin-v", 1.0), name="admin", match=Match(path_prefix="/admin")),
              simple_route(("web-v", 1.0), name="web")]
    p = await start_proxy(table([version("admin-v", hardened), version("web-v", public)], routes))
    c = await Client.open(p.port)
    try:
        r = await c.get(target)
        # Either refused, or normalised and routed like /admin/users.
        assert r.status == 400 or r.body.startswith(b"hardened ")
        assert [x for x in public.traffic if x.header("host") == "app"] == []
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_oversized_response_head_from_upstream_is_502(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        # 16x the request-side header limit, in many small writes as a slow or hostile upstream would.
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(256):
            writer.write(b"a" * 4096)
            await writer.drain()
        return b"\r\nContent-Length: 2\r\n\r\nok"

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        r = await c.get()
        assert r.status == 502
        assert p.stats.upstream_errors == {("v1", "invalid_response"): 1}
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_oversized_response_head_in_a_single_read_is_502(upstreams) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_header_bytes=4096, max_request_line=1024)

    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok"

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=limits))
    c = await Client.open(p.port)
    try:
        r = await c.get()
        assert r.status == 502
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_bodyless_post_that_reached_the_upstream_is_not_replayed_elsewhere(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def reset(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.transport.abort()  # e.g. crashed after acting on the request, before answering

    a = await upstreams(reset, name="a")
    b = await upstreams(name="b")
    p = await start_proxy(table([version("v1", a), version("v2", b)], [simple_route(("v1", 1.0), fallback=("v2",))]))
    c = await Client.open(p.port)
    try:
        r = await c.request(b"POST /charge?amount=10 HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n")
        assert [x.target for x in a.traffic] == ["/charge?amount=10"]
        assert r.status == 502
        assert [x for x in b.traffic if x.header("host") == "app"] == []
    finally:
        c.close()
        await p.dp.shutdown(0.5)
