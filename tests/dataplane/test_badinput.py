"""Bad input and faults: every refusal has the right status and reaches no upstream."""

from __future__ import annotations

import asyncio

import pytest

from proxy.settings import Limits, Settings, Timeouts
from tests.dataplane.helpers import Client, Proxy, ok, simple_route, start_proxy, table, version

FAST = Timeouts(header_read=0.5, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=2.0,
                upstream_idle=2.0, body_read_idle=1.0)


@pytest.fixture
async def env(upstreams):  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=FAST))
    yield p, a
    await p.dp.shutdown(0.5)


async def refused(p: Proxy, raw: bytes) -> int:
    c = await Client.open(p.port)
    try:
        r = await c.request(raw)
        assert await c.closed()
        return r.status
    finally:
        c.close()


GET = b"GET / HTTP/1.1\r\nHost: app\r\n"

CASES = {
    "cl_and_te": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
    "two_different_cl": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                         400, "bad_request"),
    "cl_plus": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nabcde", 400, "bad_request"),
    "cl_negative": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
    "cl_hex": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 0x10\r\n\r\n0123456789abcdef", 400, "bad_request"),
    "te_xchunked": (b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                    400, "bad_request"),
    "te_chunked_twice": (b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
    "te_gzip": (b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400, "bad_request"),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost : app\r\n\r\n", 400, "bad_request"),
    "obs_fold": (GET + b"X-A: one\r\n two\r\n\r\n", 400, "bad_request"),
    "bare_lf": (b"GET / HTTP/1.1\nHost: app\nX-A: 1\n\n", 400, "bad_request"),
    "nul_in_header": (GET + b"X-A: a\x00b\r\n\r\n", 400, "bad_request"),
    "cr_in_header": (GET + b"X-A: a\rb\r\n\r\n", 400, "bad_request"),
    "chunk_size_z": (b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\nabc\r\n0\r\n\r\n",
                     400, "bad_request"),
    "chunk_size_20_hex": (b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"FFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 400, "bad_request"),
    "absolute_form_other_host": (b"GET http://example.com/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "duplicate_host": (b"GET / HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n", 400, "bad_request"),
    "missing_host_http11": (b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400, "bad_request"),
    "invalid_method": (b"G(T / HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "nul_in_target": (b"GET /a\x00b HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "bad_version": (b"GET / HTTP/9.7\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "expect_unknown": (GET + b"Expect: something\r\n\r\n", 417, "bad_request"),
    "upgrade_with_body": (b"POST / HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                          b"Content-Length: 3\r\n\r\nabc", 400, "bad_request"),
    "body_over_limit": (b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 200000000\r\n\r\nabc", 413, "too_large"),
    "request_line_too_long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n", 414, "too_large"),
    "too_many_headers": (GET + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431, "too_large"),
    "one_huge_header": (GET + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431, "too_large"),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_refused(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw, status, reason = CASES[name]
    assert await refused(p, raw) == status
    assert p.stats.rejected == {reason: 1}
    assert a.nothing_received


async def test_chunked_body_over_limit_is_413_and_upstream_gets_no_complete_request(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=Limits(max_body_bytes=1000)))
    try:
        raw = b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"x" * 512 \
            + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n"
        assert await refused(p, raw) == 413
        await asyncio.sleep(0.1)
        assert a.traffic == []
        assert p.stats.rejected == {"too_large": 1}
    finally:
        await p.dp.shutdown(0.5)


async def test_header_block_dribbled_over_many_segments_is_431(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        await c.send(GET)
        line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
        status = None
        for _ in range(100):  # 100 KB of headers, one 1 KB segment at a time
            try:
                await c.send(line)
            except ConnectionError:
                break
            await asyncio.sleep(0)
            if c.reader.at_eof() or c.reader._buffer:  # type: ignore[attr-defined]
                break
        r = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        status = int(r.split(b" ")[1])
        assert status == 431
        assert await c.closed()
    finally:
        c.close()
    assert p.stats.rejected == {"too_large": 1}
    assert a.nothing_received


async def test_slowloris_is_closed_in_time_while_others_work(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    slow = await Client.open(p.port)
    silent = await Client.open(p.port)
    await slow.send(b"GET / HTTP/1.1\r\nHost: app\r\n")
    normal = await Client.open(p.port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    statuses = []
    for _ in range(5):
        await slow.send(b"X-Slow: 1\r\n")  # one header line at a time, never finishing
        statuses.append((await normal.get()).status)
        await asyncio.sleep(0.05)
    head = await asyncio.wait_for(slow.reader.read(), 3)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert await silent.closed(3)  # sent nothing at all: closed without a response
    assert loop.time() - t0 < 3
    assert statuses == [200] * 5
    assert len(a.traffic) == 5
    assert p.stats.rejected == {"timeout": 1}
    for c in (slow, silent, normal):
        c.close()


async def test_spoofed_forwarding_and_version_headers_from_untrusted_client(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    r = await c.get("/", extra="X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
                               "X-Turnout-Version: v9\r\nX-Turnout-Route: admin\r\n")
    c.close()
    assert r.status == 200
    req = a.traffic[0]
    assert req.header("x-forwarded-for") == "127.0.0.1"
    assert req.header("x-forwarded-proto") == "http"
    assert req.header("x-forwarded-host") == "app"
    assert req.header("x-turnout-version") == "v1"
    assert req.header("x-turnout-route") == "web"
    assert req.count("x-turnout-version") == 1 and req.count("x-forwarded-for") == 1


async def test_forwarding_headers_kept_from_trusted_peer(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), trusted_proxies=("127.0.0.0/8",)))
    try:
        c = await Client.open(p.port)
        r = await c.get("/", extra="X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
                                   "X-Turnout-Version: v9\r\n")
        c.close()
        assert r.status == 200
        req = a.traffic[0]
        assert req.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
        assert req.header("x-forwarded-proto") == "https"
        assert req.header("x-turnout-version") == "v1"
    finally:
        await p.dp.shutdown(0.5)


async def test_hop_by_hop_and_connection_named_headers_stripped(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    r = await c.get("/", extra="Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
                               "Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Kept: yes\r\n")
    c.close()
    assert r.status == 200
    names = {n.lower() for n, _ in a.traffic[0].headers}
    assert names.isdisjoint({"connection", "x-secret", "keep-alive", "te", "proxy-connection", "trailer", "upgrade"})
    assert a.traffic[0].header("x-kept") == "yes"


async def test_absolute_form_for_own_host_is_forwarded_in_origin_form(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    r = await c.request(b"GET http://app/x?y=1 HTTP/1.1\r\nHost: app\r\n\r\n")
    c.close()
    assert r.status == 200
    assert a.traffic[0].target == "/x?y=1"


# -- upstream faults


async def closed_port() -> int:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    return int(port)


async def test_upstream_refusing_connections_falls_back(upstreams) -> None:  # type: ignore[no-untyped-def]
    b = await upstreams(name="b")
    dead = f"http://127.0.0.1:{await closed_port()}"
    p = await start_proxy(table([version("v1", dead), version("v2", b)],
                                [simple_route(("v1", 1.0), fallback=("v2",))]),
                          Settings(listen=("127.0.0.1", 0), passive_eject_after=100))
    try:
        # Stop the active check (it would mark the endpoint down first) so the connect itself fails.
        ep = p.dp.backends["v1"].endpoints[0]
        p.dp.health.forget(ep)
        ep.active_ok = True
        c = await Client.open(p.port)
        r = await c.request(b"POST /p HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc")
        c.close()
        assert r.status == 200
        assert r.body == b"b POST /p"
        assert b.traffic[0].body == b"abc"
        assert p.stats.retries == {"web": 1}
        assert p.stats.fallbacks == {("web", "v1", "v2"): 1}
        assert p.stats.upstream_errors == {("v1", "connect"): 1}
    finally:
        await p.dp.shutdown(0.5)


async def reset_after_body(req, reader, writer):  # type: ignore[no-untyped-def]
    writer.transport.abort()


@pytest.mark.parametrize(("method", "body", "retried"), [
    ("POST", b"abc", False),  # body bytes went out and POST is not idempotent
    ("PUT", b"abc", True),  # idempotent and small enough to have been buffered
    ("PUT", b"x" * 70_000, False),  # idempotent but larger than limits.retry_buffer_bytes
    ("POST", b"", False),  # no body byte, but the upstream had the whole request and may have acted on it
    ("DELETE", b"", True),  # idempotent and bodyless
])
async def test_reset_before_response_retried_only_as_allowed(upstreams, method: str, body: bytes,
                                                              retried: bool) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(reset_after_body, name="a")
    b = await upstreams(name="b")
    p = await start_proxy(table([version("v1", a), version("v2", b)], [simple_route(("v1", 1.0), fallback=("v2",))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(f"{method} /p HTTP/1.1\r\nHost: app\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                            + body)
        c.close()
        assert len(a.traffic) == 1 and a.traffic[0].body == body
        if retried:
            assert r.status == 200 and r.body == f"b {method} /p".encode()
            assert b.traffic[0].body == body
            assert p.stats.retries == {"web": 1}
        else:
            assert r.status == 502
            assert b.traffic == []
            assert p.stats.retries == {}
        assert p.stats.upstream_errors == {("v1", "reset"): 1}
    finally:
        await p.dp.shutdown(0.5)


async def die_mid_body(req, reader, writer):  # type: ignore[no-untyped-def]
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
    await writer.drain()
    writer.transport.abort()


async def test_upstream_dying_mid_body_aborts_client(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(die_mid_body)
    b = await upstreams(name="b")
    p = await start_proxy(table([version("v1", a), version("v2", b)], [simple_route(("v1", 1.0), fallback=("v2",))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        got = b""
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            got = await asyncio.wait_for(c.reader.readexactly(1000), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert got == b""
        assert b.traffic == []  # never retried once response bytes went out
        assert p.stats.retries == {}
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_upstream_dying_mid_chunked_body_never_sends_last_chunk(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        data = b""
        try:
            while chunk := await asyncio.wait_for(c.reader.read(65536), 5):
                data += chunk
        except ConnectionError:
            pass
        assert data.endswith(b"5\r\nhello\r\n")
        assert b"0\r\n\r\n" not in data
        c.close()
    finally:
        await p.dp.shutdown(0.5)


INVALID_RESPONSES = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "cr_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "bad_chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
    "two_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "101_unasked": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(INVALID_RESPONSES))
async def test_invalid_upstream_response_is_502(upstreams, name: str) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return INVALID_RESPONSES[name]

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        if name == "bad_chunk":
            # The head was valid and already relayed; the bad body then aborts the client connection.
            await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            data = b""
            try:
                while chunk := await asyncio.wait_for(c.reader.read(65536), 5):
                    data += chunk
            except ConnectionError:
                pass
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert data.endswith(b"\r\n\r\n") and b"0\r\n\r\n" not in data
        else:
            r = await c.get()
            assert r.status == 502
        assert p.stats.upstream_errors == {("v1", "invalid_response"): 1}
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_upstream_redirect_passed_through_not_followed(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n"

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.status == 302
        assert r.header("location") == "http://127.0.0.1:1/elsewhere"
        assert len(a.traffic) == 1
    finally:
        await p.dp.shutdown(0.5)


async def test_upstream_response_timeout_is_504(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(3)
        return ok()

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=Timeouts(upstream_response=0.3)))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        assert r.status == 504
        assert p.stats.upstream_errors == {("v1", "timeout"): 1}
    finally:
        await p.dp.shutdown(0.5)


async def test_pipelined_bad_request_answered_after_good_one(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    await c.send(GET + b"\r\n" + b"GET / HTTP/1.1\r\nHost: app\r\nHost: b\r\n\r\n" + GET + b"\r\n")
    r1 = await asyncio.wait_for(_read(c), 5)
    r2 = await asyncio.wait_for(_read(c), 5)
    assert (r1.status, r2.status) == (200, 400)
    assert await c.closed()
    assert len(a.traffic) == 1
    c.close()


async def _read(c: Client):  # type: ignore[no-untyped-def]
    from tests.dataplane.helpers import read_response
    return await read_response(c.reader)


async def test_no_route_is_404_and_keeps_connection(upstreams) -> None:  # type: ignore[no-untyped-def]
    from proxy.model import Match
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]))
    try:
        c = await Client.open(p.port)
        r1 = await c.get("/", host="other")
        r2 = await c.get("/", host="app:8080")
        c.close()
        assert (r1.status, r2.status) == (404, 200)
        assert p.stats.rejected == {"no_route": 1}
        assert len(a.traffic) == 1
    finally:
        await p.dp.shutdown(0.5)


@pytest.mark.parametrize("with_fallback", [True, False])
async def test_upstream_connect_timeout(upstreams, with_fallback: bool) -> None:  # type: ignore[no-untyped-def]
    import socket

    b = await upstreams(name="b")
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.socket()
    filler.connect(full.getsockname())
    url = f"http://127.0.0.1:{full.getsockname()[1]}"
    route = simple_route(("v1", 1.0), fallback=("v2",) if with_fallback else ())
    p = await start_proxy(table([version("v1", url), version("v2", b)], [route]),
                          Settings(listen=("127.0.0.1", 0), timeouts=Timeouts(upstream_connect=0.3)))
    ep = p.dp.backends["v1"].endpoints[0]
    p.dp.health.forget(ep)
    ep.active_ok = True
    try:
        c = await Client.open(p.port)
        r = await c.get()
        c.close()
        if with_fallback:
            assert (r.status, r.body) == (200, b"b GET /")
            assert p.stats.fallbacks == {("web", "v1", "v2"): 1}
        else:
            assert r.status == 504
        assert p.stats.upstream_errors == {("v1", "timeout"): 1}
    finally:
        await p.dp.shutdown(0.5)
        filler.close()
        full.close()
