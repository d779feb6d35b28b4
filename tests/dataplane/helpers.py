"""Real local upstreams that record exactly what they received, and a raw HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.listener import DataPlane, start_dataplane
from proxy.model import HealthCheck, Match, Route, State, Version, VersionSpec
from proxy.settings import Limits, Settings, Timeouts
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

# Long body timeout on purpose: a bound must not be "met" by the 408 that body_read_idle gives later.
SLOW_BODY = Timeouts(header_read=2.0, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=2.0,
                     upstream_idle=2.0, body_read_idle=60.0)
SMALL = Limits(max_header_bytes=4096, high_water=16 * 1024, low_water=4 * 1024)
# Short client-side timeouts: a refusal shows before the test's own timeouts.
FAST = Timeouts(header_read=0.5, keepalive_idle=5.0, upstream_connect=1.0, upstream_response=2.0,
                upstream_idle=2.0, body_read_idle=1.0)

# The start of a POST to the "app" host of slow_body_proxy and fast_proxy (conftest).
POST = b"POST / HTTP/1.1\r\nHost: app\r\n"


@dataclass
class Request:
    head: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    conn: int = 0  # which accepted connection carried it

    def header(self, name: str) -> str | None:
        vals = [v for n, v in self.headers if n.lower() == name]
        return ", ".join(vals) if vals else None

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.headers if n.lower() == name)


Handler = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bytes | None]]


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            n, _, v = line.partition(":")
            headers.append((n.strip(), v.strip()))
    return lines[0], headers


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    body = b""
    raw = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.strip().split(b";")[0], 16)
        if size == 0:
            end = await reader.readuntil(b"\r\n")
            raw += end
            return body, raw
        data = await reader.readexactly(size + 2)
        raw += data
        body += data[:-2]


@dataclass
class Upstream:
    """An HTTP/1.1 server on 127.0.0.1 that records each request and answers with `handler`."""

    handler: Handler | None = None
    name: str = "up"
    requests: list[Request] = field(default_factory=list)
    accepts: int = 0
    server: asyncio.AbstractServer | None = None
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    partial: list[bytes] = field(default_factory=list)  # bytes of requests that never completed

    @property
    def nothing_received(self) -> bool:
        return not self.traffic and not self.partial

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traffic(self) -> list[Request]:
        return [r for r in self.requests if r.target != "/healthz"]

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.transport.abort()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        conn_no = self.accepts
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await read_head(reader)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        self.partial.append(e.partial)
                    return
                except ConnectionError:
                    return
                line, headers = parse_head(head)
                method, target, _ = line.split(" ", 2)
                hmap = {n.lower(): v for n, v in headers}
                body = b""
                raw = head
                try:
                    if "content-length" in hmap:
                        body = await reader.readexactly(int(hmap["content-length"]))
                        raw += body
                    elif hmap.get("transfer-encoding") == "chunked":
                        body, rawbody = await read_chunked(reader)
                        raw += rawbody
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                    self.partial.append(head)  # a head whose body never completed reached us too
                    return
                req = Request(head, method, target, headers, body, raw, conn_no)
                self.requests.append(req)
                if target == "/healthz":
                    writer.write(ok(b"healthy"))
                    continue
                if self.handler is None:
                    writer.write(ok(f"{self.name} {method} {target}".encode()))
                else:
                    resp = await self.handler(req, reader, writer)
                    if resp is None:
                        return
                    writer.write(resp)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def version(name: str, *ups: Upstream | str, interval: float = 60.0) -> Version:
    urls = tuple(u if isinstance(u, str) else u.url for u in ups)
    spec = VersionSpec(kind="static", endpoints=urls, health=HealthCheck(path="/healthz", interval=interval,
                                                                          timeout=0.5))
    return Version(name=name, spec=spec, endpoints=urls)


def table(versions: list[Version], routes: list[Route], revision: int = 1) -> RouteTable:
    return RouteTable(State(versions={v.name: v for v in versions}, routes=tuple(routes)), revision)


def simple_route(*split: tuple[str, float], **kw: object) -> Route:
    kw.setdefault("match", Match())
    return Route(name=str(kw.pop("name", "web")), split=tuple(split), **kw)  # type: ignore[arg-type]


@dataclass
class Proxy:
    dp: DataPlane
    holder: TableHolder
    stats: Stats

    @property
    def port(self) -> int:
        return self.dp.port

    def set_table(self, t: RouteTable) -> None:
        self.holder.offer(t)
        self.dp.table_changed(t)


async def start_proxy(t: RouteTable, settings: Settings | None = None) -> Proxy:
    settings = settings or Settings(listen=("127.0.0.1", 0))
    holder = TableHolder(t)
    stats = Stats()
    dp = await start_dataplane(settings, holder, stats)
    return Proxy(dp, holder, stats)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        vals = [v for n, v in self.headers if n.lower() == name]
        return ", ".join(vals) if vals else None


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    line, headers = parse_head(head)
    status = int(line.split(" ")[1])
    hmap = {n.lower(): v for n, v in headers}
    if head_request or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "content-length" in hmap:
        body = await reader.readexactly(int(hmap["content-length"]))
    elif hmap.get("transfer-encoding") == "chunked":
        body, _ = await read_chunked(reader)
    else:
        body = await reader.read()
    return Response(status, headers, body, head)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, data: bytes, head: bool = False) -> Response:
        await self.send(data)
        return await asyncio.wait_for(read_response(self.reader, head), 5)

    async def get(self, path: str = "/", host: str = "app", extra: str = "") -> Response:
        return await self.request(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the proxy closed (or reset) the connection; reads and discards what is left."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        self.writer.transport.abort()


async def shrink_buffers(p: Proxy, c: Client, size: int = 4096) -> ClientConnection:
    """Small kernel buffers on both sides of the client's only connection, so whatever the client does not
    read piles up in the proxy's own write buffer, where the tests can see the proxy bound it.
    Returns the proxy's side of the connection."""
    c.writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    for _ in range(100):
        if p.dp.conns:
            break
        await asyncio.sleep(0.01)
    (conn,) = p.dp.conns
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return conn
