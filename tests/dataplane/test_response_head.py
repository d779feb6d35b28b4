"""Response heads as passed on: heads split across reads, header spellings, 1xx before the final answer."""

from __future__ import annotations

import asyncio

from proxy.settings import Settings
from tests.dataplane.helpers import Client, Request, simple_route, start_proxy, table, version


def pieces_handler(*pieces: bytes):  # type: ignore[no-untyped-def]
    async def handler(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        for p in pieces:  # each piece is its own read on the proxy's side
            writer.write(p)
            await writer.drain()
            await asyncio.sleep(0.01)
        return b""
    return handler


async def roundtrip(upstreams, *pieces: bytes):  # type: ignore[no-untyped-def]
    a = await upstreams(pieces_handler(*pieces), name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0)))
    try:
        c = await Client.open(p.port)
        r = await c.get()
        r2 = await c.get()  # the upstream connection stays in sync for the next response
        c.close()
        return r, r2
    finally:
        await p.dp.shutdown(0.5)


async def test_head_split_across_reads(upstreams) -> None:  # type: ignore[no-untyped-def]
    r, r2 = await roundtrip(upstreams, b"HTTP/1.1 200 OK\r\nX-O", b"ne: 1\r\nCONTENT-length: 2\r", b"\n\r\nhi")
    for resp in (r, r2):
        assert resp.status == 200 and resp.body == b"hi"
        assert resp.headers == [("X-One", "1"), ("Content-Length", "2")]


async def test_special_headers_removed_in_any_spelling(upstreams) -> None:  # type: ignore[no-untyped-def]
    head = (b"HTTP/1.1 200 OK\r\nconnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
            b"Date: today\r\nTE: x\r\nX-Te: kept  \r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    r, _ = await roundtrip(upstreams, head)
    assert r.status == 200 and r.body == b"hi"
    assert r.raw_head == (b"HTTP/1.1 200 OK\r\nDate: today\r\nX-Te: kept  \r\nTransfer-Encoding: chunked\r\n\r\n")


async def test_informational_then_final_in_one_read(upstreams) -> None:  # type: ignore[no-untyped-def]
    r, final = await roundtrip(upstreams, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nConnection: x\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\r\n\r\nhi")
    # The client's reader sees the 103 first (read_response returns 1xx as a response of its own).
    assert r.status == 103 and r.headers == [("Link", "</s.css>")]
    assert final.status == 200 and final.body == b"hi" and final.header("x-a") == "a"


async def test_large_read_with_small_head_and_big_body_is_passed_on(upstreams) -> None:  # type: ignore[no-untyped-def]
    body = b"x" * 200_000  # one upstream read carries the head and far more body than the head limit
    r, r2 = await roundtrip(upstreams, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert r.status == 200 and r.body == body and r2.body == body
