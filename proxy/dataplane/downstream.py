"""The client side's HTTP/1.x parsing: llhttp callbacks build Exchanges, validate them, and time out.

Design rules:
- Callback-only: parser callbacks build an Exchange and hand it to dispatch (proxy.dataplane.dispatch),
  which picks a route and version and gives it a pooled upstream connection; upstream callbacks write the
  response back. No coroutine or future per request.
- A request body is re-framed from what the parser validated; raw framing bytes are never forwarded.
- Every refusal is decided before anything is sent upstream, and counted with stats.reject(reason).
- Timeouts are one deadline per connection, checked by the listener's sweeper (on_deadline).
Backpressure, in-order answers and the tunnel are the base class's (proxy.dataplane.flow.ClientFlow).
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy.dataplane.dispatch import upstream_failed
from proxy.dataplane.exchange import DISPATCHED, Exchange, Refuse
from proxy.dataplane.flow import BODY, HEAD, IDLE, P_BACKLOG, PIPELINE_SLICE, Stop
from proxy.dataplane.handover import ClientHandover
from proxy.dataplane.headers import (
    CONNECTION,
    CONTENT_LENGTH,
    EXPECT,
    FORWARDED,
    HOP,
    HOST,
    IDEMPOTENT,
    LOCAL_RESPONSES,
    NEVER_HOP,
    TRANSFER_ENCODING,
    UPGRADE,
    capture,
    connection_tokens,
    host_of,
    local_response,
    lower_name,
    request_target,
    validate_request,
)
from proxy.dataplane.plan import WANTED
from proxy.dataplane.pool import UpstreamSide

_LAST_CHUNK: Final = b"0\r\n\r\n"
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class ClientConnection(ClientHandover):
    def __repr__(self) -> str:
        return (f"<ClientConnection {self.peer} [Requests: {len(self.queue)} queued | "
                f"paused: {self.paused} | {'closed' if self.closed else 'open'}]>")

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        limits = self.dp.settings.limits
        if len(self.dp.conns) >= limits.max_connections:
            self.over_limit = True
            self.dp.stats.reject("too_many_connections")
            transport.write(LOCAL_RESPONSES[(503, True)])
            transport.close()
            return
        transport.set_write_buffer_limits(limits.high_water, limits.low_water)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.trusted = self.peer in self.dp.trusted
        self.fwd_lines = b"X-Forwarded-For: " + self.peer.encode() + b"\r\nX-Forwarded-Proto: http\r\n"
        self.dp.conns.add(self)
        self.dp.stats.connection("downstream", 1)
        self.deadline = self.now() + self.dp.t_header_read
        if self.tls_listener is not None:
            self.tls_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.over_limit:  # refused in connection_made: never counted, nothing to release
            return
        self.dp.client_closed(self)
        if self.tunnel_up is not None:
            self.tunnel_up.close()
            self.tunnel_up = None
        for ex in self.queue:
            up = ex.up
            if up is not None and not ex.done():
                up.drop()
            ex.abort()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        up = self.tunnel_up
        if up is not None:
            if up.transport is not None:
                up.transport.write(data)
            self.deadline = self.now() + self.dp.t_upstream_idle  # a tunnel idle in both directions ends
            return
        if self.stopped:
            return
        if self.parser_shed:
            self.parser = HttpRequestParser(self)
            self.parser_shed = False
        if self.queue or self.backlog or self.paused or self.phase == BODY or len(data) > PIPELINE_SLICE:
            self._feed(data)
            return
        # Fast path: an idle connection and a small read, which is one request nearly always.
        self.raw_head += len(data)
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as u:
            self._upgraded(data[u.args[0]:])
        except HttpParserError as e:
            self._parse_error(e)
        finally:
            self.feeding = False
        if self.phase == HEAD and self.raw_head > self.max_head + self.max_line and not self.stopped:
            self._refuse_parsing(Refuse(431, "too_large"))
        elif self.phase == BODY and not self.stopped:
            if self.body_left is None and self._framing_over(len(data)):
                self._refuse_parsing(Refuse(431, "too_large"))
            else:
                self._fed()

    def eof_received(self) -> bool | None:
        if self.tunnel_up is not None and self.tunnel_up.transport is not None:
            if self.tunnel_up.transport.can_write_eof():
                self.tunnel_up.transport.write_eof()
            return True
        # A client that half-closes after its last complete request still gets the answers to queued
        # requests, if that request asked to close the connection: the client is done sending and waits.
        # After a keep-alive request a FIN almost always means a full close (a client that gave up), which
        # TCP cannot tell apart; holding the upstream requests until upstream_response would keep a hung
        # endpoint busy for nobody, so the connection closes and connection_lost releases them. A
        # half-closed request can never complete, so that closes at once too.
        if self.queue and self.phase == IDLE and not self.backlog and not self.queue[-1].keep_alive:
            self.eof = True
            return True
        return None

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        plan = self.dp.plan
        self.kinds = plan.kinds
        self.cur = Exchange(self, plan)
        self.url = b""
        self.phase = HEAD
        self.head_bytes = 0
        self.nheaders = 0
        self.nhost = 0
        self.tokens = None
        self.hop = False
        self.cl = None
        self.deadline = self.now() + self.dp.t_header_read

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_line:
            raise Refuse(414, "too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        if ex is None or self.phase != HEAD:
            return  # trailers are not forwarded
        self.nheaders += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.nheaders > self.max_headers or self.head_bytes > self.max_head:
            raise Refuse(431, "too_large")
        n = lower_name(name)
        kind = self.kinds.get(n)
        if kind is None:
            ex.lines.append(b"%b: %b\r\n" % (name, value))
        elif kind == WANTED:
            ex.lines.append(b"%b: %b\r\n" % (name, value))
            capture(ex, n, value)
        elif kind == HOST:
            self.nhost += 1
            ex.host_raw = value
            ex.lines.append(b"%b: %b\r\n" % (name, value))
        elif kind == CONTENT_LENGTH:
            # llhttp validated the digits (and refuses a second, different one); we send our own framing.
            self.cl = int(value)
        elif kind == TRANSFER_ENCODING:
            ex.chunked = True
        elif kind == CONNECTION:
            t = connection_tokens(value)
            self.tokens = t if self.tokens is None else self.tokens | t
        elif kind == UPGRADE:
            ex.upgrade_value = value
        elif kind == EXPECT:
            if value.lower() != b"100-continue":
                raise Refuse(417, "bad_request")
            ex.expect = True
        elif kind == HOP:
            self.hop = True  # Proxy-Connection is one: llhttp reads it as Connection (see on_headers_complete)
            if n == b"te" and b"trailers" in value.lower():
                ex.te_trailers = True  # dropped as hop-by-hop; an HTTP/2 upstream is told (h2upstream)
        elif kind == FORWARDED and self.trusted:
            fwd = ex.fwd
            if fwd is None:
                fwd = ex.fwd = {}
            fwd[n] = fwd[n] + b", " + value if n in fwd else value

    def on_headers_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        p = self.parser
        self.raw_head = 0
        # Attributes are written only when they differ from the class defaults (the common GET): every
        # write is a dict insert on the request path.
        method_b = p.get_method()
        if method_b == b"GET":
            method = "GET"
        else:
            ex.method_b = method_b
            method = ex.method = _METHODS.get(method_b) or method_b.decode("ascii", "replace")
            if method == "HEAD":
                ex.head = True
        if not p.should_keep_alive():
            ex.keep_alive = False
        # llhttp keeps other versions alive only for a Connection/Proxy-Connection token: skip get_http_version.
        # Its upgrade needs Connection (or Proxy-Connection): upgrade, or CONNECT: skip should_upgrade for a GET.
        plain = ex.keep_alive and self.tokens is None and not self.hop
        if not plain and p.get_http_version() != "1.1":
            ex.http11 = False
        upgrade = p.should_upgrade() if not plain or method != "GET" else False
        if upgrade:
            ex.upgrade = True
        now = ex.t0 = self.now()
        cl = self.cl
        if cl is not None:
            ex.cl = cl
        url = self.url
        host_raw = ex.host_raw
        if (self.nhost == 1 and url[:1] == b"/" and not upgrade and (cl is None or cl <= self.max_body)
                and host_raw is not None):
            # The common case, validated inline; everything else goes through _validate.
            try:
                request_target(ex, url)
                ex.host = host_of(self.dp.hosts, host_raw)
            except Refuse as r:
                ex.refuse = r
                ex.keep_alive = False
                ex.host = ""
        else:
            try:
                validate_request(ex, self.url, self.nhost, method, cl, self.max_body, self.dp.hosts)
            except Refuse as r:
                ex.refuse = r
                ex.keep_alive = False
        tls = self.tls
        if tls is not None and ex.refuse is None and tls.misdirected(ex.host):
            ex.refuse = Refuse(421, "misdirected")
            ex.keep_alive = False
        if not ex.http11 and p.get_http_version() != "1.0":
            # llhttp also takes HTTP/0.9 (a request line without a version, too) and HTTP/2.0; neither can be
            # forwarded as HTTP/1.1.
            ex.refuse = Refuse(505, "bad_request")
            ex.keep_alive = False
        if self.tokens and not self.tokens <= {b"close", b"keep-alive", b"upgrade"}:
            tokens = self.tokens - NEVER_HOP
            ex.lines = [ln for ln in ex.lines if ln.split(b":", 1)[0].lower() not in tokens]
            if ex.wanted is not None:
                ex.wanted = {k: v for k, v in ex.wanted.items() if k.encode("latin-1") not in tokens}
            if ex.fwd is not None:
                ex.fwd = {k: v for k, v in ex.fwd.items() if k not in tokens}
        if ex.upgrade:
            ex.head_tail = b"Connection: upgrade\r\nUpgrade: " + ex.upgrade_value + b"\r\n\r\n"
        elif ex.chunked:
            ex.head_tail = b"Transfer-Encoding: chunked\r\n\r\n"
        elif cl is not None:
            ex.head_tail = b"Content-Length: %d\r\n\r\n" % cl
        self.body_left = None if ex.chunked else cl
        if ex.chunked or cl:
            self.phase = BODY
            self.framing = self.body_seen = 0
            self.step = self.framing_step
            self.in_data = False
            self.slice = max(self.slice, PIPELINE_SLICE)  # the head ended in a read or head slice no larger
            self.deadline = now + self.dp.t_body_idle
            if method in IDEMPOTENT and (cl is None or cl <= self.retry_limit):
                ex.replay = []
        else:
            # No body: the request is complete as far as the upstream is concerned.
            ex.request_complete = True
            self.deadline = 0.0
        self.queue.append(ex)
        if ex.refuse is not None:
            self.stopped = True
            self.cur = None
            self.phase = IDLE
            self.pause(P_BACKLOG)
        self._pump()
        if ex.refuse is not None:
            raise Stop  # stop the parser: nothing after this counts

    def on_body(self, data: bytes) -> None:
        ex = self.cur
        if ex is None:
            return
        n = len(data)
        if self.body_left is not None:
            self.body_left -= n
        else:
            self.body_seen += n
            self.in_data = True
        ex.body_bytes += n
        if ex.body_bytes > self.max_body:
            raise Refuse(413, "too_large")
        frame = b"%x\r\n%b\r\n" % (n, data) if ex.chunked else data
        self._body_frame(ex, frame, n)
        self.deadline = self.now() + self.dp.t_body_idle

    def on_chunk_complete(self) -> None:
        self.in_data = False
        ex = self.cur
        if ex is not None and not ex.chunk_ok:
            ex.chunk_ok = True  # the head goes once the read it ended in parsed cleanly (see _fed)

    def on_message_complete(self) -> None:
        if (self.phase == BODY and self.body_left is None
                and self.framing + self.slice - self.body_seen > self.max_framing):
            # The message ended in the slice that took the framing in a row past the bound.
            raise Refuse(431, "too_large")
        ex = self.cur
        self.cur = None
        self.phase = IDLE
        if ex is None:
            return
        if ex.request_complete:  # no body: everything was done when the head completed
            if not self.queue:
                self._rearm()
            return
        if ex.chunked:
            ex.chunk_ok = True
            self._body_frame(ex, _LAST_CHUNK, 0)
            if ex.head_deferred:
                self._send_held(ex)
        ex.request_complete = True
        self._rearm()
        up = ex.up
        if up is not None:
            up.expect_response(self.now() + (ex.t_response or self.dp.t_upstream_response))
        if ex.mirror_body is not None and ex.route is not None:
            self.dp.mirror.send(ex, self.dp.backends)

    # -- what the upstream side reports

    def upstream_failed(self, ex: Exchange, up: UpstreamSide | None, kind: str, before_response: bool) -> None:
        upstream_failed(self.dp, ex, up, kind, before_response)

    # -- deadlines

    def _rearm(self) -> None:
        if self.write_paused:
            # The client stopped reading: keep the deadline pause_writing set (never extend it).
            if not self.deadline:
                self.deadline = self.now() + self.dp.t_upstream_idle
        elif self.phase == IDLE and not self.queue and not self.closed:
            self.deadline = self.now() + self.dp.t_keepalive
        elif self.phase == BODY and not self.paused:
            self.deadline = self.now() + self.dp.t_body_idle
        elif self.tunnel_up is not None:
            self.deadline = self.now() + self.dp.t_upstream_idle
        elif self.phase != HEAD:
            self.deadline = 0.0

    def on_deadline(self) -> None:
        self.deadline = 0.0
        if self.closed:
            return
        if self.write_paused or self.tunnel_up is not None:
            self.abort()  # the client stopped reading, or the tunnel was idle for upstream_idle
        elif self.phase == HEAD:
            self.dp.stats.reject("timeout")
            if self.queue:
                self.abort()
            else:
                self.write(local_response(408, True))
                self._close()
        elif self.phase == BODY:
            ex = self.cur
            route = ex.route if ex is not None else None
            self.dp.stats.reject("timeout", route.name if route is not None else "")
            if ex is not None and ex.state >= DISPATCHED:
                self.abort_active(ex, 408)
            else:
                self.abort()
        elif not self.queue:
            self._close()

