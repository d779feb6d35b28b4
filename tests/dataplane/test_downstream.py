"""Parsing the client side: framing, trailers and targets as the parser reads them (proxy.dataplane.downstream)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy.settings import Limits, Settings
from tests.dataplane.helpers import (
    POST,
    SMALL,
    Client,
    read_response,
    simple_route,
    start_proxy,
    table,
    version,
)
from tests.raw import raw_exchange, read_all


async def test_huge_request_trailer_is_refused_not_buffered(slow_body_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = slow_body_proxy
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
async def test_smuggling_variants_are_400_and_reach_no_upstream(fast_proxy, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
    out = await raw_exchange(p.port, REFUSED[name])
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.count(b"HTTP/1.1 ") == 1
    assert a.nothing_received


async def test_content_length_with_leading_zeros_is_reframed_and_next_request_is_separate(fast_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
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


async def test_chunk_extensions_and_trailers_are_not_forwarded(fast_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
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


async def test_double_slash_target_is_forwarded_as_a_path_to_the_routed_upstream(fast_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
    c = await Client.open(p.port)
    try:
        r = await c.get("//evil.example/x")
        assert r.status == 200
        (req,) = a.traffic
        assert (req.target, req.header("host")) == ("//evil.example/x", "app")
    finally:
        c.close()


async def test_expect_continue_over_body_limit_gets_no_100(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=Limits(max_body_bytes=10)))
    try:
        out = await raw_exchange(p.port, b"PUT / HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\n"
                                         b"Content-Length: 11\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out
        assert a.nothing_received
    finally:
        await p.dp.shutdown(0.5)
