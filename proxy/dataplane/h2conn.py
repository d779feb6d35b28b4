"""The HTTP/2 client connection: ALPN h2 on TLS listeners, prior-knowledge h2c on cleartext ones.

Design rules:
- The sans-IO `h2` library is driven from this asyncio.Protocol, as the HTTP/1 side drives llhttp: its
  events become H2Streams (proxy.dataplane.h2stream), each an Exchange handed to the same dispatch as an
  HTTP/1 request. No coroutine or future per stream.
- Requests are validated here, before anything goes upstream: a malformed one (missing or repeated
  pseudo-headers, upper-case or connection-specific header names, TE other than trailers, a CR, LF or NUL
  in a value) is a stream error (RST_STREAM PROTOCOL_ERROR) and never forwarded; h2's own validation is off
  so that these stay stream errors and are checked in one pass.
- Abuse is bounded per connection and answered with GOAWAY: concurrent streams (h2 refuses more than
  SETTINGS said), header blocks (HPACK list size, CONTINUATION bytes), streams cancelled per second (rapid
  reset), control frames per second (SETTINGS, PING, PRIORITY, empty DATA floods).
- A graceful stop sends GOAWAY naming the last stream taken; open streams finish within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from proxy.dataplane.dispatch import start
from proxy.dataplane.exchange import Exchange, Refuse
from proxy.dataplane.grpcwire import is_grpc
from proxy.dataplane.h2stream import H2Session, H2Stream
from proxy.dataplane.headers import (
    CONTENT_LENGTH,
    EXPECT,
    FORWARDED,
    HOP,
    HOST,
    IDEMPOTENT,
    host_of,
    request_target,
)
from proxy.dataplane.plan import WANTED
from proxy.identities import PeerCert

if TYPE_CHECKING:
    from proxy.dataplane.certs import TlsSession
    from proxy.dataplane.plane import PlaneState

_CRLF: Final = b"\r\n"
# Lower-case tokens only (RFC 9113 8.2.1: upper case is malformed) and values without CR, LF, NUL or
# surrounding white space: an HTTP/1.1 upstream would read those as more headers.
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_NOT_IN_H2: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                               b"upgrade"})
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
# Per-stream receive window (the default); the connection's is this many times larger, so that streams
# whose windows are held (an upstream that reads slowly) cannot starve the others.
STREAM_WINDOW: Final = 65_535
# How long a closed connection keeps reading (and discarding) so that its GOAWAY reaches the client.
LINGER: Final = 1.0


class Malformed(Exception):
    """A request HTTP/2 calls malformed: a stream error, never forwarded."""


class H2ClientConnection(H2Session):
    def __init__(self, dp: PlaneState) -> None:
        super().__init__(dp)
        limits = dp.settings.limits
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_streams = limits.h2_max_concurrent_streams
        self.max_resets = limits.h2_max_resets
        self.max_control = limits.h2_max_control_frames
        self.resets = 0
        self.control = 0
        self.window_start = 0.0  # the second the two counters above are counting
        self.active = 0.0  # the last frame read: idle and body deadlines count from it
        self.over_limit = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<H2ClientConnection {self.peer} [Streams: {len(self.streams)} | {state}]>"

    # -- set up

    def start(self, transport: asyncio.Transport, tls: TlsSession | None) -> None:
        """Take over `transport` (its connection is counted in dp.conns by whoever accepted it)."""
        self.transport = transport
        limits = self.dp.settings.limits
        transport.set_write_buffer_limits(limits.high_water, limits.low_water)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.trusted = self.peer in self.dp.trusted
        self.tls = tls
        if tls is not None:
            if tls.peer_cert:
                self.peer_cert = PeerCert(tls.peer_cert, tls.peer_der or b"")
            self.proto = b"https"
        self.fwd_lines = b"X-Forwarded-For: " + self.peer.encode() + b"\r\nX-Forwarded-Proto: " + self.proto + _CRLF
        config = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                 normalize_inbound_headers=False, validate_outbound_headers=False,
                                 normalize_outbound_headers=False, split_outbound_cookies=False)
        h = self.h2 = H2Connection(config)
        h.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.max_head,
            SettingCodes.ENABLE_PUSH: 0,
        })
        h.initiate_connection()
        # SETTINGS said max_streams. h2 would take one stream more as a connection error (GOAWAY for all of
        # them); RFC 9113 5.1.2 asks for a stream error, which _request gives (REFUSED_STREAM). Its own
        # count is lifted past ours (the value in force, not a new SETTINGS: nothing more is sent).
        cast(Any, h.local_settings)._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2**31 - 1])
        h.increment_flow_control_window(STREAM_WINDOW * (self.max_streams - 1))
        self.active = self.window_start = self.now()
        self.deadline = self.active + self.dp.t_header_read
        self.flush()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Only for a transport handed over after connection_made (see h2_takeover / H2cSniff)."""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.transport is None:
            return
        self.closed = True
        self.transport = None
        self.dp.client_closed(self)
        for s in list(self.streams.values()):
            s.reset_by_client()
        self.streams.clear()
        self.blocked.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in self.streams.values():
            ex = s.ex
            if ex is not None and ex.up is not None:
                ex.up.pause_reading()
        if not self.stalled_since:
            self.stalled_since = self.now()
            self.rearm()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in self.streams.values():
            ex = s.ex
            if ex is not None and ex.up is not None and not s.up_paused:
                ex.up.resume_reading()
        if not self.blocked:
            self.stalled_since = 0.0
            self.rearm()

    def eof_received(self) -> bool | None:
        if self.closed and self.transport is not None:
            self.transport.close()  # the client read our GOAWAY and closed too
        return None

    def data_received(self, data: bytes) -> None:
        h = self.h2
        if h is None or self.closed:
            return
        now = self.active = self.now()
        try:
            events = h.receive_data(data)
        except ProtocolError:
            # h2 queued a GOAWAY with the error (PROTOCOL_ERROR, FRAME_SIZE_ERROR, ...).
            self.dp.stats.reject("bad_request")
            self._close_after_flush()
            return
        for ev in events:
            if self.gone():
                return
            if isinstance(ev, RequestReceived):
                self._request(ev)
            elif isinstance(ev, DataReceived):
                sid = ev.stream_id
                s = self.streams.get(sid)
                n = ev.flow_controlled_length
                body = ev.data
                if not body and ev.stream_ended is None and self._control(now):
                    return
                if s is not None:
                    s.body(body, n)
                elif n:
                    h.acknowledge_received_data(n, sid)
            elif isinstance(ev, StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.ended()
                    s._maybe_gone()
            elif isinstance(ev, WindowUpdated):
                self.window_opened(ev.stream_id)
            elif isinstance(ev, StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None and not s.done:
                    s.reset_by_client()
                    if self._reset_counted(now):
                        return
                elif s is not None:
                    s.reset_by_client()
            elif isinstance(ev, TrailersReceived):
                pass  # request trailers are not forwarded to an HTTP/1.1 upstream; the end follows
            elif isinstance(ev, (PingReceived, RemoteSettingsChanged, PriorityUpdated)):
                if self._control(now):
                    return
            elif isinstance(ev, SettingsAcknowledged):
                # h2 now decodes no header list over what SETTINGS said (a connection error); ours is a
                # 431 on the stream, so h2's bound stays above it and only stops an HPACK bomb.
                h.decoder.max_header_list_size = 2 * self.max_head
            elif isinstance(ev, ConnectionTerminated):
                self._close_after_flush()
                return
        if self._header_flood():
            return
        self.want_flush()
        self.rearm()

    def gone(self) -> bool:
        return self.closed

    # -- limits

    def _counted(self, now: float) -> None:
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.resets = self.control = 0

    def _reset_counted(self, now: float) -> bool:
        self._counted(now)
        self.resets += 1
        if self.resets > self.max_resets:
            self._calm()
            return True
        return False

    def _control(self, now: float) -> bool:
        self._counted(now)
        self.control += 1
        if self.control > self.max_control:
            self._calm()
            return True
        return False

    def _header_flood(self) -> bool:
        """A header block still open after this read holds more bytes than a head may have (CONTINUATION
        frames without END_HEADERS): h2 would buffer 64 frames of any size."""
        h = self.h2
        buf = cast(Any, h).incoming_buffer._headers_buffer if h is not None else None
        if buf and sum(len(f.data) for f in buf) > self.max_head:
            self.dp.stats.reject("too_large")
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return True
        return False

    def _calm(self) -> None:
        self.dp.stats.reject("bad_request")
        h = self.h2
        if h is not None:
            h.clear_outbound_data_buffer()  # not even the answers (PING, SETTINGS acks) of this read
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _goaway(self, code: int) -> None:
        h = self.h2
        if h is not None:
            with contextlib.suppress(ProtocolError):
                h.close_connection(error_code=code, last_stream_id=self.last_sid)
        self._close_after_flush()

    def _close_after_flush(self) -> None:
        """Send what is queued (the GOAWAY), then close without losing it: a socket closed with unread input
        resets the connection, and the peer's kernel then drops what we sent. So the write side is shut and
        input is read and discarded until the client's EOF, for LINGER seconds at most."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        for s in list(self.streams.values()):
            s.reset_by_client()
        t = self.transport
        if t is None:
            return
        if t.can_write_eof():
            t.write_eof()
        self.deadline = self.now() + LINGER

    # -- requests

    def _request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        h = self.h2
        assert h is not None
        if self.going_away:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: the client retries elsewhere
            return
        if len(self.streams) >= self.max_streams:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            self._control(self.active)  # a client that ignores SETTINGS spends its control budget
            return
        stream = H2Stream(self, sid)
        end = ev.stream_ended is not None
        try:
            ex = self._exchange(stream, ev.headers, end)
        except Malformed:
            self.dp.stats.reject("bad_request")
            self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        self.last_sid = sid
        stream.ex = ex
        self.streams[sid] = stream
        start(self.dp, ex)

    def _exchange(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> Exchange:
        """An h2 request head as the Exchange dispatch takes; Malformed, or ex.refuse for a local answer."""
        dp = self.dp
        plan = dp.plan
        ex = Exchange(stream, plan)
        ex.structured = True
        ex.http11 = False  # no HTTP/1.x 1xx or framing decisions for this client
        ex.t0 = self.now()
        kinds = plan.kinds
        lines = ex.lines
        method = path = authority = host = scheme = cl_raw = None
        cookies: list[bytes] | None = None
        regular = False
        size = n = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if regular:
                    raise Malformed
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":authority" and authority is None:
                    authority = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                else:
                    raise Malformed  # unknown or repeated
                continue
            regular = True
            if _NAME.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
                raise Malformed
            n += 1
            if name == b"cookie":  # split into several fields by HTTP/2; one line for HTTP/1.1 (8.2.3)
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
                continue
            kind = kinds.get(name)
            if kind is None:
                lines.append(b"%b: %b\r\n" % (name, value))
                if name == b"content-type" and is_grpc(value):
                    ex.grpc = True  # the proxy's own answers to it are gRPC responses (proxy.dataplane.grpcwire)
            elif kind == WANTED:
                lines.append(b"%b: %b\r\n" % (name, value))
                _want(ex, name, value)
            elif kind == HOST:
                if host is not None:
                    raise Malformed
                host = value
            elif kind == CONTENT_LENGTH:
                if not value.isdigit() or (cl_raw is not None and cl_raw != value):
                    raise Malformed
                cl_raw = value
            elif name in _NOT_IN_H2:
                raise Malformed
            elif kind == HOP:
                if name == b"te":
                    if value != b"trailers":
                        raise Malformed
                    ex.te_trailers = True  # passed on to an HTTP/2 upstream (gRPC servers require it)
            elif kind == EXPECT:
                if value.lower() != b"100-continue":
                    ex.refuse = Refuse(417, "bad_request")
                ex.expect = True
            elif kind == FORWARDED and self.trusted:
                fwd = ex.fwd
                if fwd is None:
                    fwd = ex.fwd = {}
                fwd[name] = fwd[name] + b", " + value if name in fwd else value
        if method is None or (method != b"CONNECT" and (path is None or scheme is None or path == b"")):
            raise Malformed
        if cookies is not None:
            v = b"; ".join(cookies)
            lines.append(b"cookie: " + v + _CRLF)
            if kinds.get(b"cookie") == WANTED:
                _want(ex, b"cookie", v)
        if authority is not None and host is not None and authority != host:
            raise Malformed
        host_raw = authority if authority is not None else host
        cl = int(cl_raw) if cl_raw is not None else None
        if end and cl:
            raise Malformed  # a body announced, and none sent
        if method != b"GET":
            ex.method_b = method
            m = ex.method = _METHODS.get(method) or method.decode("ascii", "replace")
            ex.head = m == "HEAD"
        if ex.refuse is not None:
            pass
        elif n > self.max_headers or size > self.max_head:
            ex.refuse = Refuse(431, "too_large")
        elif method == b"CONNECT" or host_raw is None:
            ex.refuse = Refuse(400, "bad_request")  # no open proxy; and a request names its host
        elif path is None or (path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS")):
            raise Malformed
        else:
            try:
                request_target(ex, path)
                ex.host = host_of(dp.hosts, host_raw)
            except Refuse as r:
                ex.refuse = r
            else:
                if self.tls is not None and self.tls.misdirected(ex.host):
                    ex.refuse = Refuse(421, "misdirected")
                elif cl is not None and cl > self.max_body:
                    ex.refuse = Refuse(413, "too_large")
        if host_raw is not None:
            ex.host_raw = host_raw
            lines.insert(0, b"Host: " + host_raw + _CRLF)
        if cl is not None:
            ex.cl = cl
            ex.head_tail = b"Content-Length: %d\r\n\r\n" % cl
        elif not end:
            ex.chunked = True
            ex.head_tail = b"Transfer-Encoding: chunked\r\n\r\n"
        if end:
            ex.request_complete = True
        elif ex.method in IDEMPOTENT and (cl is None or cl <= self.retry_limit):
            ex.replay = []
        return ex

    # -- deadlines and the stop

    def rearm(self) -> None:
        dp = self.dp
        if self.closed:
            return  # lingering (see _close_after_flush): that deadline stays
        if self.stalled_since:
            self.deadline = self.stalled_since + dp.t_upstream_idle  # the client stopped taking our data
        elif not self.streams:
            self.deadline = self.active + dp.t_keepalive
        elif any(s.ex is not None and not s.ex.request_complete for s in self.streams.values()):
            self.deadline = self.active + dp.t_body_idle
        else:
            self.deadline = 0.0  # waiting on upstreams, which have deadlines of their own

    def on_deadline(self) -> None:
        self.deadline = 0.0
        if self.closed:
            if self.transport is not None:
                self.transport.abort()  # lingered long enough
            return
        if self.stalled_since or self.streams:
            if not self.stalled_since:
                self.dp.stats.reject("timeout")
            self.abort()
        else:
            self._goaway(ErrorCodes.NO_ERROR)

    def close_if_idle(self) -> bool:
        """The graceful stop: GOAWAY naming the last stream taken; the open ones may finish."""
        if self.closed:
            return True
        if not self.going_away:
            self.going_away = True
            self.flush()
            t = self.transport
            if t is not None:
                # Written by hand: h2's own close_connection would refuse the frames of the open streams.
                t.write(GoAwayFrame(stream_id=0, last_stream_id=self.last_sid, error_code=0).serialize())
        if not self.streams:
            self._close_after_flush()
            return True
        return False

    def stream_gone(self, stream: H2Stream) -> None:
        super().stream_gone(stream)
        if self.going_away and not self.streams:
            self._close_after_flush()

    def abort(self) -> None:
        t = self.transport
        self.flush()
        self.closed = True
        for s in list(self.streams.values()):
            s.reset_by_client()
        if t is not None:
            t.abort()


def _want(ex: Exchange, name: bytes, value: bytes) -> None:
    k = name.decode("latin-1")
    v = value.decode("latin-1")
    w = ex.wanted
    if w is None:
        ex.wanted = {k: v}
    elif k in w:
        w[k] = w[k] + ("; " if k == "cookie" else ", ") + v
    else:
        w[k] = v

