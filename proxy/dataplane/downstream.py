"""The client side: HTTP/1.x requests parsed by llhttp, answered in order, proxied without coroutines.

Design rules:
- Callback-only: parser callbacks build an Exchange, pick a route and version, and write to a pooled
  upstream connection; upstream callbacks write the response back. No coroutine or future per request.
- Responses leave in request order: only the head of the queue talks to an upstream; requests parsed
  behind it wait (bounded by limits.max_pipelined, then reading pauses).
- A request body is re-framed from what the parser validated; raw framing bytes are never forwarded.
- Error rule: before the response started, answer with a status; after it, abort the connection so the
  client can never take a truncated response as complete.
- Every refusal is decided before anything is sent upstream, and counted with stats.reject(reason).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from proxy.dataplane.headers import (
    CONNECTION,
    CONTENT_LENGTH,
    CONTINUE,
    EXPECT,
    FORWARDED,
    HOST,
    IDEMPOTENT,
    LOCAL_RESPONSES,
    TRANSFER_ENCODING,
    UPGRADE,
    LazyHeaders,
    connection_tokens,
    local_response,
    split_host,
    valid_host,
)
from proxy.dataplane.plan import WANTED
from proxy.table import cookie_value, normalize_path

if TYPE_CHECKING:
    from proxy.dataplane.listener import DataPlane
    from proxy.dataplane.plan import Plan
    from proxy.dataplane.pool import Endpoint
    from proxy.dataplane.upstream import UpstreamConnection
    from proxy.table import CompiledRoute
    from proxy.telemetry.stats import RejectReason, UpstreamErrorKind

# Parse phases of the connection's incoming byte stream.
IDLE: Final = 0  # between requests (the next byte starts a head)
HEAD: Final = 1
BODY: Final = 2

# When requests are already queued, input is parsed in slices this large so that at most a slice's worth
# of extra pipelined requests is parsed beyond limits.max_pipelined before reading pauses.
PIPELINE_SLICE: Final = 2048

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
# Connection may not name these: Host is end-to-end and what the route was chosen by.
_NEVER_HOP: Final = frozenset({b"host"})
_NO_HEADERS: Final[dict[str, str]] = {}  # never written to
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
# A '%' not followed by two hex digits, or an encoded NUL: a path an upstream cannot decode, or (in C) truncates.
_BAD_PCT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})|%00")
_ERROR_KIND: Final[dict[str, UpstreamErrorKind]] = {
    "connect": "connect", "connect_timeout": "timeout", "timeout": "timeout", "reset": "reset",
    "invalid_response": "invalid_response",
}


class _Refuse(Exception):
    def __init__(self, status: int, reason: RejectReason) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason: RejectReason = reason


class _Stop(Exception):
    """Raised from a parser callback after the refusal was already queued."""


class Exchange:
    """One request and its response. Class attributes are the defaults; instances set what differs."""

    client: ClientConnection
    method: str = "GET"
    method_b: bytes = b"GET"
    target: bytes = b"/"
    http11: bool = True
    keep_alive: bool = True
    head: bool = False
    host_raw: bytes | None = None
    host: str = ""
    path: str = "/"
    query: str | None = None
    cl: int | None = None
    chunked: bool = False
    expect: bool = False
    upgrade: bool = False
    upgrade_value: bytes = b""
    fwd: dict[bytes, bytes] | None = None
    refuse: _Refuse | None = None
    started: bool = False
    request_complete: bool = False
    body_bytes: int = 0
    pending: list[bytes] | None = None
    pending_size: int = 0
    replay: list[bytes] | None = None
    replay_size: int = 0
    mirror_body: list[bytes] | None = None
    mirror_size: int = 0
    sent_body: bool = False
    attempts: int = 0
    retried_same: bool = False
    route: CompiledRoute | None = None
    chain: tuple[str, ...] = ()
    idx: int = 0
    version: str = ""
    endpoint: Endpoint | None = None
    up: UpstreamConnection | None = None
    head_common: bytes = b""
    head_tail: bytes = b"\r\n"
    cookie_version: str | None = None
    response_started: bool = False
    response_done: bool = False
    close_after: bool = False
    tunnel: bool = False
    early: bytes = b""
    status: int = 0
    bytes_out: int = 0
    t0: float = 0.0
    aborted: bool = False
    finished: bool = False
    head_deferred: bool = False
    # The head of a chunked request may go upstream: its first chunk parsed cleanly (or more of it than
    # high_water arrived, or the message ended).
    chunk_ok: bool = False
    client_id: str | None = None
    retried: bool = False
    fell_back: bool = False
    # Values of the headers routes and identities read (see proxy.dataplane.plan), lower-case names.
    wanted: dict[str, str] | None = None

    def __init__(self, client: ClientConnection, plan: Plan) -> None:
        self.client = client
        self.plan = plan
        # Forwarded header lines, formatted as they will be sent ("Name: value\r\n", name as received).
        self.lines: list[bytes] = []


def _set_target(ex: Exchange, target: bytes) -> None:
    """Origin-form target -> ex.target, ex.path and ex.query (path and query as latin-1 text)."""
    q = target.find(b"?")
    if b"%" in target and _BAD_PCT.search(target, 0, q if q >= 0 else len(target)) is not None:
        raise _Refuse(400, "bad_request")  # the query is the application's to decode, as nginx leaves it
    ex.target = target
    if q >= 0:
        ex.path = target[:q].decode("latin-1")
        ex.query = target[q + 1:].decode("latin-1")
    else:
        ex.path = target.decode("latin-1")


class ClientConnection(asyncio.Protocol):
    # Reasons reading from the client is paused (a bit mask: reading resumes when all are clear).
    P_BACKLOG: Final = 1  # too many queued requests, or parsing stopped
    P_PENDING: Final = 2  # body bytes waiting for an upstream connection
    P_UPSTREAM: Final = 4  # the upstream's write buffer is full
    P_TUNNEL: Final = 8  # upgrade requested; waiting for the upstream's answer
    # The client's own write buffer is over the high-water mark: it is not reading what we answer, so
    # parsing more of its requests would only pile up answers (local ones need no upstream to pile up).
    P_WRITE: Final = 16
    P_HOLD: Final = P_PENDING | P_WRITE  # reasons that stop parsing buffered input too

    def __init__(self, dp: DataPlane) -> None:
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
        self.queue: deque[Exchange] = deque()
        self.cur: Exchange | None = None
        self.url = b""
        self.phase = IDLE
        self.raw_head = 0
        self.head_bytes = 0
        self.nheaders = 0
        self.nhost = 0
        self.tokens: set[bytes] | None = None
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
        # The proxy's own request lines for the last (Host, route) seen on this connection (see request_head).
        self.tail = b""
        self.tail_host: bytes | None = None
        self.tail_route: str | None = None
        self.tunnel_up: UpstreamConnection | None = None

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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.over_limit:  # refused in connection_made: never counted, nothing to release
            return
        self.dp.conns.discard(self)
        self.dp.stats.connection("downstream", -1)
        if self.dp.draining and not self.dp.conns:
            self.dp.drained.set()
        if self.tunnel_up is not None:
            self.tunnel_up.close()
            self.tunnel_up = None
        for ex in self.queue:
            ex.aborted = True
            up = ex.up
            if up is not None and not ex.response_done:
                up.ex = None
                up.abort()
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
            self._refuse_parsing(_Refuse(431, "too_large"))
        elif self.phase == BODY and not self.stopped:
            if self.body_left is None and self._framing_over(len(data)):
                self._refuse_parsing(_Refuse(431, "too_large"))
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

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pause(self.P_WRITE)
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
        self.resume(self.P_WRITE)
        self._rearm()
        if self.backlog and not self.feeding and not self.closed:
            self._feed(b"")

    # -- input

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
                if len(self.queue) >= self.max_pipelined or self.paused & self.P_HOLD:
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
                    self._refuse_parsing(_Refuse(431, "too_large"))
                    view = b""
                    break
                if self.phase == BODY and self.body_left is None and self._framing_over(take):
                    self._refuse_parsing(_Refuse(431, "too_large"))
                    view = b""
                    break
        finally:
            self.feeding = False
        if not self.stopped:
            self._fed()
        data = bytes(view) if isinstance(view, memoryview) else view
        self.backlog = data
        if data:
            self.pause(self.P_BACKLOG)
        elif not self.stopped:
            self.resume(self.P_BACKLOG)

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

    def _send_held(self, ex: Exchange) -> None:
        ex.head_deferred = False
        ex.chunk_ok = True
        up = ex.up
        if up is None or up.transport is None:
            return
        body = ex.pending or []
        ex.pending = None
        ex.pending_size = 0
        ex.sent_body = True
        up.transport.write(b"".join((ex.head_common, self.dp.version_header(ex.version), ex.head_tail, *body)))

    def _parse_error(self, e: HttpParserError) -> None:
        ctx = e.__context__
        if isinstance(ctx, _Stop):
            return
        if isinstance(ctx, _Refuse):
            refuse = ctx
        elif e.args == ("Invalid HTTP version",):  # llhttp's reason for HTTP/1.2, HTTP/3.0, HTTP/9.7, ...
            refuse = _Refuse(505, "bad_request")
        else:
            refuse = _Refuse(400, "bad_request")
        self._refuse_parsing(refuse)

    def _refuse_parsing(self, refuse: _Refuse) -> None:
        """The byte stream is unusable from here: answer in order, then close."""
        self.stopped = True
        self.pause(self.P_BACKLOG)
        ex = self.cur
        self.cur = None
        self.phase = IDLE
        if ex is not None and ex.started:
            # The request was already being proxied (its body was bad or too large).
            self.dp.stats.reject(refuse.reason)
            self._abort_active(ex, refuse.status)
            return
        if ex is None or ex not in self.queue:
            ex = Exchange(self, self.dp.plan)
            self.queue.append(ex)
        ex.refuse = refuse
        ex.keep_alive = False
        self._pump()

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
        self.cl = None
        self.deadline = self.now() + self.dp.t_header_read

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_line:
            raise _Refuse(414, "too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        if ex is None or self.phase != HEAD:
            return  # trailers are not forwarded
        self.nheaders += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.nheaders > self.max_headers or self.head_bytes > self.max_head:
            raise _Refuse(431, "too_large")
        n = name.lower()
        kind = self.kinds.get(n)
        if kind is None:
            ex.lines.append(b"%b: %b\r\n" % (name, value))
        elif kind == WANTED:
            ex.lines.append(b"%b: %b\r\n" % (name, value))
            k = n.decode("latin-1")
            v = value.decode("latin-1")
            w = ex.wanted
            if w is None:
                ex.wanted = {k: v}
            elif k in w:
                w[k] = w[k] + ("; " if k == "cookie" else ", ") + v
            else:
                w[k] = v
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
                raise _Refuse(417, "bad_request")
            ex.expect = True
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
        if p.get_http_version() != "1.1":
            ex.http11 = False
        if not p.should_keep_alive():
            ex.keep_alive = False
        upgrade = p.should_upgrade()
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
                _set_target(ex, url)
                ex.host = self._host(host_raw)
            except _Refuse as r:
                ex.refuse = r
                ex.keep_alive = False
                ex.host = ""
        else:
            try:
                self._validate(ex, method, cl)
            except _Refuse as r:
                ex.refuse = r
                ex.keep_alive = False
        if not ex.http11 and p.get_http_version() != "1.0":
            # llhttp also takes HTTP/0.9 (a request line without a version, too) and HTTP/2.0; neither can be
            # forwarded as HTTP/1.1.
            ex.refuse = _Refuse(505, "bad_request")
            ex.keep_alive = False
        if self.tokens and not self.tokens <= {b"close", b"keep-alive", b"upgrade"}:
            tokens = self.tokens - _NEVER_HOP
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
            self.pause(self.P_BACKLOG)
        self._pump()
        if ex.refuse is not None:
            raise _Stop  # stop the parser: nothing after this counts

    def _validate(self, ex: Exchange, method: str, cl: int | None) -> None:
        if method == "CONNECT":
            raise _Refuse(400, "bad_request")  # no open proxy
        if self.nhost > 1 or (self.nhost == 0 and ex.http11):
            raise _Refuse(400, "bad_request")
        url = self.url
        if url[:1] == b"/" or (url == b"*" and method == "OPTIONS"):
            target = url
        else:
            try:
                # Untyped on purpose: httptools' stub declares every URL part as bytes/int, but absent parts
                # are None, and compiled (mypyc) code checks declared attribute types at run time.
                parsed: Any = parse_url(url)
            except HttpParserError:
                raise _Refuse(400, "bad_request") from None
            if parsed.schema not in (b"http", b"https") or not parsed.host:
                raise _Refuse(400, "bad_request")
            authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            if ex.host_raw is None or split_host(authority) != split_host(ex.host_raw):
                raise _Refuse(400, "bad_request")  # absolute-form for another host: not an open proxy
            target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        _set_target(ex, target)
        host_raw = ex.host_raw
        if host_raw is not None:
            ex.host = self._host(host_raw)
        if ex.upgrade and (ex.chunked or cl):
            raise _Refuse(400, "bad_request")
        if ex.upgrade and ex.upgrade_value.strip().lower() != b"websocket":
            # Only WebSocket is tunnelled: another protocol (h2c) would get a raw tunnel past routing and
            # header rules. Proxied as a plain request without Upgrade; llhttp stops parsing at an upgrade,
            # so the connection closes after the response.
            ex.upgrade = False
            ex.keep_alive = False
        if cl is not None and cl > self.max_body:
            raise _Refuse(413, "too_large")

    def _host(self, host_raw: bytes) -> str:
        """The lower-case host of a Host value, cached per value (a keep-alive client repeats it)."""
        host = self.dp.hosts.get(host_raw)
        if host is not None:
            return host
        if not valid_host(host_raw):
            raise _Refuse(400, "bad_request")  # userinfo or garbage: routed as one host, read as another
        hosts = self.dp.hosts
        if len(hosts) > 1000:  # bounded: Host values are client-controlled
            hosts.clear()
        host = hosts[host_raw] = split_host(host_raw)
        return host

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
            raise _Refuse(413, "too_large")
        frame = b"%x\r\n%b\r\n" % (n, data) if ex.chunked else data
        self._body_frame(ex, frame, n)
        self.deadline = self.now() + self.dp.t_body_idle

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
        if up is not None and up.transport is not None and not ex.head_deferred:
            ex.sent_body = True
            up.transport.write(frame)
        elif not ex.response_done:
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(frame)
            ex.pending_size += n
            if ex.pending_size > self.high_water:
                if ex.head_deferred and up is not None:
                    self._send_held(ex)  # a first chunk too large to hold back is streamed
                else:
                    self.pause(self.P_PENDING)

    def on_chunk_complete(self) -> None:
        self.in_data = False
        ex = self.cur
        if ex is not None and not ex.chunk_ok:
            ex.chunk_ok = True  # the head goes once the read it ended in parsed cleanly (see _fed)

    def on_message_complete(self) -> None:
        if (self.phase == BODY and self.body_left is None
                and self.framing + self.slice - self.body_seen > self.max_framing):
            # The message ended in the slice that took the framing in a row past the bound.
            raise _Refuse(431, "too_large")
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
            up.deadline = self.now() + self.dp.t_upstream_response
        if ex.mirror_body is not None and ex.route is not None:
            self.dp.mirror.send(ex)

    # -- dispatch

    def _pump(self) -> None:
        if self.pumping:
            return
        self.pumping = True
        try:
            queue = self.queue
            while queue and not queue[0].started and not self.closed:
                self._start(queue[0])
        finally:
            self.pumping = False

    def _start(self, ex: Exchange) -> None:
        ex.started = True
        dp = self.dp
        if ex.refuse is not None:
            dp.stats.reject(ex.refuse.reason)
            self._local(ex, ex.refuse.status)
            return
        table = dp.holder.table
        plan = dp.plan
        if plan.table is not table:
            plan = dp.use_plan(table)
        hdrs: Mapping[str, str]
        if ex.plan is plan and plan.exact:
            hdrs = ex.wanted or _NO_HEADERS
            # Routes match on the path the upstream will resolve (dot-segments, "//", %-encoded letters).
            route = plan.single or table.match(ex.host, normalize_path(ex.path), hdrs)
        else:  # parsed under another table: the headers it reads may not have been captured
            hdrs = LazyHeaders(ex.lines)
            route = table.match(ex.host, normalize_path(ex.path), hdrs)
        if route is None:
            dp.stats.reject("no_route")
            if dp.access_log is not None:
                self._log_local(ex, "", 404)
            self._local(ex, 404)
            return
        ex.route = route
        cid = ex.client_id = route.client_id(hdrs, ex.query) if route.identity else None
        cookie = route.assignment_cookie
        v = cookie_value(hdrs.get("cookie"), cookie) if cookie is not None else None
        if v is not None:
            # A pin beats an older assignment cookie, which beats the sticky split.
            ex.cookie_version = v
            pick = route.pick_session(cid, v)
        else:
            pick = plan.pick(route, cid)
        ex.chain = chain = pick[1]
        ex.head_common = dp.request_head(self, ex, route.name)
        if route.route.mirror is not None:
            dp.mirror.consider(ex, route)
        backend = dp.backends.get(chain[0])
        ep = backend.pick() if backend is not None else None
        if ep is not None:
            ex.version = chain[0]
            ex.endpoint = ep
        else:
            if self._next_version(ex, 1) < 0 and self._spread(ex) < 0:
                dp.stats.reject("no_healthy_version")
                # Counted under the version it was meant for: its error ratio shows what its clients saw.
                ex.version = chain[0]
                now = dp.now()
                dp.stats.request(route.name, chain[0], 503, now - ex.t0, ex.body_bytes, 0)
                if dp.access_log is not None:
                    self._log(ex, 503, now, answered=False)
                self._local(ex, 503)
                return
            dp.stats.fallback(route.name, chain[0], ex.version)
            ex.fell_back = True
            ep = ex.endpoint
            assert ep is not None
        if ex.expect and ex.http11 and not ex.request_complete:  # HTTP/1.0 clients never wait for a 100
            self.write(CONTINUE)
        ex.attempts = 1
        conn = ep.take_idle()
        if conn is not None:
            self.attach(ex, conn)
        else:
            dp.connect(ep, ex)

    def _next_version(self, ex: Exchange, start: int) -> int:
        backends = self.dp.backends
        chain = ex.chain
        for i in range(start, len(chain)):
            b = backends.get(chain[i])
            if b is not None:
                ep = b.pick()
                if ep is not None:
                    ex.idx = i
                    ex.version = chain[i]
                    ex.endpoint = ep
                    return i
        return -1

    def _spread(self, ex: Exchange) -> int:
        """No version of the chain can serve: another version of the split that can, weighted among those
        (a pinned client keeps just its chain). It joins the chain, so a retry moves on from it. Returns its
        index in the chain, or -1."""
        route = ex.route
        if route is None or route.pinned(ex.client_id):
            return -1
        backends = self.dp.backends
        chain = ex.chain
        usable = [False] * len(route.split_names)
        found = False
        for i, v in enumerate(route.split_names):
            if v not in chain:
                b = backends.get(v)
                if b is not None and b.has_healthy():
                    usable[i] = found = True
        if not found:
            return -1
        i = route.spread(usable, ex.client_id)
        if i < 0:
            return -1
        v = route.split_names[i]
        ep = backends[v].pick()
        assert ep is not None
        ex.chain = (*chain, v)
        ex.idx = len(chain)
        ex.version = v
        ex.endpoint = ep
        return ex.idx

    def _connect(self, ex: Exchange, fresh: bool = False) -> None:
        ep = ex.endpoint
        assert ep is not None
        ex.attempts += 1
        conn = None if fresh else ep.take_idle()
        if conn is not None:
            self.attach(ex, conn)
        else:
            self.dp.connect(ep, ex)

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        if ex.aborted or ex.response_done or self.closed:
            self.dp.release(conn)
            return
        ex.up = conn
        conn.ex = ex
        conn.lines = []
        conn.special = []
        conn.got_bytes = conn.informational = conn.until_eof = False
        conn.in_head = True
        conn.head_size = 0
        conn.deadline = 0.0
        dp = self.dp
        assert conn.transport is not None
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
            head = (ex.head_common, dp.version_header(ex.version), ex.head_tail)
            conn.transport.write(b"".join((*head, *body) if body else head))
        if self.paused & self.P_PENDING:
            self.resume(self.P_PENDING)
        if ex.request_complete:
            conn.deadline = dp.now() + dp.t_upstream_response
        if self.write_paused:
            conn.pause_reading()
        if self.backlog and not self.feeding:
            self._feed(b"")

    # -- completion and failure

    def response_complete(self, ex: Exchange) -> None:
        ex.response_done = True
        ex.up = None
        dp = self.dp
        now = dp.now()
        route = ex.route
        if route is not None:
            dp.stats.request(route.name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
            if dp.access_log is not None:
                self._log(ex, ex.status, now)
        if not ex.request_complete:
            # Answered before the request body ended: the rest of the body cannot be skipped safely.
            self._close()
            return
        queue = self.queue
        if (len(queue) == 1 and queue[0] is ex and ex.keep_alive and not ex.close_after and not dp.draining
                and not self.eof and not self.backlog and not ex.finished):
            # Fast path of _finish: the only request of a keep-alive connection is done.
            ex.finished = True
            queue.popleft()
            if self.phase == IDLE:
                self.deadline = now + dp.t_keepalive
            else:
                self._rearm()
            return
        self._finish(ex)

    def upstream_failed(self, ex: Exchange, conn: UpstreamConnection | None, kind: str,
                        before_response: bool) -> None:
        if ex.response_done or ex.aborted or self.closed:
            return
        ex.up = None
        dp = self.dp
        ep = ex.endpoint
        route = ex.route
        assert route is not None and ep is not None
        connect_failed = kind == "connect" or kind == "connect_timeout"
        if connect_failed or kind == "timeout":
            # A hung endpoint may still pass its health check: its timeouts must eject it like 5xx do.
            dp.health.failure(ep)
        dp.stats.upstream_error(ex.version, _ERROR_KIND[kind], route=route.name)
        if ex.response_started:
            now = dp.now()
            dp.stats.request(route.name, ex.version, ex.status, now - ex.t0, ex.body_bytes, ex.bytes_out)
            if dp.access_log is not None:
                self._log(ex, ex.status, now)
            self._abort_active(ex, 502)
            return
        may_replay = not ex.sent_body or ex.replay is not None
        # After a reset the upstream may have acted on the request: only idempotent methods are replayed
        # (RFC 9110 9.2.2); a failed connect wrote nothing, so any method may move on.
        if (connect_failed or (kind == "reset" and before_response and ex.method in IDEMPOTENT)) and may_replay:
            if kind == "reset" and conn is not None and conn.served and not ex.retried_same:
                # A pooled connection the upstream had just closed: one fresh try on the same endpoint.
                ex.retried_same = True
                ex.retried = True
                ex.sent_body = False
                dp.stats.retry(route.name)
                self._connect(ex, fresh=True)
                return
            failed = ex.version
            if self._next_version(ex, ex.idx + 1) >= 0 or self._spread(ex) >= 0:
                dp.stats.retry(route.name)
                dp.stats.fallback(route.name, failed, ex.version)
                ex.retried = ex.fell_back = True
                ex.sent_body = False
                self._connect(ex)
                return
        status = 504 if kind == "timeout" or kind == "connect_timeout" else 502
        now = dp.now()
        dp.stats.request(route.name, ex.version, status, now - ex.t0, ex.body_bytes, 0)
        if dp.access_log is not None:
            self._log(ex, status, now, answered=False)
        self._local(ex, status)

    def _log(self, ex: Exchange, status: int, now: float, answered: bool = True) -> None:
        log = self.dp.access_log
        route = ex.route
        if log is None or route is None:
            return
        ep = ex.endpoint
        log.record(route.name, ex.version, ex.method, ex.target.decode("latin-1"), status, ex.body_bytes,
                   ex.bytes_out if answered else 0, now - ex.t0, ep.url if ep is not None and answered else "",
                   retried=ex.retried, fallback=ex.fell_back, client_id=ex.client_id)

    def _log_local(self, ex: Exchange, route: str, status: int) -> None:
        """A request the proxy answered itself before choosing a version (404, 503)."""
        log = self.dp.access_log
        if log is not None:
            log.record(route, "", ex.method, ex.target.decode("latin-1"), status, ex.body_bytes, 0,
                       self.now() - ex.t0, "", client_id=ex.client_id)

    def _abort_active(self, ex: Exchange, status: int) -> None:
        up = ex.up
        ex.up = None
        if up is not None:
            up.ex = None
            up.abort()
        if ex.response_started:
            self.abort()
        else:
            ex.keep_alive = False
            self._local(ex, status)

    def _local(self, ex: Exchange, status: int) -> None:
        close = (not ex.request_complete or not ex.keep_alive or ex.refuse is not None or self.dp.draining
                 or self.stopped)
        ex.status = status
        ex.response_done = True
        ex.response_started = True
        self.write(local_response(status, close))
        if close:
            self._close()
        else:
            self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if ex.close_after or not ex.keep_alive or self.dp.draining or (self.eof and not queue):
            self._close()
            return
        if queue:
            self._pump()
        else:
            self._rearm()
        if self.backlog and not self.feeding and not self.closed:
            self._feed(b"")

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

    # -- upgrade tunnel

    def _upgraded(self, rest: bytes) -> None:
        ex = self.queue[-1] if self.queue else None
        if ex is None or ex.refuse is not None or ex.response_done or not ex.upgrade:
            self.stopped = True
            return
        # Bytes after the upgrade request belong to the tunnel, if the upstream agrees to one.
        ex.early = rest
        self.stopped = True
        self.pause(self.P_TUNNEL)

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
        self.resume(self.P_TUNNEL | self.P_BACKLOG)

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

    # -- transport helpers

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
            self.dp.stats.reject("timeout")
            ex = self.cur
            if ex is not None and ex.started:
                self._abort_active(ex, 408)
            else:
                self.abort()
        elif not self.queue:
            self._close()

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
                ex.aborted = True
                up = ex.up
                if up is not None and not ex.response_done:
                    up.ex = None
                    up.abort()

    def abort(self) -> None:
        self._close()
        if self.transport is not None:
            self.transport.abort()
