"""Edges of the security fixes that the review tests do not pin down: legitimate traffic next to each bound."""

from __future__ import annotations

import asyncio

from proxy.model import Match
from proxy.settings import Limits, Settings, Timeouts
from tests.dataplane.helpers import Client, ok, shrink_buffers, simple_route, start_proxy, table, version

SMALL = Limits(max_header_bytes=4096, max_request_line=1024)


async def test_many_small_chunks_and_a_small_trailer_pass(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=SMALL))
    try:
        c = await Client.open(p.port)
        # 6 bytes of framing per body byte: far more framing in total than the head limit, never in a row.
        body = b"x" * 5000
        chunks = b"".join(b"1\r\n%b\r\n" % body[i:i + 1] for i in range(len(body)))
        r = await c.request(b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                            + b"0\r\nX-Checksum: 1\r\n\r\n")
        assert (r.status, r.body) == (200, b"up POST /up")
        assert a.traffic[0].body == body
        assert a.traffic[0].header("x-checksum") is None  # trailers are dropped
        assert p.stats.rejected == {}
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_trailer_dribbled_past_the_limit_is_431(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=SMALL))
    try:
        c = await Client.open(p.port)
        await c.send(b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Big: ")
        for _ in range(8):  # 8 KiB in 1 KiB writes: past 4 KiB + 1 KiB, one read at a time
            await c.send(b"a" * 1024)
            await asyncio.sleep(0.02)
            if c.reader._buffer:  # type: ignore[attr-defined]  # answered: writing on would be reset
                break
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 431 ")
        assert await c.closed(5)
        assert p.stats.rejected == {"too_large": 1}
        assert a.traffic == []
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_h2c_upgrade_is_proxied_plain_and_the_connection_closes(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        # The bytes after the request would be HTTP/2 after an accepted upgrade: never parsed as a request.
        r = await c.request(b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                            b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
        assert (r.status, r.body, r.header("connection")) == (200, b"up GET /x", "close")
        assert await c.closed(5)
        (req,) = a.traffic
        assert (req.header("upgrade"), req.header("http2-settings"), req.header("connection")) == (None, None, None)
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_websocket_token_is_matched_case_insensitively(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n\r\n")
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        await c.send(b"ping")
        assert await asyncio.wait_for(c.reader.readexactly(9), 5) == b"echo:ping"
        assert a.traffic[0].header("upgrade") == "WebSocket"
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_idle_tunnel_is_closed_after_upstream_idle(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        await reader.read(100)  # until the proxy closes its side

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=Timeouts(upstream_idle=0.3)))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await c.closed(5)
        assert p.dp.conns == set()
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_head_answer_without_a_body_keeps_the_connection_pooled(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        return ok(b"after")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n", head=True)
        assert (r.status, r.header("content-length")) == (200, "0")
        r = await c.get("/after")
        assert (r.status, r.body) == (200, b"after")
        assert len({x.conn for x in a.traffic}) == 1
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_underscore_spellings_of_stripped_headers_are_dropped_others_pass(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.get("/", extra="Content_Length: 5\r\nProxy_Connection: x\r\nX-Forwarded_Proto: https\r\n"
                                   "X_Request_Id: 7\r\n")
        assert r.status == 200
        names = [n.lower() for n, _ in a.traffic[0].headers]
        assert "x_request_id" in names
        assert not {"content_length", "proxy_connection", "x-forwarded_proto"} & set(names)
        assert a.traffic[0].header("x-forwarded-proto") == "http"
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_client_that_stops_reading_local_answers_is_dropped_after_upstream_idle(upstreams) -> None:  # type: ignore[no-untyped-def]

    a = await upstreams()
    limits = Limits(high_water=16 * 1024, low_water=4 * 1024)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]),
                          Settings(listen=("127.0.0.1", 0), limits=limits,
                                   timeouts=Timeouts(upstream_idle=0.3, keepalive_idle=60.0)))
    c = await Client.open(p.port)
    try:
        conn = await shrink_buffers(p, c)
        # Answered by the proxy itself (no route for this Host); keepalive_idle must not replace the
        # deadline of a client that stopped reading. 64-byte requests: parse slices (2048) end between
        # requests, so the connection is idle (not mid-head) when parsing stops.
        req = b"GET / HTTP/1.1\r\nHost: no-such-route\r\nX-Pad: " + b"p" * 16 + b"\r\n\r\n"
        assert len(req) == 64
        c.writer.write(req * 20_000)
        for _ in range(500):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_connections_past_the_limit_get_503_and_nothing_reaches_an_upstream(upstreams) -> None:  # type: ignore[no-untyped-def]
    from tests.dataplane.helpers import read_response

    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=Limits(max_connections=2)))
    try:
        c1, c2 = await Client.open(p.port), await Client.open(p.port)
        assert (await c1.get()).status == 200 and (await c2.get()).status == 200
        c3 = await Client.open(p.port)
        r = await asyncio.wait_for(read_response(c3.reader), 3)
        assert r.status == 503
        assert await c3.closed(2)
        assert p.stats.rejected == {"too_many_connections": 1}
        assert len(a.traffic) == 2 and p.stats.connections["downstream"] == 2
        c1.close()
        for _ in range(100):  # the freed slot is usable again once the proxy saw the close
            if p.stats.connections["downstream"] == 1:
                break
            await asyncio.sleep(0.01)
        c4 = await Client.open(p.port)
        assert (await c4.get()).status == 200
        for c in (c2, c3, c4):
            c.close()
    finally:
        await p.dp.shutdown(0.5)
