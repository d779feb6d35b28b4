"""One HTTP/2 client stream as the ClientSide of its Exchange, and the sending half of its connection.

Design rules:
- A stream is an Exchange like an HTTP/1 request: dispatch routes it and answers through its methods
  (answer, send_head, response_start/data/end, response_complete); nothing here knows routes or versions.
- Flow control both ways. The stream's receive window is handed back (acknowledged) only once its body
  went upstream and the upstream is not full; a response goes out no faster than the client's send window
  and the transport allow, and the upstream is paused (pause_reading) while they do not.
- Frames are queued in the sans-IO `h2` connection and written once per loop iteration (H2Session.flush),
  so many streams answering in one iteration cost one write.
- H2Session is the connection as its streams see it; the protocol (events, limits, deadlines, GOAWAY) is
  proxy.dataplane.h2conn's H2ClientConnection, which extends it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from proxy.dataplane import grpcwire
from proxy.dataplane.dispatch import log, upstream_failed
from proxy.dataplane.exchange import RESPONDING, ClientSide, Exchange
from proxy.dataplane.headers import forwarded_head
from proxy.dataplane.rewrite import response_pairs

if TYPE_CHECKING:
    import asyncio

    from proxy.dataplane.certs import TlsSession
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import UpstreamSide

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_LOCAL_HEADERS: Final = [(b"content-type", b"text/plain; charset=utf-8"), (b"server", b"turnout")]
_BODIES: dict[int, bytes] = {}


def local_body(status: int) -> bytes:
    body = _BODIES.get(status)
    if body is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        body = _BODIES[status] = phrase.lower().encode() + b"\n"
    return body


def header_pair(line: bytes) -> tuple[bytes, bytes]:
    """A header line the proxy formats ("Name: value\\r\\n") as an HTTP/2 header (lower-case name)."""
    name, _, value = line[:-2].partition(b": ")
    return name.lower(), value


class H2Session(ClientSide):
    """The connection as its streams see it: the h2 state machine and the batched writes."""

    def __init__(self, dp: PlaneState) -> None:
        self.dp = dp
        self.now = dp.now
        limits = dp.settings.limits
        self.max_body = limits.max_body_bytes
        self.retry_limit = limits.retry_buffer_bytes
        self.transport: asyncio.Transport | None = None
        self.h2: H2Connection | None = None
        self.streams: dict[int, H2Stream] = {}
        # Streams with response data waiting for the client's window.
        self.blocked: dict[int, H2Stream] = {}
        self.flush_scheduled = False
        self.write_paused = False
        self.closed = False
        self.peer = ""
        self.trusted = False
        self.proto = b"http"
        self.fwd_lines = b""
        self.tls: TlsSession | None = None
        self.peer_cert = None
        self.tail = b""
        self.tail_host: bytes | None = None
        self.tail_route: str | None = None
        # The highest stream id taken into dispatch (what a GOAWAY names as the last one processed).
        self.last_sid = 0
        self.going_away = False
        # When the client stopped taking our data (its window or its socket): the deadline never extends.
        self.stalled_since = 0.0

    def want_flush(self) -> None:
        if not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            self.dp.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        h = self.h2
        t = self.transport
        if h is None or t is None or self.closed:
            return
        data = h.data_to_send()
        if data:
            t.write(data)

    def upstream_tail(self, host_raw: bytes | None, route: str) -> bytes:
        """The lines the proxy adds (X-Forwarded-*, route): they depend on (peer, Host, route) only."""
        if host_raw == self.tail_host and route == self.tail_route and self.tail:
            return self.tail
        tail = self.fwd_lines
        if host_raw is not None:
            tail += b"X-Forwarded-Host: " + host_raw + _CRLF
        self.tail = tail = tail + self.dp.route_header(route)
        self.tail_host = host_raw
        self.tail_route = route
        return tail

    def stalled(self, stream: H2Stream) -> None:
        self.blocked[stream.sid] = stream
        if not self.stalled_since:
            self.stalled_since = self.now()
            self.rearm()

    def unstall(self, stream: H2Stream) -> None:
        self.blocked.pop(stream.sid, None)
        if not self.blocked and not self.write_paused and self.stalled_since:
            self.stalled_since = 0.0
            self.rearm()

    def window_opened(self, sid: int) -> None:
        """A WINDOW_UPDATE: push what waited (sid 0: the connection's window, every stream)."""
        if sid:
            s = self.blocked.get(sid)
            if s is not None:
                s.push()
        else:
            for s in list(self.blocked.values()):
                s.push()

    def stream_gone(self, stream: H2Stream) -> None:
        """The stream is closed on both sides (or reset): forget it, and give back the connection window its
        body still held."""
        self.streams.pop(stream.sid, None)
        h = self.h2
        if stream.unacked and h is not None and not self.closed:
            h.acknowledge_received_data(stream.unacked, stream.sid)
            stream.unacked = 0
            self.want_flush()
        self.unstall(stream)
        self.rearm()

    def reset(self, sid: int, code: int) -> None:
        h = self.h2
        if h is not None:
            with contextlib.suppress(ProtocolError):  # already closed on both sides
                h.reset_stream(sid, code)
            self.want_flush()

    # -- left to H2ClientConnection

    def rearm(self) -> None:
        raise NotImplementedError


class H2Stream(ClientSide):
    def __init__(self, session: H2Session, sid: int) -> None:
        self.session = session
        self.dp = session.dp
        self.sid = sid
        self.ex: Exchange | None = None
        self.closed = False  # reset by either side, or its connection is gone
        self.peer_cert = session.peer_cert
        self.out: deque[bytes] = deque()
        self.out_size = 0
        self.head: list[tuple[bytes, bytes]] | None = None  # a response head not yet sent
        self.end: list[tuple[bytes, bytes]] | None = None  # the response ended: trailers (maybe empty) to send
        self.unacked = 0  # request body bytes received and not yet handed back to the client's window
        self.up_full = False
        self.up_paused = False  # we paused the upstream: its data waits for the client's window
        self.done = False  # response complete, or reset

    def __repr__(self) -> str:
        return f"<H2Stream {self.sid} [{self.ex!r}]>"

    # -- the request body

    def body(self, data: bytes, flow: int) -> None:
        """A DATA frame of the request; `flow` is its flow-controlled length (with padding)."""
        ex = self.ex
        if ex is None or ex.done():
            self.ack(flow)
            return
        n = len(data)
        ex.body_bytes += n
        if ex.body_bytes > self.session.max_body:
            self.refuse_body(413)
            return
        limit = self.session.retry_limit
        if ex.replay is not None:
            if ex.replay_size + n <= limit:
                ex.replay.append(data)
                ex.replay_size += n
            else:
                ex.replay = None
        if ex.mirror_body is not None:
            if ex.mirror_size + n <= limit:
                ex.mirror_body.append(b"%x\r\n%b\r\n" % (n, data) if ex.chunked else data)
                ex.mirror_size += n
            else:
                ex.mirror_body = None
                self.dp.mirror.count_dropped(ex)
        up = ex.up
        if up is not None:
            self._send_body(ex, up, data, False)
            ex.sent_body = True
            if self.up_full:
                self.unacked += flow
            else:
                self.ack(flow)
        else:
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(data)
            ex.pending_size += n
            self.unacked += flow  # the window bounds what waits for a connection

    def ended(self) -> None:
        """The client's END_STREAM: the request is complete."""
        ex = self.ex
        if ex is None or ex.request_complete:
            return
        ex.request_complete = True
        up = ex.up
        if up is not None and not ex.done():
            self._send_body(ex, up, b"", True)
            up.expect_response(self.dp.now() + self.dp.t_upstream_response)
        if ex.mirror_body is not None and ex.route is not None:
            if ex.chunked:
                ex.mirror_body.append(_LAST_CHUNK)
            self.dp.mirror.send(ex, self.dp.backends)

    def _send_body(self, ex: Exchange, up: UpstreamSide, data: bytes, end: bool) -> None:
        if up.structured:
            up.request_data(data, end)
            return
        t = up.transport
        if t is None:
            return
        if ex.chunked:
            if data:
                t.write(b"%x\r\n%b\r\n%b" % (len(data), data, _LAST_CHUNK if end else b""))
            elif end:
                t.write(_LAST_CHUNK)
        elif data:
            t.write(data)

    def ack(self, n: int) -> None:
        h = self.session.h2
        if n and h is not None and not self.session.closed:
            # Also for a closed stream: the connection's window is handed back (h2 skips the stream's).
            h.acknowledge_received_data(n, self.sid)
            self.session.want_flush()

    def refuse_body(self, status: int) -> None:
        ex = self.ex
        if ex is None:
            return
        self.dp.stats.reject("too_large")
        self.abort_active(ex, status)

    # -- what dispatch and the upstream side call

    def write(self, data: bytes) -> None:
        """HTTP/1.x bytes: never sent on a stream (the upstream uses the structured methods)."""

    def pause(self, reason: int) -> None:
        pass

    def resume(self, reason: int) -> None:
        pass

    def send_continue(self, ex: Exchange) -> None:
        h = self.session.h2
        if h is not None and not self.closed:
            h.send_headers(self.sid, [(b":status", b"100")])
            self.session.want_flush()

    def upstream_full(self) -> None:
        self.up_full = True

    def upstream_writable(self) -> None:
        self.up_full = False
        n, self.unacked = self.unacked, 0
        self.ack(n)

    def upstream_head(self, ex: Exchange, route: str) -> bytes:
        s = self.session
        if ex.fwd is None:
            return b"".join([ex.method_b, b" ", ex.target, b" HTTP/1.1\r\n", *ex.lines,
                             s.upstream_tail(ex.host_raw, route)])
        return forwarded_head(ex, s.peer, s.proto, self.dp.route_header(route))

    def send_head(self, ex: Exchange, conn: UpstreamSide) -> None:
        dp = self.dp
        body = ex.replay if ex.attempts > 1 and ex.replay is not None else ex.pending or []
        ex.pending = None
        ex.pending_size = 0
        if body:
            ex.sent_body = True
        end = ex.request_complete
        if conn.structured:
            conn.start_request(end and not body)
            for i, b in enumerate(body):
                conn.request_data(b, end and i == len(body) - 1)
        elif conn.transport is not None:
            parts = [ex.head_common, dp.version_header(ex.version), ex.head_tail]
            if ex.chunked:
                parts.extend(b"%x\r\n%b\r\n" % (len(b), b) for b in body)
                if end:
                    parts.append(_LAST_CHUNK)
            else:
                parts.extend(body)
            conn.transport.write(b"".join(parts))
        if end:
            conn.expect_response(dp.now() + dp.t_upstream_response)
        if not self.up_full and self.unacked:
            n, self.unacked = self.unacked, 0
            self.ack(n)
        if self.up_paused or self.session.write_paused:
            conn.pause_reading()

    def answer(self, ex: Exchange, status: int) -> None:
        ex.respond(status)
        ex.answered()
        if ex.grpc:
            # A gRPC call gets a gRPC answer: 200, trailers-only (one HEADERS frame with END_STREAM).
            code, message = grpcwire.local_status(ex, status)
            grpcwire.count(self.dp.stats, ex, code, self.dp.grpc_error_codes)
            self.head = grpcwire.trailers_only(code, message)
            self.end = []
            self.push()
            self._finished(ex)
            return
        body = local_body(status)
        route = ex.route
        headers = [(b":status", b"%d" % status), *_LOCAL_HEADERS, (b"content-length", b"%d" % len(body))]
        if status == 401 and route is not None and route.challenge:
            headers.append((b"www-authenticate", b"Bearer"))
        self.head = headers
        if not ex.head:
            self._data(body)
        self.end = []
        self.push()
        self._finished(ex)

    def abort_active(self, ex: Exchange, status: int) -> None:
        up = ex.up
        ex.up = None
        if up is not None:
            up.drop()
        if ex.grpc and ex.state >= RESPONDING and not self.closed and self.end is None:
            # The response began: its status goes in the trailers (a reset would show as INTERNAL).
            ex.answered()
            code, message = grpcwire.local_status(ex, status)
            grpcwire.count(self.dp.stats, ex, code, self.dp.grpc_error_codes)
            self.end = [(b"grpc-status", b"%d" % code), (b"grpc-message", grpcwire.encode_message(message))]
            self.push()
            self._finished(ex)
        elif ex.state >= RESPONDING or self.closed:
            ex.answered()
            self.kill(ErrorCodes.INTERNAL_ERROR)
        else:
            self.answer(ex, status)

    def response_complete(self, ex: Exchange) -> None:
        ex.answered()
        ex.up = None
        dp = self.dp
        now = dp.now()
        route = ex.route
        if route is not None:
            dp.stats.request(route.name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
            if dp.access_log is not None:
                log(dp, ex, ex.status, now)
        self._finished(ex)

    def _finished(self, ex: Exchange) -> None:
        ex.finish()
        self.done = True
        self._maybe_gone()

    def upstream_failed(self, ex: Exchange, up: UpstreamSide | None, kind: str, before_response: bool) -> None:
        upstream_failed(self.dp, ex, up, kind, before_response)

    def start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        self.abort_active(ex, 502)  # never asked for: ex.upgrade is never set on a stream

    def write_tunnel(self, data: bytes) -> None:
        pass

    def tunnel_eof(self) -> None:
        pass

    def tunnel_closed(self) -> None:
        pass

    # -- the structured response

    def response_start(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        dp = self.dp
        head = [(b":status", b"%d" % status), *response_pairs(ex, headers)]
        if ex.route is not None:
            lines: list[bytes] = []
            dp.response_lines(ex, lines)  # the same rule as every response (version header, cookie)
            head.extend(header_pair(ln) for ln in lines)
        self.head = head

    def response_data(self, ex: Exchange, data: bytes) -> None:
        if data and not self.closed:
            self._data(data)
            self.push()

    def response_end(self, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        if not self.closed:
            self.end = trailers
            self.push()

    def _data(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    def push(self) -> None:
        """Send what the windows allow: head, data, then the end. Pauses the upstream when data waits."""
        s = self.session
        h = s.h2
        if h is None or self.closed:
            return
        sid = self.sid
        out = self.out
        try:
            head = self.head
            if head is not None:
                self.head = None
                bare = not out and self.end is not None and not self.end  # the head is the whole response
                h.send_headers(sid, head, end_stream=bare)
                if bare:
                    self.end = None
                    self._sent_all()
                    s.want_flush()
                    return
            ended = False
            while out:
                window = h.local_flow_control_window(sid)
                if window <= 0:
                    break
                chunk = out[0]
                size = min(window, h.max_outbound_frame_size)
                if len(chunk) <= size:
                    out.popleft()
                else:
                    out[0] = chunk[size:]
                    chunk = chunk[:size]
                self.out_size -= len(chunk)
                ended = not out and self.end is not None and not self.end
                h.send_data(sid, chunk, end_stream=ended)
            if out:
                if not self.up_paused:
                    self.up_paused = True
                    ex = self.ex
                    if ex is not None and ex.up is not None:
                        ex.up.pause_reading()
                s.stalled(self)
            elif self.end is not None:
                end = self.end
                self.end = None
                if end:
                    h.send_headers(sid, end, end_stream=True)
                elif not ended:
                    h.end_stream(sid)
                self._sent_all()
            elif self.up_paused:
                self.up_paused = False
                s.unstall(self)
                ex = self.ex
                if ex is not None and ex.up is not None and not s.write_paused:
                    ex.up.resume_reading()
        except ProtocolError:
            self.closed = True  # the client reset the stream meanwhile
        s.want_flush()

    def _sent_all(self) -> None:
        self.up_paused = False
        self.session.unstall(self)
        self._maybe_gone()

    def _maybe_gone(self) -> None:
        if not self.done:
            return
        if not self.closed:
            if self.end is not None or self.out or self.head is not None:
                return  # the response is still going out
            ex = self.ex
            if ex is not None and not ex.request_complete:
                # Answered before the request body ended: the client may stop sending it (RFC 9113 8.1).
                self.kill(ErrorCodes.NO_ERROR)
                return
        self.session.stream_gone(self)

    def kill(self, code: int) -> None:
        """RST_STREAM: this stream only; the connection and its other streams go on."""
        if not self.closed:
            self.closed = True
            self.session.reset(self.sid, code)
        self.out.clear()
        self.out_size = 0
        self.head = self.end = None
        self.session.stream_gone(self)

    def reset_by_client(self) -> None:
        """The client's RST_STREAM, or its connection went away: the upstream side is dropped."""
        self.closed = True
        ex = self.ex
        if ex is not None:
            up = ex.up
            if up is not None and not ex.done():
                up.drop()
            ex.up = None
            if not ex.done():
                ex.abort()
        self.out.clear()
        self.out_size = 0
        self.session.stream_gone(self)

