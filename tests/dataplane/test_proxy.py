"""Functional behaviour of the data plane through real sockets and real local upstreams."""

from __future__ import annotations

import asyncio

import pytest

from proxy.model import IdentitySource, Mirror
from proxy.settings import Settings, Timeouts
from proxy.table import RouteTable
from tests.dataplane.helpers import (
    Client,
    Upstream,
    ok,
    read_chunked,
    read_response,
    simple_route,
    start_proxy,
    table,
    version,
)

ID = (IdentitySource(kind="header", name="x-client"),)


async def proxy_for(t: RouteTable, **settings: object):  # type: ignore[no-untyped-def]
    return await start_proxy(t, Settings(listen=("127.0.0.1", 0), **settings))  # type: ignore[arg-type]


async def test_split_proportions_are_exact(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    p = await proxy_for(table([version("v1", a), version("v2", b)], [simple_route(("v1", 3.0), ("v2", 1.0))]))
    try:
        c = await Client.open(p.port)
        bodies = [(await c.get()).body for _ in range(8)]
        c.close()
        assert sorted(bodies).count(b"a GET /") == 6
        assert bodies.count(b"b GET /") == 2
        assert p.stats.requests == {("web", "v1", 200): 6, ("web", "v2", 200): 2}
    finally:
        await p.dp.shutdown(0.5)


async def test_pins_and_sticky(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    t = table([version("v1", a), version("v2", b)],
              [simple_route(("v1", 1.0), ("v2", 1.0), identity=ID, pins={"acme": "v2"})])
    p = await proxy_for(t)
    try:
        c = await Client.open(p.port)
        pinned = {(await c.get(extra="X-Client: acme\r\n")).body for _ in range(4)}
        assert pinned == {b"b GET /"}
        route = t.routes[0]
        for client in ("alice", "bob", "carol", "dave"):
            want = route.pick(client)[1][0]
            got = {(await c.get(extra=f"X-Client: {client}\r\n")).body for _ in range(3)}
            assert got == {(b"a" if want == "v1" else b"b") + b" GET /"}
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_fallback_when_version_has_no_healthy_endpoint(upstreams) -> None:  # type: ignore[no-untyped-def]
    b = await upstreams(name="b")
    p = await proxy_for(table([version("v1", "http://127.0.0.1:1"), version("v2", b)],
                              [simple_route(("v1", 1.0), fallback=("v2",))]))
    try:
        for _ in range(100):  # the first active check runs at once and fails
            if not p.dp.health_view()["v1"]["http://127.0.0.1:1"]:
                break
            await asyncio.sleep(0.02)
        assert p.dp.health_view() == {"v1": {"http://127.0.0.1:1": False}, "v2": {b.url: True}}
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.body == b"b GET /"
        assert p.stats.fallbacks == {("web", "v1", "v2"): 1}
        assert p.stats.upstream_errors == {}
    finally:
        await p.dp.shutdown(0.5)


async def test_no_healthy_version_is_503(upstreams) -> None:  # type: ignore[no-untyped-def]
    p = await proxy_for(table([version("v1", "http://127.0.0.1:1")], [simple_route(("v1", 1.0))]))
    try:
        p.dp.backends["v1"].endpoints[0].active_ok = False
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.status == 503
        assert p.stats.rejected == {"no_healthy_version": 1}
    finally:
        await p.dp.shutdown(0.5)


async def test_upstream_keepalive_connections_are_reused(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        for _ in range(3):
            c = await Client.open(p.port)
            for _ in range(3):
                assert (await c.get()).status == 200
            c.close()
        assert len(a.traffic) == 9
        assert {r.conn for r in a.traffic} == {a.traffic[0].conn}
        assert "1 idle" in repr(p.dp.backends["v1"].endpoints[0])
    finally:
        await p.dp.shutdown(0.5)


async def test_upstream_connection_close_is_not_reused(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(ok(extra=b"connection: close\r\n"))
        await writer.drain()

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r1, r2 = await c.get(), await c.get()
        c.close()
        assert (r1.status, r2.status) == (200, 200)
        assert r1.header("connection") is None  # the upstream's close is per hop
        assert len({r.conn for r in a.traffic}) == 2
    finally:
        await p.dp.shutdown(0.5)


async def test_head_204_304(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.target == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if req.target == "/304":
            return b"HTTP/1.1 304 Not Modified\r\netag: x\r\ncontent-length: 50\r\n\r\n"
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        return ok(b"after")

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n", head=True)
        assert (r.status, r.header("content-length"), r.body) == (200, "1234", b"")
        r = await c.get("/204")
        assert (r.status, r.header("content-length"), r.header("transfer-encoding")) == (204, None, None)
        r = await c.get("/304")
        assert (r.status, r.header("content-length"), r.header("etag")) == (304, "50", "x")
        r = await c.get("/after")
        assert (r.status, r.body) == (200, b"after")
        c.close()
        conns = [r.conn for r in a.traffic]
        # A HEAD answer that announced a body is not pooled (the body might still come); the next
        # connection survived 204 and 304.
        assert conns[0] != conns[1] and len(set(conns[1:])) == 1
    finally:
        await p.dp.shutdown(0.5)


async def test_chunked_request_and_response_bodies(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
                b"4;ext=1\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n")

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
        assert (r.status, r.body, r.header("transfer-encoding")) == (200, b"abcdefg", "chunked")
        # HTTP/1.0 clients get the same body delimited by close.
        c2 = await Client.open(p.port)
        await c2.send(b"GET / HTTP/1.0\r\n\r\n")
        r2 = await asyncio.wait_for(read_response(c2.reader), 5)
        assert (r2.body, r2.header("connection"), r2.header("transfer-encoding")) == (b"abcdefg", "close", None)
        c.close()
        c2.close()
        req = a.traffic[0]
        assert req.body == b"hello world"
        # Re-framed by the proxy: extensions and trailers dropped, no raw client framing forwarded.
        assert req.raw.endswith(b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert req.header("x-t") is None
    finally:
        await p.dp.shutdown(0.5)


async def test_http10_keepalive(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r1 = await c.request(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r2 = await c.request(b"GET /2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r3 = await c.request(b"GET /3 HTTP/1.0\r\n\r\n")
        assert [r1.header("connection"), r2.header("connection"), r3.header("connection")] == \
            ["keep-alive", "keep-alive", "close"]
        assert await c.closed()
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_http10_kept_alive_by_proxy_connection(upstreams) -> None:  # type: ignore[no-untyped-def]
    # llhttp reads Proxy-Connection as Connection: this 1.0 request is kept alive, and must still be taken as
    # 1.0 (the version is not inferred from keep-alive when such a header is present; downstream).
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r1 = await c.request(b"GET /1 HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n")
        r2 = await c.request(b"GET /2 HTTP/1.1\r\nHost: app\r\n\r\n")
        r3 = await c.request(b"GET /3 HTTP/1.1\r\nHost: app\r\nProxy-Connection: keep-alive\r\n\r\n")
        assert [(r.status, r.header("connection")) for r in (r1, r2, r3)] == \
            [(200, "keep-alive"), (200, None), (200, None)]
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_expect_100_continue(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"PUT /u HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        r = await c.request(b"hello")
        assert (r.status, r.body) == (200, b"up PUT /u")
        assert a.traffic[0].body == b"hello" and a.traffic[0].header("expect") is None
        # Refused before the body: no 100, just the final status.
        r = await c.request(b"PUT /u HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\n"
                            b"Content-Length: 999999999\r\n\r\n")
        assert r.status == 413
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_websocket_style_upgrade_is_tunnelled(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        assert req.header("upgrade") == "websocket" and req.header("connection") == "upgrade"
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi")
        await writer.drain()
        while data := await reader.read(100):
            writer.write(b"echo:" + data)
            await writer.drain()

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Upgrade: websocket\r\n" in head
        assert await asyncio.wait_for(c.reader.readexactly(2), 5) == b"hi"
        await c.send(b"\x81\x05hello")
        assert await asyncio.wait_for(c.reader.readexactly(12), 5) == b"echo:\x81\x05hello"
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_expose_version_and_assignment_cookie(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    t = table([version("v1", a), version("v2", b)],
              [simple_route(("v1", 1.0), ("v2", 0.0), identity=ID, expose_version=True, assignment_cookie="tv")])
    p = await proxy_for(t)
    try:
        c = await Client.open(p.port)
        r = await c.get(extra="X-Client: u1\r\n")
        assert (r.body, r.header("x-turnout-version")) == (b"a GET /", "v1")
        assert r.header("set-cookie") == "tv=v1; Path=/; HttpOnly; SameSite=Lax"
        # The cookie names v2: the session stays there although v2 gets no new traffic (drain).
        r = await c.get(extra="X-Client: u1\r\nCookie: a=1; tv=v2\r\n")
        assert (r.body, r.header("x-turnout-version"), r.header("set-cookie")) == (b"b GET /", "v2", None)
        # A cookie naming an unknown version is ignored.
        r = await c.get(extra="X-Client: u1\r\nCookie: tv=v9\r\n")
        assert (r.body, r.header("set-cookie")) == (b"a GET /", "tv=v1; Path=/; HttpOnly; SameSite=Lax")
        c.close()
        assert a.traffic[0].header("x-turnout-version") == "v1"
    finally:
        await p.dp.shutdown(0.5)


async def test_version_not_exposed_by_default(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.header("x-turnout-version") is None and r.header("set-cookie") is None
    finally:
        await p.dp.shutdown(0.5)


async def test_mirror_copies_share_and_is_bounded_when_target_hangs(upstreams) -> None:  # type: ignore[no-untyped-def]
    hang = asyncio.Event()

    async def hanging(req, reader, writer):  # type: ignore[no-untyped-def]
        await hang.wait()
        return ok()

    a = await upstreams(name="a")
    m = await upstreams(hanging, name="m")
    t = table([version("v1", a), version("vm", m)], [simple_route(("v1", 1.0), mirrors=(Mirror("vm", 50.0),))])
    p = await proxy_for(t)
    p.dp.mirror.max_in_flight = 3
    try:
        c = await Client.open(p.port)
        rs = [await c.request(b"POST /m HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n\r\nbody") for _ in range(10)]
        c.close()
        assert [r.body for r in rs] == [b"a POST /m"] * 10  # the client never waits for the mirror
        for _ in range(100):
            if len(m.traffic) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(m.traffic) == 3 and m.traffic[0].body == b"body"
        assert m.traffic[0].header("x-turnout-version") == "vm"
        assert p.dp.mirror_counts == {("web", "vm", "dropped"): 2}
        hang.set()
        for _ in range(100):
            if p.dp.mirror.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert p.dp.mirror_counts == {("web", "vm", "dropped"): 2, ("web", "vm", "200"): 3}
    finally:
        hang.set()
        await p.dp.shutdown(0.5)


async def test_passive_ejection_and_readmission(upstreams) -> None:  # type: ignore[no-untyped-def]
    failing = True

    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if failing:
            return b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
        return ok(b"a")

    a = await upstreams(h, name="a")
    b = await upstreams(name="b")
    p = await proxy_for(table([version("v1", a), version("v2", b)], [simple_route(("v1", 1.0), fallback=("v2",))]),
                        passive_eject_after=3)
    p.dp.health.eject_base = 0.2
    ep = p.dp.backends["v1"].endpoints[0]
    loop = asyncio.get_running_loop()

    async def readmitted() -> None:
        for _ in range(250):
            if not ep.ejected:
                return
            await asyncio.sleep(0.02)

    try:
        c = await Client.open(p.port)
        statuses = [(await c.get()).status for _ in range(3)]
        assert statuses == [500, 500, 500]  # a 5xx reaches the client; it counts against the endpoint
        assert p.dp.health_view()["v1"] == {a.url: False}
        assert (await c.get()).body == b"b GET /"
        await asyncio.wait_for(readmitted(), 5)
        assert p.dp.health_view()["v1"] == {a.url: True}  # re-admitted on probation
        assert (await c.get()).status == 500  # one failure on probation ejects again, for twice as long
        assert p.dp.health_view()["v1"] == {a.url: False}
        assert ep.ejections == 2
        handle = ep.readmit_handle
        assert handle is not None
        assert 0.3 < handle.when() - loop.time() < 0.45  # uvloop keeps time in milliseconds
        failing = False
        await asyncio.wait_for(readmitted(), 5)
        assert (await c.get()).body == b"a"
        assert (ep.failures, ep.ejections) == (0, 0)
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_table_changed_keeps_health_of_remaining_endpoints(upstreams) -> None:  # type: ignore[no-untyped-def]
    a, b = await upstreams(name="a"), await upstreams(name="b")
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        ep = p.dp.backends["v1"].endpoints[0]
        ep.ejected = True
        p.set_table(table([version("v1", a, b)], [simple_route(("v1", 1.0))], revision=2))
        assert p.dp.backends["v1"].endpoints[0] is ep
        assert p.dp.health_view() == {"v1": {a.url: False, b.url: True}}
        c = await Client.open(p.port)
        assert (await c.get()).body == b"b GET /"
        p.set_table(table([version("v2", a)], [simple_route(("v2", 1.0))], revision=3))
        assert p.dp.health_view() == {"v2": {a.url: True}}
        r = await c.get()
        assert (r.body, a.traffic[-1].header("x-turnout-version")) == (b"a GET /", "v2")
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_graceful_shutdown_finishes_in_flight(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def slow(req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return ok(b"finished")

    a = await upstreams(slow)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    busy = await Client.open(p.port)
    idle = await Client.open(p.port)
    assert (await idle.get()).status == 200
    await busy.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    await asyncio.sleep(0.05)
    port = p.port
    done = asyncio.create_task(p.dp.shutdown(5))
    r = await asyncio.wait_for(read_response(busy.reader), 5)
    assert (r.status, r.body, r.header("connection")) == (200, b"finished", "close")
    assert await idle.closed(1)
    await asyncio.wait_for(done, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    busy.close()
    idle.close()


async def test_shutdown_grace_expiry_closes_the_rest(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def never(req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(10)
        return ok()

    a = await upstreams(never)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(p.dp.shutdown(0.2), 3)
    assert await c.closed(1)
    assert p.dp.conns == set()
    c.close()


async def test_request_body_streams_to_upstream_and_idle_timeout(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                        timeouts=Timeouts(body_read_idle=0.3))
    try:
        c = await Client.open(p.port)
        await c.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nabc")
        r = await asyncio.wait_for(read_response(c.reader), 3)
        assert r.status == 408
        assert p.stats.rejected == {"timeout": 1}
        assert a.traffic == []
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_repr_explains_state(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.get()
        assert repr(p.dp).startswith("<DataPlane [Clients: 1 | Upstreams: ")
        assert repr(p.dp.backends["v1"]) == "<Backend v1 [Endpoints: 1 healthy, 0 unhealthy]>"
        c.close()
    finally:
        await p.dp.shutdown(0.5)


_ = (Upstream, read_chunked)


async def test_declined_upgrade_is_answered_then_closed(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert (r.status, r.body, r.header("connection")) == (200, b"up GET /ws", "close")
        assert await c.closed(2)
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_keepalive_idle_timeout_closes_client(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                        timeouts=Timeouts(keepalive_idle=0.2))
    try:
        c = await Client.open(p.port)
        assert (await c.get()).status == 200
        assert await c.closed(2)
        assert p.dp.conns == set()
        assert p.stats.rejected == {}
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_workers_share_a_port_with_reuse_port(upstreams) -> None:  # type: ignore[no-untyped-def]
    import socket

    from proxy.dataplane.listener import start_dataplane
    from proxy.table import TableHolder
    from proxy.telemetry.stats import Stats

    a = await upstreams()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    t = table([version("v1", a)], [simple_route(("v1", 1.0))])
    settings = Settings(listen=("127.0.0.1", port))
    one = await start_dataplane(settings, TableHolder(t), Stats(), reuse_port=True)
    two = await start_dataplane(settings, TableHolder(t), Stats(), reuse_port=True)
    try:
        assert one.port == two.port == port
        c = await Client.open(port)
        assert (await c.get()).status == 200
        c.close()
    finally:
        await one.shutdown(0.2)
        await two.shutdown(0.2)


async def test_serves_on_a_given_socket(upstreams) -> None:  # type: ignore[no-untyped-def]
    import socket

    from proxy.dataplane.listener import start_dataplane
    from proxy.table import TableHolder
    from proxy.telemetry.stats import Stats

    a = await upstreams()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dp = await start_dataplane(Settings(), TableHolder(table([version("v1", a)], [simple_route(("v1", 1.0))])),
                               Stats(), sock=sock)
    try:
        c = await Client.open(sock.getsockname()[1])
        assert (await c.get()).status == 200
        c.close()
        assert dp.stats.connections["upstream"] == 1
    finally:
        await dp.shutdown(0.2)


async def test_half_closed_client_still_gets_its_answers(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        # The last request asks to close: a half-close after it means "done sending", not "gone" (see
        # test_client_that_goes_away_releases_its_upstream_request for the keep-alive case).
        c.writer.write(b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\nGET /2 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        c.writer.write_eof()
        r1 = await asyncio.wait_for(read_response(c.reader), 5)
        r2 = await asyncio.wait_for(read_response(c.reader), 5)
        assert (r1.body, r2.body) == (b"up GET /1", b"up GET /2")
        assert await c.closed(2)
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_stale_pooled_connection_retried_once_on_a_fresh_one(upstreams) -> None:  # type: ignore[no-untyped-def]
    first: list[int] = []

    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.target == "/first":
            first.append(req.conn)
        elif req.conn in first:
            writer.transport.abort()  # closed the kept-alive connection just as the request arrived
            return None
        return ok(req.target.encode())

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        p.dp.health.forget(p.dp.backends["v1"].endpoints[0])
        c = await Client.open(p.port)
        assert (await c.get("/first")).body == b"/first"
        r = await c.get("/second")
        c.close()
        assert (r.status, r.body) == (200, b"/second")
        n = first[0]
        assert [(r.target, r.conn) for r in a.traffic] == [("/first", n), ("/second", n), ("/second", n + 1)]
        assert p.stats.retries == {"web": 1}
        assert p.stats.fallbacks == {}
        assert p.stats.upstream_errors == {("v1", "reset"): 1}
    finally:
        await p.dp.shutdown(0.5)


async def test_early_hints_passed_and_100_swallowed(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                + ok(b"final"))

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r1 = await c.get()
        r2 = await asyncio.wait_for(read_response(c.reader), 5)
        c.close()
        assert (r1.status, r1.header("link")) == (103, "</s.css>; rel=preload")
        assert (r2.status, r2.body) == (200, b"final")
    finally:
        await p.dp.shutdown(0.5)


async def test_close_delimited_upstream_body_rechunked_for_client(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        # Returning nothing closes the connection, which ends the body.
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        await writer.drain()

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        assert (r.status, r.body, r.header("transfer-encoding")) == (200, b"until close", "chunked")
        r = await c.get()  # the client connection stays usable; the upstream one was not pooled
        assert r.body == b"until close"
        c.close()
        assert len({r.conn for r in a.traffic}) == 2
    finally:
        await p.dp.shutdown(0.5)


async def test_response_hop_by_hop_and_connection_named_headers_stripped(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n"
                b"Trailer: X-T\r\nX-Public: 2\r\nContent-Length: 2\r\n\r\nok")

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.headers == [("X-Public", "2"), ("Content-Length", "2")]  # names as the upstream spelled them
        assert r.body == b"ok"
    finally:
        await p.dp.shutdown(0.5)


async def test_match_on_header_and_client_id_from_cookie_and_query(upstreams) -> None:  # type: ignore[no-untyped-def]
    from proxy.model import Match

    a, b = await upstreams(name="a"), await upstreams(name="b")
    ids = (IdentitySource(kind="cookie", name="uid"), IdentitySource(kind="query", name="u"))
    t = table([version("v1", a), version("v2", b)], [
        simple_route(("v2", 1.0), name="beta", match=Match(headers=(("x-beta", "1"),))),
        simple_route(("v1", 1.0), identity=ids, pins={"pinned": "v2"}),
    ])
    p = await proxy_for(t)
    try:
        c = await Client.open(p.port)
        assert (await c.get(extra="X-Beta: 1\r\n")).body == b"b GET /"
        assert (await c.get(extra="Cookie: x=1; uid=pinned\r\n")).body == b"b GET /"
        assert (await c.get("/?u=pinned")).body == b"b GET /?u=pinned"
        assert (await c.get("/?u=other")).body == b"a GET /?u=other"
        c.close()
        assert [r.header("x-turnout-route") for r in b.traffic] == ["beta", "web", "web"]
    finally:
        await p.dp.shutdown(0.5)


async def test_pipelined_requests_with_bodies(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.05)
        return ok(req.body)

    a = await upstreams(h)
    p = await proxy_for(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"POST /1 HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nfirst"
                     b"POST /2 HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"
                     b"GET /3 HTTP/1.1\r\nHost: app\r\n\r\n")
        bodies = [(await asyncio.wait_for(read_response(c.reader), 5)).body for _ in range(3)]
        c.close()
        assert bodies == [b"first", b"second", b""]
        assert [(r.target, r.body) for r in a.traffic] == [("/1", b"first"), ("/2", b"second"), ("/3", b"")]
    finally:
        await p.dp.shutdown(0.5)


async def test_early_upstream_answer_closes_client_mid_body(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    p = await proxy_for(table([version("v1", url)], [simple_route(("v1", 1.0))]))
    p.dp.health.forget(p.dp.backends["v1"].endpoints[0])
    try:
        c = await Client.open(p.port)
        await c.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        r = await asyncio.wait_for(read_response(c.reader), 5)
        assert (r.status, r.header("connection")) == (413, "close")
        assert await c.closed(2)
        c.close()
        assert p.stats.requests == {("web", "v1", 413): 1}
    finally:
        await p.dp.shutdown(0.5)
        srv.close()


async def test_round_robin_across_healthy_endpoints_of_a_version(upstreams) -> None:  # type: ignore[no-untyped-def]
    a1, a2, a3 = await upstreams(name="a1"), await upstreams(name="a2"), await upstreams(name="a3")
    p = await proxy_for(table([version("v1", a1, a2, a3)], [simple_route(("v1", 1.0))]))
    try:
        p.dp.backends["v1"].endpoints[2].ejected = True
        c = await Client.open(p.port)
        bodies = [(await c.get()).body for _ in range(4)]
        c.close()
        assert bodies == [b"a1 GET /", b"a2 GET /", b"a1 GET /", b"a2 GET /"]
        assert a3.traffic == []
    finally:
        await p.dp.shutdown(0.5)
