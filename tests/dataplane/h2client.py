"""A raw HTTP/2 client for tests: the `h2` library's client side over a real socket, so a test can write
any frame (also ones a real client never would) and see every frame the proxy answers with."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.connection import ConnectionState
from h2.settings import SettingCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Closed(h2.events.Event):
    """The proxy closed the connection."""


class RawH2:
    # Every client opened, so a test module's fixture can close what a test left open (see close_all).
    opened: list[RawH2] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, window: int | None = None,
                 ack_data: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        # No validation or normalisation: a test may send what a correct client never would.
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                           normalize_outbound_headers=False, validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.ack_data = ack_data  # hand back the window of every DATA frame at once
        self.events: list[h2.events.Event] = []
        self.closed = False  # read EOF or reset
        self.write_failed = False
        self.bodies: dict[int, bytearray] = {}
        self.unacked: dict[int, int] = {}
        self.buf = b""
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})

    @classmethod
    async def open(cls, port: int, ssl_ctx: ssl.SSLContext | None = None, server_hostname: str | None = None,
                   **kw: Any) -> RawH2:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx, server_hostname=server_hostname)
        c = cls(r, w, **kw)
        cls.opened.append(c)
        await c.flush()
        return c

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def write_raw(self, data: bytes) -> bool:
        """Bytes past the h2 state machine; False once the proxy closed the connection."""
        if self.closed or self.write_failed or self.writer.is_closing():
            return False
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            self.write_failed = True  # what the proxy sent before it closed can still be read
            return False
        return True

    async def read(self, timeout: float = 5.0) -> list[h2.events.Event]:
        """The events of the next read (a Closed event at EOF or reset)."""
        if self.closed:
            return []
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return []
        except (ConnectionError, asyncio.IncompleteReadError):
            data = b""
        if not data:
            self.closed = True
            ev: list[h2.events.Event] = [Closed()]
            self.events.extend(ev)
            return ev
        events = []
        # Fed a frame at a time: after a GOAWAY, h2 refuses every frame, but the streams it did not cancel go on
        # (RFC 9113 6.8), so the state machine is put back to open.
        buf = self.buf + data
        while len(buf) >= 9:
            end = 9 + int.from_bytes(buf[:3], "big")
            if len(buf) < end:
                break
            frame, buf = buf[:end], buf[end:]
            try:
                got = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError as e:
                raise AssertionError(f"the proxy broke the protocol: {e}") from e
            events.extend(got)
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in got):
                self.conn.state_machine.state = ConnectionState.CLIENT_OPEN
        self.buf = buf
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                self.bodies.setdefault(e.stream_id, bytearray()).extend(e.data)
                if self.ack_data:
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                else:
                    self.unacked[e.stream_id] = self.unacked.get(e.stream_id, 0) + e.flow_controlled_length
        self.events.extend(events)
        await self.flush()
        return events

    async def until(self, kind: type[h2.events.Event], timeout: float = 5.0, **attrs: Any) -> h2.events.Event:
        """Read until an event of `kind` (with these attribute values) arrived, or the connection closed."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events[seen:]:
                    if isinstance(e, kind) and all(getattr(e, k) == v for k, v in attrs.items()):
                        return e
                    if isinstance(e, Closed) and kind is not Closed:
                        raise AssertionError(f"closed before {kind.__name__}; events: {self.events}")
                seen = len(self.events)
                if self.closed:
                    raise AssertionError(f"closed before {kind.__name__}; events: {self.events}")
                await self.read(timeout)

    def headers(self, path: str = "/", authority: str = "app", method: str = "GET",
                extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        return [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode()),
                (b":path", path.encode()), *(extra or [])]

    async def request(self, path: str = "/", authority: str = "app", method: str = "GET",
                      extra: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
                      timeout: float = 5.0) -> tuple[int, dict[bytes, bytes], bytes]:
        """One request on a new stream, to its end: (status, response headers, body)."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, self.headers(path, authority, method, extra), end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        await self.flush()
        return await self.response(sid, timeout)

    async def response(self, sid: int, timeout: float = 5.0) -> tuple[int, dict[bytes, bytes], bytes]:
        resp = await self.until(h2.events.ResponseReceived, timeout, stream_id=sid)
        await self.until(h2.events.StreamEnded, timeout, stream_id=sid)
        head = dict(resp.headers)  # type: ignore[attr-defined]
        return int(head[b":status"]), head, bytes(self.bodies.get(sid, b""))

    def close(self) -> None:
        self.writer.transport.abort()
        self.writer.close()

    @classmethod
    async def close_all(cls) -> None:
        for c in cls.opened:
            c.close()
            with contextlib.suppress(Exception):
                await c.writer.wait_closed()
        cls.opened.clear()
