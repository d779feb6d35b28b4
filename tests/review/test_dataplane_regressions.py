"""Attacks on the data plane that are refused correctly today (not already in tests/dataplane/test_badinput.py)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.model import Match
from proxy.settings import Settings, Timeouts
from tests.dataplane.helpers import Client, read_response, shrink_buffers, simple_route, start_proxy, table, version
from tests.review.helpers import raw_exchange, read_all

FAST = Timeouts(header_read=0.5, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=2.0,
                upstream_idle=2.0, body_read_idle=1.0)


@pytest.fixture
async def env(upstreams):  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=FAST))
    yield p, a
    await p.dp.shutdown(0.5)


POST = b"POST / HTTP/1.1\r\nHost: app\r\n"

REFUSED = {
    "cl_overflow": POST + b"Content-Length: 99999999999999999999999\r\n\r\nabc",
    "cl_comma_list": POST + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl_with_space_inside": POST + b"Content-Length: 1 2\r\n\r\nabc",
    "te_space_before_colon": POST + b"Transfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te_vertical_tab": POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te_chunked_then_identity": POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                                       b"3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_overflow_64bit": POST + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc\r\n",
    "chunk_size_negative": POST + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "chunk_data_longer_than_size": POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    "chunk_lf_only": POST + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    "header_name_with_space": b"GET / HTTP/1.1\r\nHost: app\r\nX Forwarded For: 1.2.3.4\r\n\r\n",
    "header_line_without_colon": b"GET / HTTP/1.1\r\nHost: app\r\nX-Nothing\r\n\r\n",
    "host_obs_fold": b"GET / HTTP/1.1\r\nHost: evil\r\n app\r\n\r\n",
    "lf_in_target": b"GET /a\nb HTTP/1.1\r\nHost: app\r\n\r\n",
    "absolute_form_userinfo_other_host": b"GET http://app@evil.example/ HTTP/1.1\r\nHost: app\r\n\r\n",
    "absolute_form_ftp": b"GET ftp://app/ HTTP/1.1\r\nHost: app\r\n\r\n",
    "connect_lowercase_host": b"CONNECT app:80 HTTP/1.1\r\nHost: app:80\r\n\r\n",
    "asterisk_form_get": b"GET * HTTP/1.1\r\nHost: app\r\n\r\n",
    "http10_cl_and_te": b"POST / HTTP/1.0\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_smuggling_variants_are_400_and_reach_no_upstream(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    out = await raw_exchange(p.port, REFUSED[name])
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.count(b"HTTP/1.1 ") == 1
    assert a.nothing_received


async def test_content_length_with_leading_zeros_is_reframed_and_next_request_is_separate(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        await c.send(POST + b"Content-Length: 0005\r\n\r\nhelloGET /second HTTP/1.1\r\nHost: app\r\n\r\n")
        r1 = await asyncio.wait_for(read_response(c.reader), 3)
        r2 = await asyncio.wait_for(read_response(c.reader), 3)
        assert (r1.status, r2.status) == (200, 200)
        first, second = a.traffic
        assert (first.header("content-length"), first.body) == ("5", b"hello")
        assert (second.method, second.target) == ("GET", "/second")
    finally:
        c.close()


async def test_chunk_extensions_and_trailers_are_not_forwarded(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.request(POST + b"Transfer-Encoding: chunked\r\nTrailer: X-Trail\r\n\r\n"
                                   b"3;ext=\"a\\\"b\";evil=1\r\nabc\r\n0;last=1\r\nX-Trail: spoofed\r\n"
                                   b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
        assert r.status == 200
        (req,) = a.traffic
        assert req.body == b"abc"
        assert b";" not in req.raw[len(req.head):]
        assert b"X-Trail" not in req.raw and b"6.6.6.6" not in req.raw
        assert req.header("trailer") is None
    finally:
        c.close()


@pytest.mark.parametrize("named", ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Turnout-Version",
                                   "X-Turnout-Route", "Content-Length", "Transfer-Encoding"])
async def test_connection_cannot_remove_headers_the_proxy_adds(env, named: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.request(POST + b"Connection: keep-alive, %b\r\nContent-Length: 2\r\n\r\nhi" % named.encode())
        assert r.status == 200
        (req,) = a.traffic
        assert (req.header("x-forwarded-for"), req.header("x-forwarded-proto")) == ("127.0.0.1", "http")
        assert (req.header("x-forwarded-host"), req.header("x-turnout-route")) == ("app", "web")
        assert (req.header("x-turnout-version"), req.header("content-length"), req.body) == ("v1", "2", b"hi")
    finally:
        c.close()


async def test_pipelined_request_after_connection_close_is_never_forwarded(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    out = await raw_exchange(p.port, b"GET /first HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
                                     b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 ")
    assert [r.target for r in a.traffic] == ["/first"]


async def test_double_slash_target_is_forwarded_as_a_path_to_the_routed_upstream(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        r = await c.get("//evil.example/x")
        assert r.status == 200
        (req,) = a.traffic
        assert (req.target, req.header("host")) == ("//evil.example/x", "app")
    finally:
        c.close()


async def test_expect_continue_on_unrouted_request_gets_no_100(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    out = await raw_exchange(p.port, b"POST / HTTP/1.1\r\nHost: nowhere\r\nExpect: 100-continue\r\n"
                                     b"Content-Length: 5\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 ") and b"100 Continue" not in out
    assert a.nothing_received


async def test_expect_continue_over_body_limit_gets_no_100(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    from proxy.settings import Limits
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=Limits(max_body_bytes=10)))
    try:
        out = await raw_exchange(p.port, b"PUT / HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\n"
                                         b"Content-Length: 11\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out
        assert a.nothing_received
    finally:
        await p.dp.shutdown(0.5)


async def test_refused_websocket_upgrade_drops_the_bytes_sent_after_it(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    try:
        out = await raw_exchange(p.port, b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\n"
                                         b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                                         b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403 ") and b"Connection: close\r\n" in out
        assert out.count(b"HTTP/1.1 ") == 1
        assert [r.target for r in a.traffic] == ["/ws"]
        assert b"smuggled" not in b"".join(a.partial)
    finally:
        await p.dp.shutdown(0.5)


BAD_RESPONSES = {
    "lf_in_header_value": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n Set-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    "space_in_header_name": b"HTTP/1.1 200 OK\r\nSet Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    "cl_negative": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "status_not_digits": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("name", sorted(BAD_RESPONSES))
async def test_response_splitting_attempts_from_upstream_are_502(upstreams, name: str) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return BAD_RESPONSES[name]

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        r = await c.get()
        assert r.status == 502
        assert b"evil" not in r.raw_head
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_informational_responses_pass_without_hop_by_hop_headers(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nKeep-Alive: timeout=1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" * 3 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        hints = [await asyncio.wait_for(read_response(c.reader), 3) for _ in range(3)]
        final = await asyncio.wait_for(read_response(c.reader), 3)
        assert [x.status for x in hints] == [103, 103, 103]
        assert all(x.headers == [("Link", "</a.css>; rel=preload")] for x in hints)
        assert (final.status, final.body) == (200, b"ok")
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_head_response_with_body_bytes_in_the_same_read_is_not_relayed(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        await c.send(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n")
        r = await asyncio.wait_for(read_response(c.reader, head_request=True), 3)
        assert (r.status, r.header("content-length")) == (200, "5")
        r2 = await c.get()
        assert (r2.status, r2.body) == (200, b"good")
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_slow_response_reader_is_aborted_by_upstream_idle(upstreams) -> None:  # type: ignore[no-untyped-def]
    big = b"x" * (4 * 1024 * 1024)

    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big)

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=FAST))
    c = await Client.open(p.port)
    try:
        await shrink_buffers(p, c)
        await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        await asyncio.sleep(FAST.upstream_idle + 0.6)  # never read: the proxy must give up on us
        data, closed = await read_all(c.reader, 3)
        assert closed and len(data) < len(big)
        assert not p.dp.conns
    finally:
        c.close()
        await p.dp.shutdown(0.5)
