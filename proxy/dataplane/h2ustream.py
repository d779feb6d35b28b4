"""One exchange's stream on a shared HTTP/2 upstream connection (proxy.dataplane.h2upstream), and the face of
that connection a stream sees (StreamHost).

Design rules:
- A stream is the exchange's UpstreamSide with `structured = True`: the client side hands it the request
  (start_request, request_data) and it answers through the client's response_start/data/end.
- The request head is the one an HTTP/1 upstream would get (ex.head_common: forwarded lines, the proxy's
  X-Forwarded-*, route, version and identity lines) turned into HTTP/2 fields, so no rule is written twice.
- Flow control both ways: a response's window is opened only as the client takes the data (pause_reading
  holds the acknowledgements back), and request data waits for the upstream's window, pausing the client's
  reading once more than high_water of it waits.
- A failure reaches the client side exactly as HTTP/1's does (upstream_failed with a kind), so retries,
  fallback, health and metrics stay dispatch's; a stream the upstream did not process (REFUSED_STREAM, above
  a GOAWAY's last stream id) is sent again on another connection of the same endpoint.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Final

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error

from proxy.dataplane import grpcwire
from proxy.dataplane.pool import UpstreamSide

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import Endpoint

# Request headers that are HTTP/1-only (connection-specific, RFC 9113 8.2.2) or become pseudo-headers.
_DROP: Final = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                          b"upgrade", b"te", b"trailer"})
_RESPONSE_DROP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                   b"upgrade", b"te", b"trailer"})
NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []


class StreamHost(UpstreamSide):
    """What a stream uses of its connection (H2Link implements it)."""

    h2: H2Connection
    dp: PlaneState
    now: Callable[[], float]
    ep: Endpoint
    scheme: bytes = b"http"
    closed: bool = False
    draining: bool = False  # GOAWAY received (or sent): no new streams
    write_paused: bool = False
    window: int = 65535  # a stream's receive window; also the request data a stream buffers before pausing

    def __init__(self) -> None:
        self.streams: dict[int, H2UpstreamStream] = {}
        self.blocked: list[H2UpstreamStream] = []  # streams with request data waiting for window or transport

    def flush(self) -> None:
        raise NotImplementedError

    def ack(self, sid: int, n: int) -> None:
        raise NotImplementedError

    def arm(self, when: float) -> None:
        raise NotImplementedError

    def stream_done(self, s: H2UpstreamStream) -> None:
        raise NotImplementedError

    def replay(self, ex: Exchange) -> bool:
        """Send ex again on another connection (the upstream did not process it); False when it cannot."""
        raise NotImplementedError


class H2UpstreamStream(UpstreamSide):
    """One exchange's stream on an H2Link."""

    structured = True

    def __init__(self, link: StreamHost, ex: Exchange) -> None:
        self.link = link
        self.ex: Exchange | None = ex
        self.sid = 0
        self.got_bytes = False
        self.req_ended = False
        self.end_pending = False
        self.done = False
        self.out: deque[bytes] = deque()
        self.out_size = 0
        self.full = False
        self.paused_reading = False
        self.unacked = 0
        self.deadline = 0.0
        self.call_deadline = 0.0  # grpc-timeout: the whole call ends by then
        self.expiry = "timeout"  # the failure kind when `deadline` passes
        self.status = 0
        self.grpc_status: bytes | None = None
        self.trailers: list[tuple[bytes, bytes]] = NO_HEADERS

    def __repr__(self) -> str:
        return f"<H2UpstreamStream {self.sid} [{'done' if self.done else 'active'} | status {self.status}]>"

    # -- what the client side calls

    def start_request(self, end: bool) -> None:
        ex = self.ex
        link = self.link
        if ex is None or self.sid:
            return
        if link.draining:  # GOAWAY came while the head was held back: this stream never reached the upstream
            self.refused()
            return
        headers = self._headers(ex)
        h2 = link.h2
        try:
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, headers, end_stream=end)
        except H2Error:
            self.fail("invalid_response")
            return
        self.sid = sid
        link.streams[sid] = self
        if end:
            self.req_ended = True
        elif self.out or self.end_pending:
            self.push()
        link.flush()

    def _headers(self, ex: Exchange) -> list[tuple[bytes, bytes]]:
        """ex's head as HTTP/2 fields: the lines as the proxy forwards them to an HTTP/1 upstream (its own
        X-Forwarded-*, route, version and identity lines included), framing and connection lines dropped."""
        link = self.link
        target = ex.target if ex.target[:1] == b"/" or ex.target == b"*" else (
            (ex.path + ("?" + ex.query if ex.query is not None else "")).encode("latin-1"))
        authority = ex.host_raw or link.ep.address.encode()
        fields = [(b":method", ex.method_b), (b":scheme", link.scheme), (b":authority", authority),
                  (b":path", target)]
        raw = ex.head_common + link.dp.version_header(ex.version)
        te = ex.te_trailers
        for line in raw.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            n = name.strip().lower()
            v = value.strip()
            if n in _DROP:
                if n == b"te" and b"trailers" in v.lower():
                    te = True
                continue
            if n == b"content-type" and grpcwire.is_grpc(v):
                ex.grpc = True
            elif n == b"grpc-timeout":
                t = grpcwire.parse_timeout(v)
                if t is not None:
                    self.call_deadline = ex.t0 + t
            fields.append((n, v))
        if ex.cl is not None:
            fields.append((b"content-length", b"%d" % ex.cl))
        if te or ex.grpc:
            # gRPC servers require it; any other upstream learns the client can take trailers.
            fields.append((b"te", b"trailers"))
        return fields

    def request_data(self, data: bytes, end: bool) -> None:
        if data:
            self.out.append(data)
            self.out_size += len(data)
        if end:
            self.end_pending = True
        if self.sid:
            self.push()
            self.link.flush()

    def push(self) -> None:
        """Send what the upstream's window and the transport take now; the rest waits (link.blocked)."""
        link = self.link
        h2 = link.h2
        out = self.out
        sid = self.sid
        if not sid or self.done or link.closed:
            return
        try:
            while out and not link.write_paused:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = out.popleft()
                if len(chunk) > window:
                    out.appendleft(chunk[window:])
                    chunk = chunk[:window]
                self.out_size -= len(chunk)
                h2.send_data(sid, chunk)
            if not out and self.end_pending and not self.req_ended:
                self.req_ended = True
                h2.end_stream(sid)
        except H2Error:
            self.fail("reset")
            return
        ex = self.ex
        if out or (self.end_pending and not self.req_ended):
            if self not in link.blocked:
                link.blocked.append(self)
            if self.out_size > link.window and not self.full and ex is not None:
                self.full = True
                ex.client.upstream_full()
        elif self.full and ex is not None:
            self.full = False
            ex.client.upstream_writable()

    def expect_response(self, deadline: float) -> None:
        d = self.call_deadline
        if d and d < deadline:
            deadline = d
            self.expiry = "deadline"
        self.deadline = deadline
        self.link.arm(deadline)
        if not self.req_ended:
            self.end_pending = True
            if self.sid:
                self.push()
                self.link.flush()

    def drop(self) -> None:
        """The client gave up: cancel the stream, keep the connection."""
        self.ex = None
        self._reset(ErrorCodes.CANCEL)
        self._unbind()

    def close(self) -> None:
        self.drop()

    def reusable(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused_reading = True
        self.deadline = self.call_deadline  # a slow client is not the upstream's fault

    def resume_reading(self) -> None:
        if not self.paused_reading:
            return
        self.paused_reading = False
        n, self.unacked = self.unacked, 0
        if n and self.sid and not self.done:
            self.link.ack(self.sid, n)
            self.link.flush()
        self._idle_deadline()

    def on_deadline(self) -> None:
        self.fail(self.expiry)

    # -- what the link calls

    def on_head(self, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.ex
        if ex is None:
            return
        status = 0
        out: list[tuple[bytes, bytes]] = []
        for n, v in headers:
            if n[:1] == b":":
                if n == b":status" and v.isdigit() and len(v) == 3:
                    status = int(v)
            elif n not in _RESPONSE_DROP:
                if n == b"grpc-status":
                    self.grpc_status = v
                out.append((n, v))
        if status < 200:
            self.fail("invalid_response")
            return
        link = self.link
        ep = link.ep
        if status >= 500:
            link.dp.health.failure(ep)
        elif ep.failures or ep.ejections:
            link.dp.health.success(ep)
        self.status = status
        self.got_bytes = True
        self.expiry = "timeout"
        self._idle_deadline()
        ex.respond(status)
        ex.client.response_start(ex, status, out)

    def on_data(self, data: bytes, flow: int) -> None:
        ex = self.ex
        if ex is None or not self.status:
            self.link.ack(self.sid, flow)
            return
        ex.bytes_out += len(data)
        if data:
            ex.client.response_data(ex, data)
        if self.paused_reading:
            self.unacked += flow
        else:
            self.link.ack(self.sid, flow)
            self._idle_deadline()

    def on_end(self) -> None:
        ex = self.ex
        if ex is None or self.done:
            return
        if not self.status:
            self.fail("invalid_response")
            return
        if not self.req_ended:
            # Answered before the request ended: the rest of the request is not wanted.
            self._reset(ErrorCodes.NO_ERROR)
        self._unbind()
        trailers = self.trailers
        if ex.grpc:
            code = self.grpc_status
            for n, v in trailers:
                if n == b"grpc-status":
                    code = v
            grpcwire.count(self.link.dp.stats, ex, grpcwire.parse_status(code), self.link.dp.grpc_error_codes)
        ex.client.response_end(ex, [(n, v) for n, v in trailers if n[:1] != b":"])
        ex.client.response_complete(ex)

    def on_reset(self, code: int) -> None:
        if code == ErrorCodes.REFUSED_STREAM and not self.got_bytes:
            self.refused()  # RFC 9113 8.7: not processed, safe to send again
        else:
            self.fail("reset")

    def refused(self) -> None:
        ex = self.ex
        self.ex = None
        self._unbind()
        if ex is not None and not self.link.replay(ex):
            ex.client.upstream_failed(ex, self, "reset", True)

    def fail(self, kind: str) -> None:
        ex = self.ex
        self.ex = None
        self._reset(ErrorCodes.CANCEL)
        self._unbind()
        if ex is not None:
            ex.client.upstream_failed(ex, self, kind, not self.got_bytes)

    # -- helpers

    def _idle_deadline(self) -> None:
        d = self.call_deadline
        if not d:
            d = self.link.now() + self.link.dp.t_upstream_idle
        else:
            self.expiry = "deadline"
        self.deadline = d
        self.link.arm(d)

    def _reset(self, code: ErrorCodes) -> None:
        link = self.link
        if self.sid and not self.done and not link.closed:
            with contextlib.suppress(H2Error):  # already closed both ways
                link.h2.reset_stream(self.sid, code)
            link.flush()

    def _unbind(self) -> None:
        if self.done:
            return
        self.done = True
        self.deadline = 0.0
        self.out.clear()
        link = self.link
        if self in link.blocked:
            link.blocked.remove(self)
        link.stream_done(self)

