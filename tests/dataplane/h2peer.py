"""A real HTTP/2 server for upstream tests, on the sans-IO `h2` library: h2c (prior knowledge) or TLS with
ALPN h2. It records every request (headers, body, whether it ended) and answers with a handler that can
stream data, send trailers, hold the response, reset the stream, or send GOAWAY."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame


@dataclass
class H2Request:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    conn: int
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the error code of a RST_STREAM the peer (the proxy) sent
    done: asyncio.Event = field(default_factory=asyncio.Event)  # END_STREAM or reset

    def header(self, name: str) -> str | None:
        vals = [v.decode() for n, v in self.headers if n == name.encode()]
        return ", ".join(vals) if vals else None


class Reply:
    """What a handler uses to answer one request."""

    def __init__(self, conn: _Conn, req: H2Request) -> None:
        self.conn = conn
        self.req = req

    def head(self, status: int = 200, headers: list[tuple[str, str]] | None = None, end: bool = False) -> None:
        h = [(":status", str(status)), *(headers or [])]
        self.conn.h2.send_headers(self.req.stream_id, [(n.encode(), v.encode()) for n, v in h], end_stream=end)
        self.conn.flush()

    async def data(self, data: bytes, end: bool = False) -> None:
        """Send data as the proxy's window allows (waits for WINDOW_UPDATEs)."""
        sid = self.req.stream_id
        h2 = self.conn.h2
        view = memoryview(data)
        while view:
            window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if window <= 0:
                self.conn.window_open.clear()
                await self.conn.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            h2.send_data(sid, bytes(chunk))
            self.conn.sent += len(chunk)
            self.conn.flush()
        if end:
            h2.end_stream(sid)
            self.conn.flush()

    def trailers(self, headers: list[tuple[str, str]]) -> None:
        self.conn.h2.send_headers(self.req.stream_id, [(n.encode(), v.encode()) for n, v in headers],
                                  end_stream=True)
        self.conn.flush()

    def reset(self, code: int = ErrorCodes.REFUSED_STREAM) -> None:
        self.conn.h2.reset_stream(self.req.stream_id, code)
        self.conn.flush()

    def goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY, written as a raw frame: h2's close_connection would also stop this side from
        answering the streams at or below last_stream_id, which a graceful shutdown still does."""
        f = GoAwayFrame(0)
        f.last_stream_id = last_stream_id
        f.error_code = 0
        self.conn.flush()
        assert self.conn.transport is not None
        self.conn.transport.write(f.serialize())


Handler = Callable[[H2Request, Reply], Awaitable[None]]


async def echo(req: H2Request, reply: Reply) -> None:
    """Wait for the whole request; answer 200 with its path and body length."""
    await req.done.wait()
    body = b"%s %d" % (req.header(":path").encode() if req.header(":path") else b"", len(req.body))
    reply.head(200, [("content-length", str(len(body))), ("x-peer", "h2")])
    await reply.data(body, end=True)


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2Server, n: int) -> None:
        self.server = server
        self.n = n
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, H2Request] = {}
        self.window_open = asyncio.Event()
        self.sent = 0
        self.ack = True  # acknowledge request data (open the proxy's window) as it arrives
        self.unacked: list[tuple[int, int]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = {SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams}
        if self.server.initial_window is not None:
            settings[SettingCodes.INITIAL_WINDOW_SIZE] = self.server.initial_window
        # Initial values, not update(): an update would only be announced after the preface's SETTINGS.
        self.h2.local_settings = Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open -= 1
        for t in self.tasks:
            t.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception:
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                req = H2Request(ev.stream_id or 0, list(ev.headers or []), self.n)  # type: ignore[arg-type]
                self.requests[req.stream_id] = req
                if req.header(":path") != "/healthz" or self.server.record_checks:
                    if self.n < 0:  # connections are numbered in the order they carried a first request
                        self.n = req.conn = len(self.server.used)
                        self.server.used.append(self)
                    req.conn = self.n
                if req.header(":path") == "/healthz" and not self.server.record_checks:
                    # The proxy's active checks (healthy unless a test records them), on their own connection.
                    self.server.checks += 1
                    self.h2.send_headers(req.stream_id, [(b":status", b"200")], end_stream=True)
                    continue
                self.server.requests.append(req)
                task = asyncio.get_running_loop().create_task(self.server.handler(req, Reply(self, req)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(ev, DataReceived):
                req = self.requests[ev.stream_id or 0]
                req.body += ev.data or b""
                if self.ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id or 0)
                else:
                    self.unacked.append((ev.flow_controlled_length or 0, ev.stream_id or 0))
            elif isinstance(ev, StreamEnded):
                req = self.requests[ev.stream_id or 0]
                req.ended = True
                req.done.set()
            elif isinstance(ev, StreamReset):
                req = self.requests.get(ev.stream_id or 0)
                if req is not None:
                    req.reset = int(ev.error_code or 0)
                    req.done.set()
            elif isinstance(ev, WindowUpdated):
                self.window_open.set()
            elif isinstance(ev, ConnectionTerminated) and self.transport is not None:
                self.transport.close()
        self.flush()

    def release(self) -> None:
        """Acknowledge what was held back (with ack = False) and from now on everything."""
        self.ack = True
        for n, sid in self.unacked:
            with contextlib.suppress(Exception):
                self.h2.acknowledge_received_data(n, sid)
        self.unacked = []
        self.flush()


class H2Server:
    def __init__(self, handler: Handler = echo, max_streams: int = 100, tls: ssl.SSLContext | None = None,
                 initial_window: int | None = None, record_checks: bool = False) -> None:
        self.handler = handler
        self.record_checks = record_checks
        self.checks = 0
        self.max_streams = max_streams
        self.tls = tls
        self.initial_window = initial_window
        self.requests: list[H2Request] = []
        self.conns: list[_Conn] = []  # every accepted connection
        self.used: list[_Conn] = []  # those that carried a request other than a health check, in order
        self.open = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _make(self) -> _Conn:
        c = _Conn(self, -1)
        self.conns.append(c)
        self.open += 1
        return c

    async def start(self) -> H2Server:
        self.server = await asyncio.get_running_loop().create_server(self._make, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in self.conns:
                if c.transport is not None:
                    c.transport.abort()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


def tls_context(cert: str, key: str, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(list(alpn))
    return ctx
