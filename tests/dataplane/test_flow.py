"""Flow control: memory held by the proxy stays bounded however much the peers send or refuse to read."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.dataplane.downstream import PIPELINE_SLICE
from proxy.settings import Settings
from tests.dataplane.helpers import (
    FAST,
    SMALL,
    Client,
    shrink_buffers,
    simple_route,
    start_proxy,
    table,
    version,
)
from tests.raw import raw_exchange, read_all

MIN_REQUEST = len(b"GET /0 HTTP/1.1\r\nHost: a\r\n\r\n")


async def test_10000_pipelined_requests_answered_in_order_with_bounded_queue(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    settings = Settings(listen=("127.0.0.1", 0))
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), settings)
    n = 10_000
    max_queue = 0
    try:
        c = await Client.open(p.port)
        c.writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n)))
        conn = next(iter(p.dp.conns))
        expected = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\na GET /%d" % (len(b"a GET /%d" % i), i)
                            for i in range(n))
        got = bytearray()
        while len(got) < len(expected):
            max_queue = max(max_queue, len(conn.queue))
            chunk = await asyncio.wait_for(c.reader.read(65536), 10)
            assert chunk
            got += chunk
        assert bytes(got) == expected
        c.close()
    finally:
        await p.dp.shutdown(0.5)
    assert len(a.traffic) == n
    assert max_queue <= settings.limits.max_pipelined + PIPELINE_SLICE // MIN_REQUEST + 1


async def test_100mb_response_to_slow_reader_keeps_proxy_memory_flat(upstreams) -> None:  # type: ignore[no-untyped-def]
    size = 100 * 1024 * 1024
    block = b"z" * (1024 * 1024)

    async def big(req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        return b""

    a = await upstreams(big)
    settings = Settings(listen=("127.0.0.1", 0))
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]), settings)
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            for conn in p.dp.conns:
                if conn.transport is not None:
                    peak = max(peak, conn.transport.get_write_buffer_size())
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        c = await Client.open(p.port)
        await c.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.5)  # not reading at all: the proxy must pause the upstream
        paused = [u.paused_reading for u in p.dp.uconns]
        received = 0
        while received < size + 38:
            chunk = await asyncio.wait_for(c.reader.read(1 << 20), 10)
            assert chunk
            received += len(chunk)
        c.close()
    finally:
        stop.set()
        await sampler
        await p.dp.shutdown(0.5)
    assert paused == [True]
    assert received == size + len(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
    # The proxy holds at most one upstream read beyond its high-water mark, however large the body.
    assert peak <= settings.limits.high_water + 1024 * 1024


async def test_large_request_body_to_slow_upstream_pauses_client(upstreams) -> None:  # type: ignore[no-untyped-def]
    gate = asyncio.Event()
    # An upstream that reads nothing of the body until the gate opens.
    received = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        await gate.wait()
        while received < 50 * 1024 * 1024:
            chunk = await reader.read(1 << 20)
            if not chunk:
                return
            received += len(chunk)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    settings = Settings(listen=("127.0.0.1", 0))
    p = await start_proxy(table([version("v1", url)], [simple_route(("v1", 1.0))]), settings)
    p.dp.health.forget(p.dp.backends["v1"].endpoints[0])
    try:
        c = await Client.open(p.port)
        size = 50 * 1024 * 1024
        c.writer.write(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"q" * (1 << 20)
        sent = 0
        peak = 0
        while sent < size:
            c.writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(c.writer.drain(), 0.3)
            except TimeoutError:
                break  # the proxy stopped reading: back-pressure reached the client
        for u in p.dp.uconns:
            if u.transport is not None:
                peak = max(peak, u.transport.get_write_buffer_size())
        assert sent < size
        assert peak <= settings.limits.high_water + 1024 * 1024
        gate.set()
        while sent < size:
            c.writer.write(chunk)
            sent += len(chunk)
            await c.writer.drain()
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert received == size
        c.close()
    finally:
        gate.set()
        await p.dp.shutdown(0.5)
        srv.close()


async def test_pipelined_local_answers_to_a_client_that_never_reads_stay_bounded(slow_body_proxy) -> None:  # type: ignore[no-untyped-def]
    p, _ = slow_body_proxy
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
        # Reading pauses at the bound; the connection stays open for the client to read its answers.
        assert (conn.closed, conn.transport.get_write_buffer_size() <= bound) == (False, True)
    finally:
        c.close()


async def test_pipelined_request_after_connection_close_is_never_forwarded(fast_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
    out = await raw_exchange(p.port, b"GET /first HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
                                     b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 ")
    assert [r.target for r in a.traffic] == ["/first"]


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
