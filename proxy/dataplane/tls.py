"""TLS termination on a listener: the handshake of each new connection, its failures, and certificate reload.

Design rules:
- The handshake runs in the loop's SSLProtocol, bounded by timeouts.header_read, before any HTTP exists: a
  failed or slow one is counted by reason (turnout_tls_handshake_errors_total{listener,reason}) and closed,
  and never reaches dispatch or an upstream. Only a completed handshake calls the ClientConnection's
  connection_made, which then reads its TlsSession (certificate served, client certificate).
- Cleartext listeners never pass through here, so their path is unchanged.
- Reload: every RELOAD_INTERVAL seconds (and on SIGHUP, via DataPlane.reload_certificates) each TLS listener
  checks its files (proxy.dataplane.certs).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any, cast

import uvloop

from proxy.dataplane.certs import ListenerTls
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


class _Refused(asyncio.Protocol):
    """A TLS connection over max_connections: closed before any handshake (a 503 cannot be sent without
    one), counted like a refused cleartext connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _handshake_done(dp: PlaneState, listener: str, waiter: asyncio.Future[None]) -> None:
    dp.handshaking -= 1
    stats = dp.stats
    if waiter.cancelled():
        stats.tls_handshake_error(listener, "closed")
        return
    e = waiter.exception()
    if e is not None:
        stats.tls_handshake_error(listener, reason_of(e))


def tls_factory(dp: PlaneState, tls: ListenerTls) -> Callable[[], asyncio.BaseProtocol]:
    """The protocol factory of a TLS listener: the loop's own SSLProtocol around a ClientConnection, made
    here rather than by create_server(ssl=...) so that the handshake's outcome (the waiter) is seen. The
    SSLProtocol calls the connection's connection_made only once the handshake completed."""
    loop = dp.loop
    # uvloop's SSLProtocol is what create_server(ssl=...) uses on uvloop (not in its type stubs).
    ssl_protocol: Any = uvloop.loop.SSLProtocol if isinstance(loop, uvloop.Loop) else sslproto.SSLProtocol  # type: ignore[attr-defined]
    name, timeout = tls.name, dp.t_header_read
    max_connections = dp.settings.limits.max_connections

    def make() -> asyncio.BaseProtocol:
        if len(dp.conns) + dp.handshaking >= max_connections:
            dp.stats.reject("too_many_connections")
            return _Refused()
        conn = ClientConnection(dp)
        conn.expect_tls(tls)
        waiter: asyncio.Future[None] = loop.create_future()
        dp.handshaking += 1
        waiter.add_done_callback(lambda f: _handshake_done(dp, name, f))
        # tls.context is read at each accept: a reloaded certificate serves the next handshake.
        return cast(asyncio.BaseProtocol, ssl_protocol(
            loop, conn, tls.context, waiter, server_side=True, call_connection_made=True,
            ssl_handshake_timeout=timeout))

    return make


def reload_all(tls: list[ListenerTls], log: Callable[[str], None]) -> None:
    for t in tls:
        for line in t.check():
            log(line)


async def watch_certificates(tls: list[ListenerTls], log: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        reload_all(tls, log)
