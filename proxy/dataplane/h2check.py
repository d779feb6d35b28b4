"""Active health checks of HTTP/2 versions: one request on a connection of its own, either an HTTP/2 GET of
the check's path, or the standard gRPC health check (grpc.health.v1.Health/Check) for gRPC versions.

Design rule: a check speaks exactly what the version's traffic speaks (h2c prior knowledge, or TLS with the
version's context and ALPN h2) on a fresh connection it closes after, so it never holds a stream the pool
counts, and a version that would fail its requests fails its check. Off the request path: a coroutine
per check is fine here. Messages are grpcio-health-checking's generated ones (no hand-made protobuf).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from grpc_health.v1 import health_pb2
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived
from h2.exceptions import H2Error

from proxy.dataplane.grpcwire import parse_status

_CHECK_PATH = b"/grpc.health.v1.Health/Check"
# A health answer is a few bytes; more than this is not one.
_MAX_BODY = 64 * 1024


async def h2_request(host: str, port: int, ctx: ssl.SSLContext | None, server_hostname: str | None,
                     headers: list[tuple[bytes, bytes]], body: bytes
                     ) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a new connection: (status, response headers and trailers merged, body)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname)
    try:
        if ctx is not None:
            obj = writer.get_extra_info("ssl_object")
            if obj is None or obj.selected_alpn_protocol() != "h2":
                raise ConnectionError("the upstream did not select ALPN h2")
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        sid = h2.get_next_available_stream_id()
        h2.send_headers(sid, headers, end_stream=not body)
        if body:
            h2.send_data(sid, body, end_stream=True)
        writer.write(h2.data_to_send())
        status = 0
        fields: dict[bytes, bytes] = {}
        out = bytearray()
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for ev in h2.receive_data(data):
                if isinstance(ev, ResponseReceived | TrailersReceived):
                    for n, v in ev.headers or []:
                        fields[bytes(n)] = bytes(v)
                    if isinstance(ev, ResponseReceived):
                        status = int(fields.get(b":status", b"0"))
                elif isinstance(ev, DataReceived) and ev.stream_id == sid:
                    out += ev.data or b""
                    if len(out) > _MAX_BODY:
                        raise ConnectionError("health answer too large")
                    h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                elif isinstance(ev, StreamReset):
                    raise ConnectionError("stream reset")
                elif isinstance(ev, StreamEnded) and ev.stream_id == sid:
                    return status, fields, bytes(out)
            writer.write(h2.data_to_send())
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def check(host: str, port: int, ctx: ssl.SSLContext | None, server_hostname: str | None, path: str,
                grpc: str | None, timeout: float) -> bool:
    """True when the version is healthy: a 2xx/3xx to GET `path`, or gRPC SERVING for service `grpc`."""
    authority = f"{server_hostname or host}:{port}".encode()
    scheme = b"https" if ctx is not None else b"http"
    try:
        async with asyncio.timeout(timeout):
            if grpc is None:
                status, _, _ = await h2_request(host, port, ctx, server_hostname, [
                    (b":method", b"GET"), (b":scheme", scheme), (b":authority", authority),
                    (b":path", path.encode()), (b"user-agent", b"turnout-health")], b"")
                return 200 <= status < 400
            msg = health_pb2.HealthCheckRequest(service=grpc).SerializeToString()
            status, fields, body = await h2_request(host, port, ctx, server_hostname, [
                (b":method", b"POST"), (b":scheme", scheme), (b":authority", authority), (b":path", _CHECK_PATH),
                (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"user-agent", b"turnout-health")],
                struct.pack(">BI", 0, len(msg)) + msg)
    except (OSError, ssl.SSLError, H2Error, TimeoutError, ValueError):
        return False
    if status != 200 or parse_status(fields.get(b"grpc-status")) != 0 or len(body) < 5 or body[0] != 0:
        return False
    (n,) = struct.unpack(">I", body[1:5])
    try:
        resp = health_pb2.HealthCheckResponse.FromString(body[5:5 + n])
    except Exception:  # protobuf's DecodeError: not a health answer
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
