"""TLS termination on a listener: the handshake of each new connection, its failures, and certificate reload.

Design rules:
- The listener accepts TCP with TlsAccept, which runs the handshake (loop.start_tls, bounded by
  timeouts.header_read) before any HTTP exists: a failed or slow handshake is counted by reason
  (turnout_tls_handshake_errors_total{listener,reason}) and closed, and never reaches dispatch or an
  upstream. Only a completed handshake makes a ClientConnection (ClientConnection.tls_made).
- Cleartext listeners never pass through here, so their path is unchanged.
- Reload: every RELOAD_INTERVAL seconds (and on SIGHUP, via reload()) each TLS listener checks its files.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from proxy.dataplane.certs import ListenerTls, TlsSession
from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.plane import PlaneState

# How often certificate and key files are compared with the loaded ones.
RELOAD_INTERVAL = 2.0

# OpenSSL reasons -> the few values of the `reason` label (bounded: the label set must stay small).
_REASONS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version", "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version", "VERSION_TOO_LOW": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "HTTP_REQUEST": "not_tls", "HTTPS_PROXY_REQUEST": "not_tls",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_certificate", "CERTIFICATE_VERIFY_FAILED": "client_certificate",
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_APPLICATION_PROTOCOL": "alpn",
}


def reason_of(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        r = e.reason or ""
        if r in _REASONS:
            return _REASONS[r]
        if r.startswith("SSLV3_ALERT_") or r.startswith("TLSV1_ALERT_"):
            return "client_alert"  # the client refused our certificate or parameters
        return "handshake"
    if isinstance(e, TimeoutError) or (isinstance(e, ConnectionAbortedError) and "longer" in str(e)):
        return "timeout"
    return "closed"


class TlsAccept:
    """asyncio.Protocol of a TLS listener's accepted TCP connections until their handshake completed."""

    def __init__(self, dp: PlaneState, tls: ListenerTls) -> None:
        self.dp = dp
        self.tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.pause_reading()  # start_tls takes over reading; nothing may arrive here first
        task = self.dp.loop.create_task(self._handshake(t))
        self.dp.tasks.add(task)
        task.add_done_callback(self.dp.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None

    async def _handshake(self, transport: asyncio.Transport) -> None:
        conn = ClientConnection(self.dp)
        try:
            tls_transport = await self.dp.loop.start_tls(transport, conn, self.tls.context, server_side=True,
                                                         ssl_handshake_timeout=self.dp.t_header_read)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as e:
            self.dp.stats.tls_handshake_error(self.tls.name, reason_of(e))
            transport.abort()
            return
        if tls_transport is None:  # the peer went away as the handshake ended
            self.dp.stats.tls_handshake_error(self.tls.name, "closed")
            return
        sslobj = tls_transport.get_extra_info("ssl_object")
        served = getattr(sslobj, "turnout_cert", 0)
        peer = sslobj.getpeercert() if sslobj is not None else None
        # uvloop schedules the first read of application data after this task resumes, so the connection
        # is made before any request byte reaches it.
        conn.tls_made(tls_transport, TlsSession(self.tls, served, peer or None))


def reload_all(tls: list[ListenerTls], log: Callable[[str], None]) -> None:
    for t in tls:
        for line in t.check():
            log(line)


async def watch_certificates(tls: list[ListenerTls], log: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        reload_all(tls, log)
