"""What an HTTP/1 client connection hands over to: TLS (its handshake's outcome), HTTP/2 (ALPN h2), and a
tunnel (an upgrade the upstream accepted).

Design rule: a layer between the flow (proxy.dataplane.flow: queue, backpressure, answers) and the parser
callbacks (proxy.dataplane.downstream); it holds no state of its own, only the moments the connection
stops being plain HTTP/1.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.dataplane.flow import P_BACKLOG, P_TUNNEL, ClientFlow
from proxy.dataplane.h2accept import h2_takeover
from proxy.identities import PeerCert

if TYPE_CHECKING:
    from proxy.dataplane.certs import ListenerTls
    from proxy.dataplane.exchange import Exchange


class ClientHandover(ClientFlow):
    # -- TLS (proxy.dataplane.tls)

    def expect_tls(self, listener: ListenerTls) -> None:
        self.tls_listener = listener

    def tls_made(self, transport: asyncio.Transport) -> None:
        """The end of connection_made on a TLS connection: the handshake's outcome and https."""
        assert self.tls_listener is not None
        session = self.tls = self.tls_listener.session(transport)
        if session.peer_cert:  # an empty dict: a certificate that was not verified, no identity
            self.peer_cert = PeerCert(session.peer_cert, session.peer_der or b"")
        self.proto = b"https"
        self.fwd_lines = b"X-Forwarded-For: " + self.peer.encode() + b"\r\nX-Forwarded-Proto: https\r\n"
        if "h2" in self.tls_listener.listener.protocols:
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
                # HTTP/2 from here: the connection (counted already) is the H2ClientConnection's.
                self.dp.conns.discard(self)
                self.closed = self.stopped = True
                h2_takeover(self.dp, transport, session)

    # -- the tunnel (an accepted upgrade)

    def start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        up = ex.up
        if up is None or up.transport is None:
            self.abort()
            return
        self.tunnel_up = up
        self.deadline = self.now() + self.dp.t_upstream_idle
        ex.request_complete = True
        if rest:
            self.write(rest)
        if ex.early:
            up.transport.write(ex.early)
            ex.early = b""
        self.stopped = False
        self.resume(P_TUNNEL | P_BACKLOG)

    def write_tunnel(self, data: bytes) -> None:
        self.write(data)
        if not self.write_paused:  # a client that stopped reading keeps its earlier deadline
            self.deadline = self.now() + self.dp.t_upstream_idle

    def tunnel_eof(self) -> None:
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def tunnel_closed(self) -> None:
        self.tunnel_up = None
        self._close()
