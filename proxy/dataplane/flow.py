"""Flow between the two sides of a client connection: the read-pause bitmask, backpressure both ways,
request bodies on their way upstream, in-order answers, and the WebSocket tunnel.

Design rules:
- Reading from the client is paused for a set of reasons (P_* bits below); it resumes only when every
  reason cleared. A client that stops reading pauses the upstream that feeds it, and the reverse.
- Responses leave in request order: only the head of the queue talks to an upstream; requests parsed
  behind it wait (bounded by limits.max_pipelined, then reading pauses). Input is parsed in slices so a
  burst of pipelined requests stops at that bound.
- Error rule: before the response started, answer with a status; after it, abort the connection so the
  client can never take a truncated response as complete.

ClientFlow is the concrete base of ClientConnection (proxy.dataplane.downstream), which adds the parser
callbacks and deadlines; the methods it leaves to that class are declared at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy.dataplane import grpcwire, h1response
from proxy.dataplane.dispatch import log, start
from proxy.dataplane.exchange import DISPATCHED, PARSED, RESPONDING, ClientSide, Exchange, Refuse
from proxy.dataplane.headers import BEARER_401, CONTINUE, forwarded_head, local_response, status_line
from proxy.dataplane.rewrite import response_pairs

if TYPE_CHECKING:
    import asyncio

    from proxy.dataplane.certs import ListenerTls, TlsSession
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import UpstreamSide

# Reasons reading from the client is paused (a bit mask: reading resumes when all are clear).
P_BACKLOG: Final = 1  # too many queued requests, or parsing stopped
P_PENDING: Final = 2  # body bytes waiting for an upstream connection
P_UPSTREAM: Final = 4  # the upstream's write buffer is full
P_TUNNEL: Final = 8  # upgrade requested; waiting for the upstream's answer
# The client's own write buffer is over the high-water mark: it is not reading what we answer, so
# parsing more of its requests would only pile up answers (local ones need no upstream to pile up).
P_WRITE: Final = 16
P_HOLD: Final = P_PENDING | P_WRITE  # reasons that stop parsing buffered input too

# Parse phases of the connection's incoming byte stream.
IDLE: Final = 0  # between requests (the next byte starts a head)
HEAD: Final = 1
BODY: Final = 2

# When requests are already queued, input is parsed in slices this large so that at most a slice's worth
# of extra pipelined requests is parsed beyond limits.max_pipelined before reading pauses.
PIPELINE_SLICE: Final = 2048

# A keep-alive connection idle this long gives back its parser (about 1 KiB with its bound callbacks) and
# its proxy-header cache; the next read creates a parser again (a few microseconds, once per wake-up).
SHED_AFTER: Final = 1.0

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


class _NoProtocol:
    """The placeholder parser's protocol: it never parses (a shed connection makes its own first)."""


_SHED: Final = HttpRequestParser(_NoProtocol())


class Stop(Exception):
    """Raised from a parser callback after the refusal was already queued."""


class ClientFlow(ClientSide):
    def __init__(self, dp: PlaneState) -> None:
        self.dp = dp
        self.now = dp.now
        limits = dp.settings.limits
        self.max_line = limits.max_request_line
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_body = limits.max_body_bytes
        self.max_pipelined = limits.max_pipelined
        self.high_water = limits.high_water
        self.retry_limit = limits.retry_buffer_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.parser_shed = False  # the parser was given back (shed); data_received makes a new one
        # A list, not a deque: it rarely holds more than one exchange, and an empty deque costs 760 bytes
        # per connection (a list 56); pop(0) of a one- or few-item list is as cheap as popleft.
        self.queue: list[Exchange] = []
        self.cur: Exchange | None = None
        self.url = b""
        self.phase = IDLE
        self.raw_head = 0
        self.head_bytes = 0
        self.nheaders = 0
        self.nhost = 0
        self.tokens: set[bytes] | None = None
        self.hop = False  # the head has a hop-by-hop header other than Connection (Proxy-Connection, TE, ...)
        self.kinds = dp.plan.kinds  # header kinds of the table the current request is parsed under
        self.cl: int | None = None
        self.body_left: int | None = None
        # Bytes of a chunked body that were not body (size lines, extensions, trailers) since the last body
        # byte: llhttp buffers a trailer field whole, so these are bounded like a head. httptools reports
        # framing bytes nowhere, so they are counted per parsed slice (bytes fed minus body bytes seen), never
        # less than they are (see _framing_over): a run over the bound is refused however it is segmented.
        self.framing = 0
        self.max_framing = limits.max_header_bytes + limits.max_request_line
        self.framing_step = max(self.max_framing // 8, 1)
        self.step = self.framing_step  # size of the next slice of a chunked body
        self.in_data = False  # the last chunked-body event was body bytes (not the end of a chunk)
        self.body_seen = 0  # chunked body bytes since the last count
        self.slice = 0  # no smaller than the read or slice being parsed (for on_message_complete)
        self.backlog = b""
        self.feeding = False
        self.pumping = False
        self.stopped = False
        self.closed = False
        self.over_limit = False
        self.paused = 0
        self.write_paused = False
        self.eof = False
        self.deadline = 0.0
        self.peer = ""
        self.trusted = False
        self.fwd_lines = b""
        # Set on a TLS listener's connections only (expect_tls, then tls_made once the handshake completed).
        self.tls_listener: ListenerTls | None = None
        self.proto = b"http"  # X-Forwarded-Proto when a trusted peer sent none
        self.tls: TlsSession | None = None
        # The client certificate the handshake verified against the listener's client_ca, None without one:
        # what the client_cert identity source reads (ClientSide.peer_cert).
        self.peer_cert = None
        # The proxy's own request lines for the last (Host, route) seen on this connection (see upstream_head).
        self.tail = b""
        self.tail_host: bytes | None = None
        self.tail_route: str | None = None
        self.tunnel_up: UpstreamSide | None = None
        self.rmode = 0  # body mode of the structured response going out (proxy.dataplane.h1response)

    # -- idle connections

    def shed(self, now: float) -> None:
        """Called by the sweeper: a keep-alive connection idle for SHED_AFTER, between requests with nothing
        buffered or paused, drops what only a request needs, so 10,000 idle clients cost less memory."""
        if (self.parser_shed or self.phase != IDLE or self.queue or self.backlog or self.paused or self.feeding
                or self.closed or self.stopped or self.tunnel_up is not None or self.cur is not None
                or now + self.dp.t_keepalive - self.deadline < SHED_AFTER):
            return
        self.parser = _SHED
        self.parser_shed = True
        self.tail = b""
        self.tail_host = None
        self.tail_route = None

    # -- backpressure

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pause(P_WRITE)
        self.deadline = self.now() + self.dp.t_upstream_idle
        up = self.tunnel_up
        if up is None and self.queue:
            up = self.queue[0].up
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.tunnel_up
        if up is None and self.queue:
            up = self.queue[0].up
        if up is not None:
            up.resume_reading()
        self.resume(P_WRITE)
        self._rearm()
        if self.backlog and not self.feeding and not self.closed:
            self._feed(b"")

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.write(data)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            if self.phase == BODY:
                self.deadline = 0.0  # waiting on us, not on the client
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._rearm()

    # -- input, parsed in slices

    def _feed(self, data: bytes) -> None:
        if self.backlog:
            data = self.backlog + data
            self.backlog = b""
        if self.feeding:
            self.backlog = data
            return
        self.feeding = True
        parser = self.parser
        # Heads are parsed a slice at a time so that a burst of pipelined requests stops at the queue bound;
        # a Content-Length body is fed exactly, so the heads after it are sliced too.
        view = memoryview(data) if len(data) > PIPELINE_SLICE else data
        try:
            while view:
                if self.stopped:
                    view = b""
                    break
                if len(self.queue) >= self.max_pipelined or self.paused & P_HOLD:
                    break
                n = len(view)
                if self.phase == BODY:
                    left = self.body_left
                    if left is None:
                        take = self.slice = n if n <= self.step else self.step
                    else:
                        take = n if left >= n else max(left, 1)
                else:
                    take = PIPELINE_SLICE if n > PIPELINE_SLICE else n
                    self.raw_head += take
                if take < n:
                    chunk, view = view[:take], view[take:]
                else:
                    chunk, view = view, b""
                try:
                    parser.feed_data(chunk)
                except HttpParserUpgrade as u:
                    self._upgraded(bytes(chunk[u.args[0]:]) + bytes(view))
                    view = b""
                    break
                except HttpParserError as e:
                    self._parse_error(e)
                    view = b""
                    break
                if self.phase == HEAD and self.raw_head > self.max_head + self.max_line:
                    self._refuse_parsing(Refuse(431, "too_large"))
                    view = b""
                    break
                if self.phase == BODY and self.body_left is None and self._framing_over(take):
                    self._refuse_parsing(Refuse(431, "too_large"))
                    view = b""
                    break
        finally:
            self.feeding = False
        if not self.stopped:
            self._fed()
        data = bytes(view) if isinstance(view, memoryview) else view
        self.backlog = data
        if data:
            self.pause(P_BACKLOG)
        elif not self.stopped:
            self.resume(P_BACKLOG)

    def _framing_over(self, fed: int) -> bool:
        """Count a parsed slice of a chunked body; True when the framing in a row may exceed the bound.
        Where in the slice its framing sat is unknown, so the run its first body byte ended is counted as all
        of it. The run after its last body byte is at most a CR when the slice ended in chunk data; otherwise it
        too is counted as all of it. Slices are small (framing_step), so a body of many small chunks is not
        taken for one long run: over-counted by at most two slices, a run up to 3/4 of the bound passes. After
        a slice that was mostly data and ended in data, the next may be as large as the bound leaves (large
        chunks cost few slices); only a switch from there to a span more than 7/8 framing can be over-counted
        past the bound."""
        seen = self.body_seen
        if seen:
            self.body_seen = 0
            gap = fed - seen
            run = self.framing + gap
            self.framing = 1 if self.in_data else gap
            self.step = (self.max_framing - 1 if self.in_data and gap <= self.framing_step // 2
                         else self.framing_step)
        else:
            run = self.framing = self.framing + fed
            self.step = self.framing_step
        return run > self.max_framing

    def _fed(self) -> None:
        """A read parsed without error: a head held back until the first chunk parsed cleanly may go now."""
        ex = self.cur
        if ex is not None and ex.head_deferred and ex.chunk_ok:
            self._send_held(ex)

    # -- request bodies on their way upstream

    def _send_held(self, ex: Exchange) -> None:
        ex.head_deferred = False
        ex.chunk_ok = True
        up = ex.up
        if up is None or (up.transport is None and not up.structured):
            return
        body = ex.pending or []
        ex.pending = None
        ex.pending_size = 0
        ex.sent_body = True
        if up.transport is None:  # structured
            return self._start_structured(ex, up, body)
        up.transport.write(b"".join((ex.head_common, self.dp.version_header(ex.version), ex.head_tail, *body)))

    def _body_frame(self, ex: Exchange, frame: bytes, n: int) -> None:
        if ex.replay is not None:
            if ex.replay_size + n <= self.retry_limit:
                ex.replay.append(frame)
                ex.replay_size += n
            else:
                ex.replay = None
        if ex.mirror_body is not None:
            if ex.mirror_size + n <= self.retry_limit:
                ex.mirror_body.append(frame)
                ex.mirror_size += n
            else:
                ex.mirror_body = None
                self.dp.mirror.count_dropped(ex)
        up = ex.up
        if up is not None and up.structured and not ex.head_deferred:
            ex.sent_body = True
            up.request_data(h1response.unframe(frame, ex.chunked), False)
        elif up is not None and up.transport is not None and not ex.head_deferred:
            ex.sent_body = True
            up.transport.write(frame)
        elif not ex.done():
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(frame)
            ex.pending_size += n
            if ex.pending_size > self.high_water:
                if ex.head_deferred and up is not None:
                    self._send_held(ex)  # a first chunk too large to hold back is streamed
                else:
                    self.pause(P_PENDING)

    # -- in-order answers

    def response_complete(self, ex: Exchange) -> None:
        ex.answered()
        ex.up = None
        if ex.timer is not None:
            ex.timer.cancel()
        dp = self.dp
        now = dp.now()
        route = ex.route
        if route is not None:
            dp.stats.request(route.name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
            if dp.access_log is not None:
                log(self.dp, ex, ex.status, now)
        if not ex.request_complete:
            # Answered before the request body ended: the rest of the body cannot be skipped safely.
            self._close()
            return
        queue = self.queue
        if (len(queue) == 1 and queue[0] is ex and ex.keep_alive and not ex.close_after and not dp.stopping
                and not self.eof and not self.backlog and ex.finish()):
            # Fast path of _finish: the only request of a keep-alive connection is done.
            queue.pop(0)
            if self.phase == IDLE:
                self.deadline = now + dp.t_keepalive
            else:
                self._rearm()
            return
        self._finish(ex)

    def answer(self, ex: Exchange, status: int) -> None:
        close = (not ex.request_complete or not ex.keep_alive or ex.refuse is not None or self.dp.stopping
                 or self.stopped)
        ex.respond(status)
        ex.answered()
        route = ex.route
        dp = self.dp
        self.write(grpcwire.h1_answer(dp.stats, dp.grpc_error_codes, ex, status, close) if ex.grpc
                   else BEARER_401[close] if status == 401 and route is not None and route.challenge
                   else local_response(status, close))
        if close:
            self._close()
        else:
            self._finish(ex)

    def answer_with(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        close = (not ex.request_complete or not ex.keep_alive or ex.refuse is not None or self.dp.stopping
                 or self.stopped)
        ex.respond(status)
        ex.answered()
        self.write(b"".join([status_line(status), *[b"%b: %b\r\n" % nv for nv in headers],
                             b"Content-Length: 0\r\n", b"Connection: close\r\n" if close else b"",
                             b"Server: turnout\r\n\r\n"]))
        if close:
            self._close()
        else:
            self._finish(ex)

    def local_port(self) -> int:
        t = self.transport
        sock = t.get_extra_info("sockname") if t is not None else None
        return int(sock[1]) if isinstance(sock, tuple) and len(sock) >= 2 else 0

    def abort_active(self, ex: Exchange, status: int) -> None:
        up = ex.up
        ex.up = None
        if up is not None:
            up.drop()
        if ex.state >= RESPONDING:
            self.abort()
        else:
            ex.keep_alive = False
            self.answer(ex, status)

    def _finish(self, ex: Exchange) -> None:
        if not ex.finish():
            return
        queue = self.queue
        if queue and queue[0] is ex:
            queue.pop(0)
        if ex.close_after or not ex.keep_alive or self.dp.stopping or (self.eof and not queue):
            self._close()
            return
        if queue:
            self._pump()
        else:
            self._rearm()
        if self.backlog and not self.feeding and not self.closed:
            self._feed(b"")

    # -- upgrade tunnel

    def _upgraded(self, rest: bytes) -> None:
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.refuse is not None or ex.done() or not ex.upgrade:
            self.stopped = True
            return
        # Bytes after the upgrade request belong to the tunnel, if the upstream agrees to one.
        ex.early = rest
        self.stopped = True
        self.pause(P_TUNNEL)

    # -- what the upstream side and dispatch call

    def send_continue(self, ex: Exchange) -> None:
        if ex.http11:  # HTTP/1.0 clients never wait for a 100
            self.write(CONTINUE)

    def upstream_full(self) -> None:
        self.pause(P_UPSTREAM)

    def upstream_writable(self) -> None:
        self.resume(P_UPSTREAM)

    def send_head(self, ex: Exchange, conn: UpstreamSide) -> None:
        dp = self.dp
        if (ex.chunked and not ex.request_complete and (not ex.chunk_ok or self.feeding)
                and ex.pending_size <= self.high_water):
            # Hold the head (and the body so far) until the first chunk parsed cleanly, in a read that parsed
            # without error: a request with a malformed first chunk then never reaches the upstream at all.
            ex.head_deferred = True
        else:
            if ex.head_deferred:  # held on a connection that failed since
                ex.head_deferred = False
            if ex.chunked:
                ex.chunk_ok = True  # held no more: a retry replays what went out
            # A retry replays the whole buffered body; a first attempt sends what waited for the connection.
            body = ex.replay if ex.attempts > 1 and ex.replay is not None else ex.pending or []
            ex.pending = None
            ex.pending_size = 0
            if body:
                ex.sent_body = True
            if conn.transport is None:  # structured (an HTTP/2 stream)
                self._start_structured(ex, conn, body)
            else:
                head = (ex.head_common, dp.version_header(ex.version), ex.head_tail)
                conn.transport.write(b"".join((*head, *body) if body else head))
        if self.paused & P_PENDING:
            self.resume(P_PENDING)
        if ex.request_complete:
            conn.expect_response(dp.now() + (ex.t_response or dp.t_upstream_response))
        if self.write_paused:
            conn.pause_reading()
        if self.backlog and not self.feeding:
            self._feed(b"")

    def _start_structured(self, ex: Exchange, up: UpstreamSide, body: list[bytes]) -> None:
        up.start_request(ex.request_complete and not body)
        for frame in body:
            up.request_data(h1response.unframe(frame, ex.chunked), False)

    # -- the structured response (an HTTP/2 upstream's), formatted as HTTP/1.1 (proxy.dataplane.h1response)

    def response_start(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        head, self.rmode = h1response.head(self.dp, ex, status, response_pairs(ex, headers))
        self.write(head)

    def response_data(self, ex: Exchange, data: bytes) -> None:
        self.write(h1response.data(self.rmode, data))

    def response_end(self, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        self.write(h1response.end(self.rmode, ex, trailers))

    # -- input errors, the queue, closing

    def _parse_error(self, e: HttpParserError) -> None:
        ctx = e.__context__
        if isinstance(ctx, Stop):
            return
        if isinstance(ctx, Refuse):
            refuse = ctx
        elif e.args == ("Invalid HTTP version",):  # llhttp's reason for HTTP/1.2, HTTP/3.0, HTTP/9.7, ...
            refuse = Refuse(505, "bad_request")
        else:
            refuse = Refuse(400, "bad_request")
        self._refuse_parsing(refuse)

    def _refuse_parsing(self, refuse: Refuse) -> None:
        """The byte stream is unusable from here: answer in order, then close."""
        self.stopped = True
        self.pause(P_BACKLOG)
        ex = self.cur
        self.cur = None
        self.phase = IDLE
        if ex is not None and ex.state >= DISPATCHED:
            # The request was already being proxied (its body was bad or too large).
            self.dp.stats.reject(refuse.reason, ex.route.name if ex.route is not None else "")
            self.abort_active(ex, refuse.status)
            return
        if ex is None or ex not in self.queue:
            ex = Exchange(self, self.dp.plan)
            self.queue.append(ex)
        ex.refuse = refuse
        ex.keep_alive = False
        self._pump()

    def _pump(self) -> None:
        if self.pumping:
            return
        self.pumping = True
        try:
            queue = self.queue
            while queue and queue[0].state == PARSED and not self.closed:
                start(self.dp, queue[0])
        finally:
            self.pumping = False

    def upstream_head(self, ex: Exchange, route: str) -> bytes:
        """The request head as it goes upstream, before the version line (see dispatch.start)."""
        fwd = ex.fwd
        if fwd is None:
            # The lines the proxy adds depend only on (peer, Host, route): a keep-alive client repeats them.
            if ex.host_raw == self.tail_host and route == self.tail_route:
                tail = self.tail
            else:
                tail = self.fwd_lines
                if ex.host_raw is not None:
                    tail += b"X-Forwarded-Host: " + ex.host_raw + _CRLF
                self.tail = tail = tail + self.dp.route_header(route)
                self.tail_host = ex.host_raw
                self.tail_route = route
            return b"".join([ex.method_b, b" ", ex.target, b" HTTP/1.1\r\n", *ex.lines, tail])
        # Only ever set for trusted peers: their chain is extended, not replaced.
        return forwarded_head(ex, self.peer, self.proto, self.dp.route_header(route))

    def close_if_idle(self) -> bool:
        if not self.queue and self.phase == IDLE and self.tunnel_up is None:
            self._close()
            return True
        return False

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stopped = True
            if self.transport is not None:
                self.transport.close()
            for ex in self.queue:
                up = ex.up
                if up is not None and not ex.done():
                    up.drop()
                ex.abort()

    def abort(self) -> None:
        self._close()
        if self.transport is not None:
            self.transport.abort()

    # -- left to ClientConnection

    def _rearm(self) -> None:
        raise NotImplementedError
