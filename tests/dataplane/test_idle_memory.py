"""Idle keep-alive connections give back their parser (ClientFlow.shed, called by the sweeper) and serve
their next request as before; a connection in the middle of a request keeps its parser."""

from __future__ import annotations

import asyncio

from proxy.dataplane.flow import SHED_AFTER
from proxy.settings import Settings
from tests.dataplane.helpers import Client, simple_route, start_proxy, table, version


async def test_an_idle_connection_sheds_its_parser_and_serves_the_next_request(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), Settings(listen=("127.0.0.1", 0)))
    try:
        c = await Client.open(p.port)
        first = await c.get("/one", host="a")
        assert (first.status, first.body) == (200, b"a GET /one")
        (conn,) = p.dp.conns
        parser = conn.parser
        for _ in range(int((SHED_AFTER + 3) / 0.05)):  # the sweeper runs a few times per second
            if conn.parser_shed:
                break
            await asyncio.sleep(0.05)
        assert conn.parser is not parser
        assert conn.tail == b""
        second = await c.get("/two", host="a")
        assert (second.status, second.body) == (200, b"a GET /two")
        assert conn.parser_shed is False
        assert [r.target for r in a.requests if r.target != "/healthz"] == ["/one", "/two"]
        c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_a_connection_inside_a_request_head_keeps_its_parser(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), Settings(listen=("127.0.0.1", 0)))
    try:
        c = await Client.open(p.port)
        await c.send(b"GET /half HTTP/1.1\r\nHost: a\r\n")
        for _ in range(300):
            if p.dp.conns and next(iter(p.dp.conns)).raw_head:
                break
            await asyncio.sleep(0.01)
        (conn,) = p.dp.conns
        parser = conn.parser
        conn.shed(conn.now() + 100 * SHED_AFTER)
        assert conn.parser is parser
        assert conn.parser_shed is False
        r = await c.request(b"X-End: 1\r\n\r\n")
        assert (r.status, r.body) == (200, b"a GET /half")
        c.close()
    finally:
        await p.dp.shutdown(0.5)
