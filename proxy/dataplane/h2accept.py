"""How a client connection becomes HTTP/2: ALPN h2 on a TLS listener (h2_takeover, from the HTTP/1 connection
the handshake completed on), and the HTTP/2 preface on a cleartext listener that takes h2c (H2cSniff).

Design rule: listeners without h2c never pass through here (their connections start as HTTP/1 at once), and
HTTP/1.1 `Upgrade: h2c` is never honoured: only a client that opens with the preface speaks h2c.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from proxy.dataplane.h2conn import H2ClientConnection

if TYPE_CHECKING:
    from proxy.dataplane.certs import TlsSession
    from proxy.dataplane.plane import PlaneState

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_takeover(dp: PlaneState, transport: asyncio.Transport, tls: TlsSession | None,
                data: bytes = b"") -> H2ClientConnection:
    """An accepted (and counted) connection speaks HTTP/2 from here: its transport goes to a new
    H2ClientConnection, which reads `data` (what was read already) first."""
    conn = H2ClientConnection(dp)
    transport.set_protocol(conn)
    conn.start(transport, tls)
    dp.conns.add(conn)
    if data:
        conn.data_received(data)
    return conn


class H2cSniff(asyncio.Protocol):
    """The first bytes of a cleartext connection on a listener that takes h2c: the HTTP/2 preface makes it
    an H2ClientConnection, anything else the listener's HTTP/1 connection. Bounded by header_read."""

    def __init__(self, dp: PlaneState, http1: Callable[[], asyncio.Protocol]) -> None:
        self.dp = dp
        self.http1 = http1
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.timer = self.dp.loop.call_later(self.dp.t_header_read, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None:
            return
        buf = self.buf + data
        k = min(len(buf), len(PREFACE))
        h2 = buf[:k] == PREFACE[:k]
        if h2 and k < len(PREFACE):
            self.buf = buf
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        dp = self.dp
        if h2:
            if len(dp.conns) >= dp.settings.limits.max_connections:
                dp.stats.reject("too_many_connections")
                t.close()
                return
            dp.stats.connection("downstream", 1)
            h2_takeover(dp, t, None, buf)
            return
        proto = self.http1()
        t.set_protocol(proto)
        proto.connection_made(t)
        if not t.is_closing():  # not refused (max_connections)
            proto.data_received(buf)
