"""HTTP/2 clients (curl, httpx, h2load) through turnout to HTTP/1.1 upstreams: ALPN h2 on a TLS listener,
prior-knowledge h2c on a cleartext one, each stream routed on its own (a 90/10 split exact within one
connection, a weight change reaching an open connection), flow control both ways with slow real peers,
and the graceful stop's GOAWAY."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from proxy.parse import parse_document
from proxy.settings import Certificate, Limits, Listener, Settings, TlsConfig
from proxy.table import RouteTable
from tests.dataplane.h2client import Closed, RawH2
from tests.dataplane.helpers import Proxy, Request, Upstream, ok, simple_route, start_proxy, table, version
from tests.tlscerts import API, CA, Pair


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await RawH2.close_all()

@pytest.fixture
def pair(tmp_path: Path) -> tuple[CA, Pair]:
    ca = CA(tmp_path)
    return ca, ca.issue("api", API)


def h2c_listener() -> Listener:
    return Listener("plain", ("127.0.0.1", 0), protocols=("http/1.1", "h2c"))


def h2_listener(p: Pair) -> Listener:
    return Listener("public", ("127.0.0.1", 0), tls=TlsConfig(certificates=(Certificate(str(p.cert), str(p.key)),)),
                    protocols=("h2", "http/1.1"))


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., asyncio.Future[Proxy]]]:
    started: list[Proxy] = []

    async def make(t: Any, *listeners: Listener, **settings: Any) -> Proxy:
        p = await start_proxy(t, Settings(listen=listeners[0].address, listeners=listeners, **settings))
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        await p.dp.shutdown(0.5)


async def curl(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_curl_http2_prior_knowledge_on_a_cleartext_h2c_listener_reaches_the_http1_upstream(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    rc, out, err = await curl("--http2-prior-knowledge", "-i", "-H", "X-Test: yes",
                              f"http://127.0.0.1:{p.port}/hello?x=1")
    assert (rc, err) == (0, "")
    assert out.startswith("HTTP/2 200")
    assert out.endswith("\r\n\r\na GET /hello?x=1")
    (req,) = a.traffic
    assert req.head.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % p.port)
    assert (req.header("x-test"), req.header("x-forwarded-proto"), req.header("x-turnout-route")) == (
        "yes", "http", "web")
    assert req.header("content-length") is None and req.header("transfer-encoding") is None


async def test_curl_http2_over_tls_negotiates_h2_by_alpn_and_posts_a_body_with_its_length(
        upstreams: Any, proxies: Any, pair: tuple[CA, Pair]) -> None:
    ca, cert = pair
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2_listener(cert))
    rc, out, err = await curl("--http2", "-i", "--cacert", str(ca.path), "--resolve", f"{API}:{p.port}:127.0.0.1",
                              "--data-binary", "x" * 100_000, f"https://{API}:{p.port}/up")
    assert (rc, err) == (0, "")
    assert out.startswith("HTTP/2 200")
    (req,) = a.traffic
    assert (req.method, req.header("content-length"), req.body) == ("POST", "100000", b"x" * 100_000)
    assert (req.header("x-forwarded-proto"), req.header("host")) == ("https", f"{API}:{p.port}")


async def test_a_tls_listener_without_h2_still_speaks_http1_to_curl_http2(
        upstreams: Any, proxies: Any, pair: tuple[CA, Pair]) -> None:
    ca, cert = pair
    a: Upstream = await upstreams(name="a")
    listener = Listener("public", ("127.0.0.1", 0),
                        tls=TlsConfig(certificates=(Certificate(str(cert.cert), str(cert.key)),)))
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), listener)
    rc, out, _ = await curl("--http2", "-i", "--cacert", str(ca.path), "--resolve", f"{API}:{p.port}:127.0.0.1",
                            f"https://{API}:{p.port}/")
    assert (rc, out.split("\r\n")[0]) == (0, "HTTP/1.1 200 OK")


async def test_an_http1_upgrade_to_h2c_is_proxied_as_a_plain_request_without_the_upgrade(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    rc, out, _ = await curl("--http2", "-i", f"http://127.0.0.1:{p.port}/u")
    assert (rc, out.split("\r\n")[0]) == (0, "HTTP/1.1 200 OK")
    (req,) = a.traffic
    assert (req.header("upgrade"), req.header("http2-settings"), req.header("connection")) == (None, None, None)


async def test_curl_chunked_upload_without_length_goes_upstream_chunked(upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    body = b"".join(b"line %d\n" % i for i in range(20_000))
    rc, out, _ = await curl("--http2-prior-knowledge", "-T", "-", f"http://127.0.0.1:{p.port}/put", stdin=body)
    assert (rc, out) == (0, "a PUT /put")
    (req,) = a.traffic
    assert (req.method, req.header("transfer-encoding"), req.header("content-length"), req.body) == (
        "PUT", "chunked", None, body)


async def test_httpx_http2_over_tls_gets_every_answer_on_one_http2_connection(
        upstreams: Any, proxies: Any, pair: tuple[CA, Pair]) -> None:
    ca, cert = pair
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2_listener(cert))
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.check_hostname = False  # the certificate names API; the chain is still verified
    async with httpx.AsyncClient(http2=True, verify=ctx, base_url=f"https://127.0.0.1:{p.port}") as c:
        rs = await asyncio.gather(*(c.get(f"/r{i}") for i in range(20)))
        conns = len(p.dp.conns)
    assert [(r.http_version, r.status_code, r.text) for r in rs] == [
        ("HTTP/2", 200, f"a GET /r{i}") for i in range(20)]
    assert (conns, len(a.traffic)) == (1, 20)


def two_versions(a: Upstream, b: Upstream, w1: float = 90.0, w2: float = 10.0, revision: int = 1) -> Any:
    return table([version("v1", a), version("v2", b)], [simple_route(("v1", w1), ("v2", w2))], revision)


async def test_h2load_every_request_succeeds_and_a_90_10_split_is_exact_per_request_within_one_connection(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    b: Upstream = await upstreams(name="b")
    p = await proxies(two_versions(a, b), h2c_listener())
    proc = await asyncio.create_subprocess_exec("h2load", "-n", "2000", "-c", "4", "-m", "20",
                                                f"http://127.0.0.1:{p.port}/", stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert "Application protocol: h2c" in out
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed", out), out
    assert (len(a.traffic), len(b.traffic)) == (1800, 200)
    # One connection, many streams at once: still every tenth request to v2.
    proc = await asyncio.create_subprocess_exec("h2load", "-n", "500", "-c", "1", "-m", "50",
                                                f"http://127.0.0.1:{p.port}/", stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert re.search(r"requests: 500 total, 500 started, 500 done, 500 succeeded", out), out
    assert (len(a.traffic), len(b.traffic)) == (1800 + 450, 200 + 50)


async def test_a_weight_change_reaches_an_open_h2_connection_on_its_next_request(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    b: Upstream = await upstreams(name="b")
    p = await proxies(two_versions(a, b), h2c_listener())
    c = await RawH2.open(p.port)
    first = [(await c.request(f"/{i}"))[2] for i in range(10)]
    assert sorted(x.split(b" ")[0] for x in first) == [b"a"] * 9 + [b"b"]
    p.set_table(two_versions(a, b, 0.0, 100.0, revision=2))
    assert (await c.request("/next"))[:3:2] == (200, b"b GET /next")
    p.set_table(two_versions(a, b, 100.0, 0.0, revision=3))
    assert (await c.request("/back"))[:3:2] == (200, b"a GET /back")
    assert len(p.dp.conns) == 1
    c.close()


def big_response(size: int, written: list[int]) -> Any:
    async def handler(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        chunk = b"z" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
            written[0] += len(chunk)
        return b""
    return handler


SMALL_BUFFERS = Limits(high_water=16 * 1024, low_water=4 * 1024)


async def test_a_slow_h2_reader_pauses_the_upstream_and_memory_stays_bounded(upstreams: Any, proxies: Any) -> None:
    size = 8 * 1024 * 1024
    written = [0]
    a: Upstream = await upstreams(big_response(size, written), name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener(), limits=SMALL_BUFFERS)
    c = await RawH2.open(p.port, ack_data=False)  # reads, but never hands back the window
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, c.headers("/big"), end_stream=True)
    await c.flush()
    await c.until(h2.events.ResponseReceived, stream_id=sid)
    await asyncio.sleep(1.0)
    while await c.read(0.2):
        pass
    (conn,) = p.dp.conns
    stream = conn.streams[sid]  # type: ignore[attr-defined]
    (up,) = p.dp.uconns
    # The client's window (65,535 bytes) is all that went out; what waits in the proxy is bounded by one
    # upstream read, and the upstream is paused, so it is blocked itself (never finished writing).
    assert len(c.bodies[sid]) == 65535
    assert stream.out_size <= 256 * 1024
    assert up.paused_reading is True  # type: ignore[attr-defined]
    assert written[0] < 2 * 1024 * 1024
    # Reading again: the whole body arrives.
    c.ack_data = True
    c.conn.acknowledge_received_data(c.unacked.pop(sid), sid)
    await c.flush()
    await c.until(h2.events.StreamEnded, timeout=30, stream_id=sid)
    assert (len(c.bodies[sid]), written[0]) == (size, size)
    c.close()


async def test_a_slow_upstream_reader_holds_the_h2_clients_window_closed(proxies: Any) -> None:
    size = 8 * 1024 * 1024
    got = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        head = await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        body = await reader.readexactly(size)
        writer.write(ok(b"done"))
        await writer.drain()
        got.set_result((head, body))
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tasks: list[asyncio.Task[None]] = []
    try:
        p = await proxies(table([version("v1", f"http://127.0.0.1:{port}")], [simple_route(("v1", 1.0))]),
                          h2c_listener(), limits=SMALL_BUFFERS)
        c = await RawH2.open(p.port)
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, c.headers("/up", method="POST", extra=[(b"content-length", b"%d" % size)]))
        sent = 0

        async def send_all() -> None:
            nonlocal sent
            while sent < size and not c.closed:
                room = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size, size - sent)
                if room <= 0:
                    await c.read(10)
                    continue
                c.conn.send_data(sid, b"u" * room, end_stream=sent + room == size)
                sent += room
                await c.flush()

        task = asyncio.create_task(send_all())
        tasks.append(task)
        await asyncio.sleep(1.0)
        stalled = sent
        assert not task.done()
        (conn,) = p.dp.conns
        stream = conn.streams[sid]  # type: ignore[attr-defined]
        (up,) = p.dp.uconns
        assert up.transport is not None
        # The proxy handed back only what it wrote upstream before the upstream filled up (the rest of what
        # the client sent is in the kernel's socket buffers): in the proxy, the upstream's write buffer is
        # bounded by its high-water mark plus one window, and the client's window stays shut.
        assert stalled < size
        assert stream.up_full is True
        assert c.conn.local_flow_control_window(sid) == 0
        assert stream.unacked <= 65535
        assert up.transport.get_write_buffer_size() <= SMALL_BUFFERS.high_water + 2 * 65535
        await asyncio.sleep(0.3)
        assert sent == stalled
        release.set()
        await asyncio.wait_for(task, 30)
        status, _, body = await c.response(sid, timeout=30)
        head, upbody = await asyncio.wait_for(got, 30)
        assert (status, body, len(upbody), b"Content-Length: %d" % size in head) == (200, b"done", size, True)
        c.close()
    finally:
        for t in tasks:
            t.cancel()
        release.set()
        server.close()


async def test_a_graceful_stop_sends_goaway_with_the_last_stream_and_lets_it_finish(upstreams: Any) -> None:
    async def slow(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        await asyncio.sleep(1.5)
        return ok(b"late")

    a: Upstream = await upstreams(slow, name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), listeners=(h2c_listener(),)))
    c = await RawH2.open(p.port)
    assert (await c.request("/first"))[0] == 200  # stream 1
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, c.headers("/slow"), end_stream=True)
    await c.flush()
    await asyncio.sleep(0.2)
    stop = asyncio.create_task(p.dp.shutdown(5.0))
    goaway = await c.until(h2.events.ConnectionTerminated, timeout=5)
    assert (goaway.error_code, goaway.last_stream_id) == (0, sid)  # type: ignore[attr-defined]
    status, _, body = await c.response(sid)
    assert (status, body) == (200, b"late")
    await c.until(Closed, timeout=5)
    await asyncio.wait_for(stop, 5)


async def test_response_header_edits_reach_an_http2_client(upstreams: Any, proxies: Any) -> None:
    # A route's and a version's response header edits apply to the structured (HTTP/2) response too, not only
    # to the HTTP/1.1 bytes an upstream's head becomes.
    a: Upstream = await upstreams(name="a")
    doc = {"versions": {"v1": {"endpoints": [a.url]}},
           "routes": [{"name": "web", "split": {"v1": 1},
                       "filters": {"response_headers": {"set": {"X-Edited": "yes"}}},
                       "version_filters": {"v1": {"response_headers": {"add": {"X-Version-Edit": "v1"}}}}}]}
    p = await proxies(RouteTable(parse_document(doc), 1), h2c_listener())
    rc, out, err = await curl("--http2-prior-knowledge", "-i", f"http://127.0.0.1:{p.port}/")
    assert (rc, err) == (0, "")
    head = [ln.strip() for ln in out.split("\r\n\r\n")[0].lower().splitlines()]
    assert (head[0], "x-edited: yes" in head, "x-version-edit: v1" in head) == ("http/2 200", True, True)
