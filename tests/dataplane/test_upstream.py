"""The upstream side: response heads, framing and what a broken upstream may not do (proxy.dataplane.upstream)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.settings import Limits, Settings
from tests.dataplane.helpers import (
    Client,
    ok,
    read_response,
    simple_route,
    start_proxy,
    table,
    version,
)


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
