"""Misbehaving upstreams: bytes nobody asked for on a pooled connection, endpoints that hang."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from proxy.settings import Settings, Timeouts
from tests.dataplane.helpers import Client, Request, ok, read_response, simple_route, start_proxy, table, version

GET_B = b"GET /b HTTP/1.1\r\nHost: app\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n"


class StreamingApp:
    """A real aiohttp upstream whose `/` is a StreamResponse: for HEAD aiohttp sends the head without
    Content-Length or Transfer-Encoding and still writes the body after it."""

    def __init__(self) -> None:
        self.got_get = asyncio.Event()
        self.peers: list[int] = []  # the client port of each request: which connection carried it
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        resp = web.StreamResponse()
        await resp.prepare(request)
        if request.method == "HEAD":
            # The stray body leaves once the proxy had its chance to send the next request: on this
            # connection (then aiohttp answers it only after this handler, and the proxy reads this body as
            # that answer) or on another one (whose handler sets the event).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.got_get.wait(), 1.0)
        with contextlib.suppress(ConnectionError):
            await resp.write(b"stray body of the HEAD answer")
            await resp.write_eof()
        return resp

    async def plain(self, request: web.Request) -> web.Response:
        self.peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        self.got_get.set()
        return web.Response(text="b")

    async def start(self) -> StreamingApp:
        app = web.Application()
        app.router.add_route("*", "/", self.stream)
        app.router.add_get("/b", self.plain)
        app.router.add_get("/healthz", self.plain_health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def plain_health(self, request: web.Request) -> web.Response:
        return web.Response(text="healthy")


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    """Opens clients that are closed even when a test fails (an open transport breaks the next test)."""
    opened: list[Client] = []

    async def open_client(port: int) -> Client:
        c = await Client.open(port)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        c.close()
    await asyncio.sleep(0)


@pytest.fixture
async def streaming() -> AsyncIterator[StreamingApp]:
    app = await StreamingApp().start()
    yield app
    assert app.runner is not None
    await app.runner.cleanup()


async def test_head_answer_with_a_stray_body_never_reaches_another_client(streaming, clients) -> None:  # type: ignore[no-untyped-def]
    p = await start_proxy(table([version("v1", streaming.url)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0)))
    try:
        for _ in range(3):
            streaming.got_get.clear()
            a = await clients(p.port)
            r = await a.request(HEAD, head=True)
            assert (r.status, r.header("content-length"), r.header("transfer-encoding")) == (200, None, None)
            b = await clients(p.port)  # another client, on another connection
            r = await b.request(GET_B)
            assert (r.status, r.body) == (200, b"b")
            a.close()
            b.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_head_answer_with_a_stray_body_pipelined_with_a_get(streaming, clients) -> None:  # type: ignore[no-untyped-def]
    p = await start_proxy(table([version("v1", streaming.url)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0)))
    try:
        for _ in range(3):
            streaming.got_get.clear()
            c = await clients(p.port)
            await c.send(HEAD + GET_B)
            r1 = await asyncio.wait_for(read_response(c.reader, head_request=True), 5)
            r2 = await asyncio.wait_for(read_response(c.reader), 5)
            assert (r1.status, r2.status, r2.body) == (200, 200, b"b")
            c.close()
    finally:
        await p.dp.shutdown(0.5)


async def test_empty_head_answer_pipelined_with_a_get_gets_both_answers(upstreams, clients) -> None:  # type: ignore[no-untyped-def]
    async def h(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        return ok(b"after")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), Settings(listen=("127.0.0.1", 0)))
    try:
        c = await clients(p.port)
        await c.send(HEAD + GET_B)
        r1 = await asyncio.wait_for(read_response(c.reader, head_request=True), 5)
        r2 = await asyncio.wait_for(read_response(c.reader), 5)
        assert (r1.status, r1.header("content-length"), r2.status, r2.body) == (200, "0", 200, b"after")
        assert [x.method for x in a.traffic] == ["HEAD", "GET"]
        assert a.traffic[0].conn == a.traffic[1].conn  # still pooled
        c.close()
    finally:
        await p.dp.shutdown(0.5)


STRAY_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"


@pytest.mark.parametrize("stray", [b"HTTP/1.1 200 OK\r\nX-Stray: 1\r\n", STRAY_101], ids=["partial", "101"])
async def test_bytes_after_a_response_in_the_same_read_close_the_connection(upstreams, clients, stray: bytes) -> None:  # type: ignore[no-untyped-def]
    async def h(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if req.target == "/first":
            # One write, so one read on the proxy's side: a complete answer and the start of another.
            return ok(b"hi") + stray
        return ok(b"second")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), Settings(listen=("127.0.0.1", 0)))
    try:
        for _ in range(3):
            c = await clients(p.port)
            assert (await c.get("/first")).body == b"hi"
            c2 = await clients(p.port)
            r = await c2.get("/second")
            r2 = await c.get("/second")  # the first client's connection carries on too
            assert (r.status, r.body, r2.status, r2.body) == (200, b"second", 200, b"second")
            c.close()
            c2.close()
        conns = [x.conn for x in a.traffic]
        # Each stray answer closed its connection: the /second requests went to a fresh one, which the
        # next /first reused from the pool.
        assert [conns[i + 1] == conns[i + 2] != conns[i] for i in (0, 3, 6)] == [True] * 3
        assert len(set(conns)) == 4
    finally:
        await p.dp.shutdown(0.5)


async def test_bytes_on_an_idle_pooled_connection_close_it(upstreams, clients) -> None:  # type: ignore[no-untyped-def]
    async def h(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if req.target == "/first":
            writer.write(ok(b"hi"))
            await writer.drain()
            await asyncio.sleep(0.05)
            return b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray"  # nobody asked
        return ok(b"second")

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), Settings(listen=("127.0.0.1", 0)))
    try:
        c = await clients(p.port)
        assert (await c.get("/first")).body == b"hi"
        for _ in range(100):
            if not p.dp.uconns:
                break
            await asyncio.sleep(0.01)
        assert p.dp.uconns == set()
        r = await c.get("/second")
        assert (r.status, r.body) == (200, b"second")
        assert a.traffic[0].conn != a.traffic[1].conn
        c.close()
    finally:
        await p.dp.shutdown(0.5)


# -- item: hung endpoints


def hanging(closed: list[float]):  # type: ignore[no-untyped-def]
    """A handler that never answers; it notes when the proxy closed the connection."""
    async def h(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        closed.append(asyncio.get_running_loop().time())
    return h


async def test_upstream_timeouts_eject_an_endpoint_whose_health_check_passes(upstreams, clients) -> None:  # type: ignore[no-untyped-def]
    closed: list[float] = []
    hung = await upstreams(hanging(closed), name="hung")
    good = await upstreams(name="good")
    settings = Settings(listen=("127.0.0.1", 0), passive_eject_after=2,
                        timeouts=Timeouts(upstream_response=0.3))
    p = await start_proxy(table([version("v1", hung, good)], [simple_route(("v1", 1.0))]), settings)
    try:
        c = await clients(p.port)
        statuses = [(await c.get()).status for _ in range(4)]  # round robin: hung, good, hung, good
        assert statuses == [504, 200, 504, 200]
        assert p.dp.health_view()["v1"] == {hung.url: False, good.url: True}
        assert [(await c.get()).body for _ in range(4)] == [b"good GET /"] * 4
        assert len(hung.traffic) == 2
        assert p.stats.upstream_errors == {("v1", "timeout"): 2}
        c.close()
    finally:
        await p.dp.shutdown(0.5)


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_client_that_goes_away_releases_its_upstream_request(upstreams, clients, how: str) -> None:  # type: ignore[no-untyped-def]
    closed: list[float] = []
    hung = await upstreams(hanging(closed), name="hung")
    p = await start_proxy(table([version("v1", hung)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0)))
    loop = asyncio.get_running_loop()
    try:
        c = await clients(p.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        for _ in range(200):
            if hung.traffic:
                break
            await asyncio.sleep(0.01)
        assert len(hung.traffic) == 1
        left = loop.time()
        if how == "reset":
            sock = c.writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        else:
            c.writer.close()  # an ordinary close (FIN), as a client that gave up on a keep-alive request does
        for _ in range(200):
            if closed:
                break
            await asyncio.sleep(0.01)
        assert len(closed) == 1 and closed[0] - left < 1.0
        assert p.dp.uconns == set()
    finally:
        await p.dp.shutdown(0.5)
