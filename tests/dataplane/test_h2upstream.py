"""HTTP/1 clients through turnout to real HTTP/2 upstreams (h2c and h2 over TLS), on a server written on the
`h2` library (tests.dataplane.h2peer): framing both ways, trailers, shared connections, GOAWAY and
REFUSED_STREAM replays, flow control, timeouts, grpc-timeout and the proxy's gRPC answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from proxy.dataplane.flow import P_UPSTREAM
from proxy.dataplane.h2upstream import H2Pool
from proxy.model import HealthCheck, UpstreamTLS, Version, VersionSpec
from proxy.settings import Limits, Settings, Timeouts
from tests.dataplane.h2peer import H2Request, H2Server, Reply, echo, tls_context
from tests.dataplane.helpers import (
    Client,
    Proxy,
    read_response,
    shrink_buffers,
    simple_route,
    start_proxy,
    table,
)
from tests.upstream_certs import Certs, make_certs

TIMEOUTS = Timeouts(header_read=2.0, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=1.0,
                    upstream_idle=1.0, body_read_idle=2.0)
SMALL = Limits(high_water=16 * 1024, low_water=4 * 1024)


def h2version(name: str, *urls: str, protocol: str = "h2c", tls: UpstreamTLS | None = None,
              health: HealthCheck | None = None) -> Version:
    spec = VersionSpec(kind="static", endpoints=urls, protocol=protocol, tls=tls,  # type: ignore[arg-type]
                       health=health or HealthCheck(path="/healthz", interval=60.0, timeout=0.5))
    return Version(name=name, spec=spec, endpoints=urls)


def no_checks(p: Proxy) -> None:
    """Stop the active checks (which fail too against these upstreams): the test is about what requests get."""
    for ep in p.dp.endpoints.values():
        p.dp.health.forget(ep)
        ep.checked(True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(Path(tmp_path_factory.mktemp("h2certs")))


class Env:
    def __init__(self) -> None:
        self.servers: list[H2Server] = []
        self.proxies: list[Proxy] = []

    async def server(self, handler=echo, **kw) -> H2Server:  # type: ignore[no-untyped-def]
        s = await H2Server(handler, **kw).start()
        self.servers.append(s)
        return s

    async def proxy(self, *versions: Version, limits: Limits | None = None, **route: object) -> Proxy:
        split = route.pop("split", None) or [(versions[0].name, 1.0)]
        settings = Settings(listen=("127.0.0.1", 0), timeouts=TIMEOUTS, limits=limits or Limits())
        p = await start_proxy(table(list(versions), [simple_route(*split, **route)]), settings)  # type: ignore[arg-type]
        self.proxies.append(p)
        return p


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    yield e
    for p in e.proxies:
        await p.dp.shutdown(0.1)
    for s in e.servers:
        await s.stop()


async def test_get_and_post_reach_an_h2c_upstream_with_the_proxys_lines(env: Env) -> None:
    s = await env.server()
    p = await env.proxy(h2version("v1", s.url), expose_version=True)
    c = await Client.open(p.port)
    r = await c.get("/a?b=1", extra="X-Custom: yes\r\nConnection: keep-alive\r\n")
    assert (r.status, r.body, r.header("x-peer"), r.header("x-turnout-version")) == (200, b"/a?b=1 0", "h2", "v1")
    req = s.requests[0]
    assert (req.header(":method"), req.header(":scheme"), req.header(":authority"), req.header(":path")) == (
        "GET", "http", "app", "/a?b=1")
    assert (req.header("x-custom"), req.header("x-forwarded-for"), req.header("x-turnout-route"),
            req.header("x-turnout-version"), req.header("connection"), req.header("host")) == (
        "yes", "127.0.0.1", "web", "v1", None, None)
    # A Content-Length body and a chunked one, on the same keep-alive client connection.
    r = await c.request(b"POST /p HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
    assert (r.status, r.body) == (200, b"/p 5")
    r = await c.request(b"POST /q HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert (r.status, r.body) == (200, b"/q 7")
    assert [(bytes(q.body), q.ended, q.header("content-length")) for q in s.requests[1:]] == [
        (b"hello", True, "5"), (b"abcdefg", True, None)]
    # Three requests, one connection to the upstream.
    assert (len(s.used), s.requests[2].conn) == (1, 0)
    c.close()


async def test_response_without_length_is_chunked_and_trailers_need_te(env: Env) -> None:
    async def streamer(req: H2Request, reply: Reply) -> None:
        await req.done.wait()
        reply.head(200, [("content-type", "text/plain")])
        await reply.data(b"part1-")
        await reply.data(b"part2")
        reply.trailers([("x-checksum", "abc")])

    s = await env.server(streamer)
    p = await env.proxy(h2version("v1", s.url))
    c = await Client.open(p.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: app\r\nTE: trailers\r\n\r\n")
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert b"transfer-encoding: chunked" in head.lower()
    rest = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert rest == b"6\r\npart1-\r\n5\r\npart2\r\n0\r\nx-checksum: abc\r\n\r\n"
    assert s.requests[0].header("te") == "trailers"
    # Without TE: trailers the client gets none (and the upstream no te).
    r = await c.get("/")
    assert (r.status, r.body, r.header("x-checksum")) == (200, b"part1-part2", None)
    assert s.requests[1].header("te") is None
    c.close()


async def test_httpx_client_through_to_an_h2_tls_upstream(env: Env, certs: Certs) -> None:
    s = await env.server(tls=tls_context(certs.server.cert, certs.server.key))
    p = await env.proxy(h2version("v1", s.url, protocol="h2", tls=UpstreamTLS(ca=certs.ca)))
    no_checks(p)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as client:
        r = await client.post("/tls", content=b"x" * 1000, headers={"host": "app"})
    assert (r.status_code, r.text, r.http_version) == (200, "/tls 1000", "HTTP/1.1")
    assert (s.requests[0].header(":scheme"), len(s.requests[0].body)) == ("https", 1000)


async def test_h2_version_whose_server_only_speaks_http11_fails_alpn(env: Env, certs: Certs) -> None:
    s = await env.server(tls=tls_context(certs.server.cert, certs.server.key, alpn=("http/1.1",)))
    p = await env.proxy(h2version("v1", s.url, protocol="h2", tls=UpstreamTLS(ca=certs.ca)))
    no_checks(p)
    c = await Client.open(p.port)
    r = await c.get("/")
    assert (r.status, s.requests) == (502, [])
    assert p.stats.upstream_errors == {("v1", "tls"): 1}
    c.close()


async def test_h2c_version_pointing_at_an_http1_server_is_an_invalid_response(env: Env) -> None:
    async def http1_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http1_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        p = await env.proxy(h2version("v1", f"http://127.0.0.1:{port}"))
        no_checks(p)
        c = await Client.open(p.port)
        r = await c.get("/")
        assert r.status == 502
        assert p.stats.upstream_errors == {("v1", "invalid_response"): 1}
        # A gRPC call gets a gRPC answer: INTERNAL for an invalid upstream response.
        r = await c.request(b"POST /pkg.S/M HTTP/1.1\r\nHost: app\r\nContent-Type: application/grpc\r\n"
                            b"Content-Length: 0\r\n\r\n")
        assert (r.status, r.header("grpc-status"), r.header("grpc-message")) == (
            200, "13", "invalid upstream response")
        c.close()
    finally:
        server.close()


async def test_streams_share_connections_up_to_the_peers_limit(env: Env) -> None:
    release = asyncio.Event()

    async def held(req: H2Request, reply: Reply) -> None:
        await release.wait()
        await echo(req, reply)

    s = await env.server(held, max_streams=2)
    p = await env.proxy(h2version("v1", s.url))
    clients = [await Client.open(p.port) for _ in range(5)]
    for i, c in enumerate(clients):
        await c.send(f"GET /{i} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
    for _ in range(100):
        if len(s.requests) == 5:
            break
        await asyncio.sleep(0.01)
    # Five streams at two per connection: three connections, never a third stream on one.
    assert sorted(r.conn for r in s.requests) == [0, 0, 1, 1, 2]
    release.set()
    bodies = [(await asyncio.wait_for(read_response(c.reader), 5)).body for c in clients]
    assert bodies == [f"/{i} 0".encode() for i in range(5)]
    (pool,) = [ep.mux for ep in p.dp.endpoints.values()]
    assert isinstance(pool, H2Pool)
    assert repr(pool) == f"<H2Pool 127.0.0.1:{s.port} [Connections: 3 open, 0 opening | Streams: 0 active, 0 waiting]>"
    for c in clients:
        c.close()


async def test_goaway_replays_streams_the_upstream_did_not_process_even_a_post(env: Env) -> None:
    first = asyncio.Event()

    async def handler(req: H2Request, reply: Reply) -> None:
        if req.conn == 0 and req.stream_id == 1:
            first.set()
            await asyncio.sleep(0.2)
            await echo(req, reply)
        elif req.conn == 0:
            # The second stream arrives: shut down gracefully, having processed only stream 1.
            reply.goaway(last_stream_id=1)
        else:
            await echo(req, reply)

    s = await env.server(handler)
    p = await env.proxy(h2version("v1", s.url))
    a, b = await Client.open(p.port), await Client.open(p.port)
    await a.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
    await asyncio.wait_for(first.wait(), 5)
    rb = await b.request(b"POST /once HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc")
    ra = await asyncio.wait_for(read_response(a.reader), 5)
    assert (ra.status, ra.body, rb.status, rb.body) == (200, b"/slow 0", 200, b"/once 3")
    # The POST reached a handler twice only as far as frames go: the first connection never processed it.
    assert [(r.conn, r.header(":path")) for r in s.requests] == [(0, "/slow"), (0, "/once"), (1, "/once")]
    assert p.stats.retries == {"web": 1}
    a.close()
    b.close()


async def test_refused_stream_is_replayed(env: Env) -> None:
    async def handler(req: H2Request, reply: Reply) -> None:
        if len(s.requests) == 1:
            reply.reset()  # REFUSED_STREAM: not processed
        else:
            await echo(req, reply)

    s = await env.server(handler)
    p = await env.proxy(h2version("v1", s.url))
    c = await Client.open(p.port)
    r = await c.request(b"POST /r HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nok")
    assert (r.status, r.body, len(s.requests)) == (200, b"/r 2", 2)
    c.close()


async def test_a_client_that_does_not_read_holds_the_upstreams_window_closed(env: Env) -> None:
    size = 4 * 1024 * 1024

    async def big(req: H2Request, reply: Reply) -> None:
        reply.head(200, [("content-length", str(size))])
        await reply.data(b"x" * size, end=True)

    s = await env.server(big)
    p = await env.proxy(h2version("v1", s.url), limits=SMALL)
    c = await Client.open(p.port)
    await shrink_buffers(p, c)
    await c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    await asyncio.sleep(0.5)
    # Sent while the client reads nothing: the stream's window (16 KiB) plus what the proxy acknowledged
    # before its client-side buffer filled, far below the 4 MiB answer.
    sent = s.used[0].sent
    assert sent < 512 * 1024, sent
    (pool,) = [ep.mux for ep in p.dp.endpoints.values()]
    assert isinstance(pool, H2Pool)
    (stream,) = pool.conns[0].streams.values()
    # Held back: what arrived while the client's buffer was full is not acknowledged, so the upstream's
    # window for the stream is closed.
    assert (stream.paused_reading, stream.unacked > 0, pool.conns[0].h2.remote_flow_control_window(stream.sid)) == (
        True, True, 0)
    c.close()


async def test_an_upstream_that_does_not_take_the_body_pauses_the_clients_reading(env: Env) -> None:
    s = await env.server(initial_window=65535)
    p = await env.proxy(h2version("v1", s.url), limits=SMALL)
    c = await Client.open(p.port)
    body = b"y" * (1024 * 1024)
    await c.send(b"POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % len(body))
    for _ in range(100):
        if s.used:
            break
        await asyncio.sleep(0.01)
    s.used[0].ack = False
    c.writer.write(body)
    await asyncio.sleep(0.5)
    (conn,) = p.dp.conns
    assert conn.paused & P_UPSTREAM  # type: ignore[attr-defined]
    got = len(s.requests[0].body)
    assert got <= 65535, got  # the upstream's window, not more
    s.used[0].release()
    r = await asyncio.wait_for(read_response(c.reader), 5)
    assert (r.status, r.body, len(s.requests[0].body)) == (200, b"/up %d" % len(body), len(body))
    c.close()


async def test_no_answer_is_a_504_and_counts_against_the_endpoint(env: Env) -> None:
    async def never(req: H2Request, reply: Reply) -> None:
        await asyncio.sleep(30)

    s = await env.server(never)
    p = await env.proxy(h2version("v1", s.url))
    c = await Client.open(p.port)
    t0 = time.monotonic()
    r = await c.get("/")
    assert (r.status, round(time.monotonic() - t0)) == (504, 1)
    (ep,) = p.dp.endpoints.values()
    assert (ep.failures, p.stats.upstream_errors) == (1, {("v1", "timeout"): 1})
    for _ in range(50):
        if s.requests[0].reset is not None:
            break
        await asyncio.sleep(0.01)
    assert s.requests[0].reset == 8  # CANCEL: the upstream may stop working on it
    c.close()


async def test_grpc_timeout_shorter_than_the_configured_one_is_the_deadline(env: Env) -> None:
    async def slow(req: H2Request, reply: Reply) -> None:
        await asyncio.sleep(30)

    s = await env.server(slow)
    p = await env.proxy(h2version("v1", s.url))
    c = await Client.open(p.port)
    t0 = time.monotonic()
    r = await c.request(b"POST /pkg.Svc/Slow HTTP/1.1\r\nHost: app\r\nContent-Type: application/grpc\r\n"
                        b"grpc-timeout: 200m\r\nTE: trailers\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00")
    took = time.monotonic() - t0
    assert (r.status, r.header("grpc-status"), r.header("grpc-message")) == (
        200, "4", "deadline exceeded (grpc-timeout)")
    assert 0.15 < took < 0.6, took  # the call's 200 ms, not upstream_response (1 s)
    (ep,) = p.dp.endpoints.values()
    # The client's own deadline says nothing about the endpoint: no failure counted against it.
    assert (ep.failures, p.stats.grpc) == (0, {("web", "v1", "4", ""): 1})
    assert p.stats.cells["web"]["v1"].grpc_errors == 1
    assert s.requests[0].header("grpc-timeout") == "200m"
    c.close()


async def test_grpc_status_counts_from_trailers(env: Env) -> None:
    async def grpc_like(req: H2Request, reply: Reply) -> None:
        await req.done.wait()
        code = "0" if req.header(":path") == "/pkg.S/Ok" else "5" if req.header(":path") == "/pkg.S/Missing" else "13"
        reply.head(200, [("content-type", "application/grpc")])
        await reply.data(b"\x00\x00\x00\x00\x00")
        reply.trailers([("grpc-status", code)])

    s = await env.server(grpc_like)
    p = await env.proxy(h2version("v1", s.url), grpc_method_label=True)
    c = await Client.open(p.port)
    for method in ("Ok", "Missing", "Broken", "Ok"):
        r = await c.request(f"POST /pkg.S/{method} HTTP/1.1\r\nHost: app\r\nContent-Type: application/grpc\r\n"
                            "Content-Length: 0\r\n\r\n".encode())
        assert r.status == 200
    assert p.stats.grpc == {("web", "v1", "0", "/pkg.S/Ok"): 2, ("web", "v1", "5", "/pkg.S/Missing"): 1,
                            ("web", "v1", "13", "/pkg.S/Broken"): 1}
    # NOT_FOUND is the caller's business; INTERNAL is an error of the version.
    assert p.stats.cells["web"]["v1"].grpc_errors == 1
    c.close()


async def test_h2c_version_is_health_checked_over_http2(env: Env) -> None:
    async def health(req: H2Request, reply: Reply) -> None:
        await req.done.wait()
        reply.head(503 if req.header(":path") == "/healthz" else 200, [("content-length", "0")], end=True)

    s = await env.server(health, record_checks=True)
    v = h2version("v1", s.url, health=HealthCheck(path="/healthz", interval=0.1, timeout=0.5))
    p = await env.proxy(v)
    (ep,) = p.dp.endpoints.values()
    for _ in range(100):
        if not ep.active_ok:
            break
        await asyncio.sleep(0.02)
    assert (ep.active_ok, s.requests[0].header(":path"), s.requests[0].header(":method")) == (False, "/healthz", "GET")
    c = await Client.open(p.port)
    assert (await c.get("/")).status == 503
    c.close()
