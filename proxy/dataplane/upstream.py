"""One keep-alive connection to an upstream endpoint, parsing responses with llhttp.

Design rule: the response is re-framed from what the parser validated (never raw framing bytes) and
written straight to the client's transport from the parser callbacks. Failures are reported to the
client connection with whether any response byte had arrived, because that decides retry vs. abort.
A connection goes back to its pool (Endpoint.put_idle) only after its response was read completely and not
marked close, and only once the rest of the read that completed it was parsed: a byte past the end of a
response is one nobody asked for, and the connection is closed instead (see _settle). Only this class
writes its fields: the client side starts an exchange on it with begin() and gives up with drop().
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxy.dataplane.exchange import TUNNEL
from proxy.dataplane.headers import IDEMPOTENT, RESPONSE_DROP, STATUS_LINES, connection_tokens, status_line
from proxy.dataplane.pool import UpstreamSide
from proxy.dataplane.rewrite import response_lines

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import Endpoint

# How the response body goes to the client.
NONE: Final = 0  # no body (HEAD, 1xx, 204, 304)
RAW: Final = 1  # same bytes as the parser delivered (Content-Length, or close-delimited to a 1.0 client)
CHUNKED: Final = 2  # re-chunked for a 1.1 client
STRUCTURED: Final = 3  # through the client's response_data (an HTTP/2 stream: ex.structured)

_SPECIAL: Final = RESPONSE_DROP | {b"content-length"}
# Response header names as received -> lower-case name when special, else None. Upstreams repeat the same
# few spellings, so one dict lookup replaces lower() and a set test; bounded like every cache of peer input.
_NAMES: Final[dict[bytes, bytes | None]] = {}  # Final: compiled code reads it without a module-dict lookup
# The lengths of the special names, one bit each: a name of any other length (Server, Date, Content-Type ...)
# is an ordinary line without hashing it (httptools makes a new bytes object per header; ~300 instructions).
_SPECIAL_LENS: Final = sum(1 << n for n in {len(s) for s in _SPECIAL})
_NAMES_MAX: Final = 512
_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


class UpstreamConnection(UpstreamSide):
    def __init__(self, dp: PlaneState, endpoint: Endpoint) -> None:
        self.dp = dp
        self.now = dp.now
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.closed = False
        self.served = 0  # responses completed on this connection; >0 means a reused connection
        self.got_bytes = False  # any byte of the current response arrived
        self.lines: list[bytes] = []  # response header lines to pass on, already formatted
        self.special: list[tuple[bytes, bytes]] = []  # framing and hop-by-hop headers, decided on later
        self.in_head = True
        # Bytes read while a response head was incomplete, and the bound on a head (the request-side limits:
        # request line plus header block); llhttp itself would buffer a header field without limit.
        self.head_size = 0
        limits = dp.settings.limits
        self.max_head = limits.max_header_bytes + limits.max_request_line
        self.informational = False
        self.mode = NONE
        self.until_eof = False
        self.deadline = 0.0
        self.paused_reading = False
        self.out: list[bytes] = []
        # The exchange whose response completed during the current read; reported after that read (_settle).
        self.held: Exchange | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.ex is not None else "idle")
        return f"<UpstreamConnection {self.endpoint.address} [{state} | served: {self.served}]>"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        limits = self.dp.settings.limits
        transport.set_write_buffer_limits(limits.high_water, limits.low_water)
        self.dp.uconns.add(self)
        self.dp.stats.connection("upstream", 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.dp.uconns.discard(self)
        self.dp.stats.connection("upstream", -1)
        self.endpoint.conn_closed()
        ex = self.ex
        if ex is None:
            return
        if ex.state == TUNNEL:
            self.ex = None
            ex.client.tunnel_closed()
            return
        if self.until_eof and not self.in_head:
            # A close-delimited body ends at EOF: that is completion, not failure.
            if self.mode == CHUNKED:
                self.out.append(_LAST_CHUNK)
            elif ex.structured:
                ex.client.response_end(ex, [])
            self._complete(ex, False)
            return
        self._fail("reset")

    def eof_received(self) -> bool | None:
        ex = self.ex
        if ex is not None and ex.state == TUNNEL:
            ex.client.tunnel_eof()
            return True  # half-close: keep sending what the client still writes
        return None

    def pause_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.client.upstream_full()

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.client.upstream_writable()

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Nothing was asked: an idle upstream talking is out of sync, so it cannot be reused.
            self.close()
            return
        if ex.state == TUNNEL:
            ex.client.write_tunnel(data)
            return
        self.got_bytes = True
        self.deadline = self.now() + self.dp.t_upstream_idle
        if self.in_head:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as u:
            held = self.held
            if held is not None:  # a stray 101 after a complete response (on_message_begin closed)
                self._settle(held)
                return
            self._flush(ex)
            self._start_tunnel(data[u.args[0]:])
            return
        except HttpParserError:
            if self.out:
                self._flush(ex)
            self._fail("invalid_response")
            held = self.held
            if held is not None:  # garbage after a complete response: that one still counts as done
                self._settle(held)
            return
        if self.in_head and self.head_size > self.max_head and self.ex is ex:
            # Still no complete head after more bytes than a head may have.
            if self.out:
                self._flush(ex)
            self._fail("invalid_response")
            return
        if self.out:
            self._flush(ex)
        held = self.held
        if held is not None:
            self._settle(held)

    def _flush(self, ex: Exchange) -> None:
        # One write per upstream read: a small response's head and body leave in one system call.
        out = self.out
        if out:
            self.out = []
            ex.client.write(out[0] if len(out) == 1 else b"".join(out))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.ex is None:
            # A response began after the one that completed in this read: the upstream is out of sync.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            if not _SPECIAL_LENS >> len(name) & 1:
                self.lines.append(b"%b: %b\r\n" % (name, value))
                return
            try:
                n = _NAMES[name]
            except KeyError:
                n = _special_name(name)
            if n is None:
                self.lines.append(b"%b: %b\r\n" % (name, value))
            else:
                self.special.append((n, value))

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        self.in_head = False
        if self.head_size > self.max_head:
            # The read that completed the head was large: measure the head itself (it may be mostly body).
            size = sum(map(len, self.lines)) + sum(len(n) + len(v) + 4 for n, v in self.special)
            if size > self.max_head:
                raise HttpParserError("response head too large")
        self.head_size = 0
        status = self.parser.get_status_code()
        lines = self.lines
        if status < 200 and status != 101:
            # 100 is ours to send (see Expect handling); other 1xx (103) pass to 1.1 clients.
            self.informational = True
            if status != 100 and ex.http11:
                self.out.append(b"".join([status_line(status), *lines, _CRLF]))
            return
        if status == 101 and not ex.upgrade:
            raise HttpParserError("101 without an upgrade request")
        ep = self.endpoint
        if status >= 500:
            self.dp.health.failure(ep)
            if ex.retries_left and self._retry(ex, status):
                return
        elif ep.failures or ep.ejections:
            self.dp.health.success(ep)
        if ex.structured:
            self._structured_head(ex, status)
            return
        parts = [STATUS_LINES.get(status) or status_line(status), *lines]
        cl: bytes | None = None
        tokens: set[bytes] | None = None
        chunked = False
        upgrade: bytes | None = None
        for n, v in self.special:
            if n == b"content-length":
                cl = v
            elif n == b"connection":
                lv = v if v == b"keep-alive" else v.lower()  # the common spelling needs no lower() call
                if lv != b"keep-alive":
                    tokens = connection_tokens(lv) if tokens is None else tokens | connection_tokens(lv)
            elif n == b"transfer-encoding":
                chunked = True
            elif n == b"upgrade":
                upgrade = v
        if tokens and not tokens <= {b"close", b"keep-alive", b"upgrade"}:
            # Headers named in Connection are hop-by-hop too (rare: filter the built lines by name).
            parts = [parts[0], *[ln for ln in lines if ln.split(b":", 1)[0].lower() not in tokens]]
        actions = ex.actions
        if actions is not None and (actions.response is not None or actions.versions):
            parts = [parts[0], *response_lines(actions, ex.version, parts[1:])]
        # An upgrade the upstream declined leaves the client's parser stopped at the upgrade, and an answer
        # that comes before the request body ended leaves unread body bytes: both close after.
        close = (ex.close_after or not ex.keep_alive or self.dp.stopping or not ex.request_complete
                 or (ex.upgrade and status != 101))
        if status == 101:
            mode = NONE
            parts.append(b"Connection: upgrade\r\n")
            if upgrade is not None:
                parts.extend((b"Upgrade: ", upgrade, _CRLF))
        elif ex.head or status == 204 or status == 304:
            mode = NONE
            if cl is not None and status != 204:
                parts.extend((b"Content-Length: ", cl, _CRLF))
        elif cl is not None:
            mode = RAW
            parts.extend((b"Content-Length: ", cl, _CRLF))
        elif ex.http11:
            mode = CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            mode = RAW
            close = True
        self.until_eof = mode != NONE and cl is None and not chunked
        if status != 101:
            if close:
                ex.close_after = True
                parts.append(b"Connection: close\r\n")
            elif not ex.http11:
                parts.append(b"Connection: keep-alive\r\n")
        if ex.route is not None:
            self.dp.response_lines(ex, parts)
        parts.append(_CRLF)
        self.mode = mode
        ex.respond(status)
        self.out.append(b"".join(parts))
        if ex.head and mode == NONE and status != 204 and status != 304:
            # llhttp cannot know this answered a HEAD and would wait for Content-Length bytes; the head
            # is the whole response, so finish here and give the next response a fresh parser. Only a head
            # that announced an empty body (Content-Length: 0) is pooled: after any other (a length, chunked,
            # or no framing at all, which a GET would read to EOF) a broken upstream may still send the body,
            # even much later, and it would become the next request's response.
            keep = (self.parser.get_http_version() == "1.1" and not (tokens and b"close" in tokens)
                    and not self.until_eof and not chunked and cl is not None and not cl.strip().lstrip(b"0"))
            self.until_eof = False
            self.parser = HttpResponseParser(self)
            self._complete(ex, keep)

    def on_body(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Body bytes after a HEAD answer (the replaced parser still reads the rest of that read).
            self.close()
            return
        ex.bytes_out += len(data)
        mode = self.mode
        if mode == RAW:
            self.out.append(data)
        elif mode == CHUNKED:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            ex.client.response_data(ex, data)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_size = 0
        self.lines = []
        self.special = []
        if self.informational:
            self.informational = False
            return
        ex = self.ex
        if ex is None or (ex.upgrade and ex.status == 101):
            return
        out = self.out
        if self.mode == CHUNKED:
            out.append(_LAST_CHUNK)
        elif ex.structured:
            ex.client.response_end(ex, [])
        keep = self.parser.should_keep_alive() and not self.until_eof
        if self.paused_reading or self.closed or not keep or not ex.request_complete:
            self._complete(ex, keep)
            return
        # Fast path of _complete: flush, hold for _settle.
        self.out = []
        ex.client.write(out[0] if len(out) == 1 else b"".join(out))
        self.ex = None
        self.served += 1
        self.got_bytes = False
        self.held = ex

    # -- helpers

    def _structured_head(self, ex: Exchange, status: int) -> None:
        """The response head for a client that takes it structured (lower-case names, no hop-by-hop
        headers, no framing of ours: the client frames it)."""
        cl: bytes | None = None
        tokens: set[bytes] | None = None
        chunked = False
        for n, v in self.special:
            if n == b"content-length":
                cl = v
            elif n == b"connection":
                tokens = connection_tokens(v) if tokens is None else tokens | connection_tokens(v)
            elif n == b"transfer-encoding":
                chunked = True
        headers: list[tuple[bytes, bytes]] = []
        for ln in self.lines:
            name, _, value = ln[:-2].partition(b": ")
            name = name.lower()
            if tokens is None or name not in tokens:
                headers.append((name, value))
        bodyless = ex.head or status == 204 or status == 304
        if cl is not None and status != 204 and not chunked:
            headers.append((b"content-length", cl))
        self.mode = NONE if bodyless else STRUCTURED
        self.until_eof = not bodyless and cl is None and not chunked
        ex.respond(status)
        ex.client.response_start(ex, status, headers)
        if ex.head and status != 204 and status != 304:
            # As for an HTTP/1 client (on_headers_complete): a HEAD's head is its whole response.
            keep = (self.parser.get_http_version() == "1.1" and not (tokens and b"close" in tokens)
                    and not self.until_eof and not chunked and cl is not None and not cl.strip().lstrip(b"0"))
            self.until_eof = False
            self.parser = HttpResponseParser(self)
            ex.client.response_end(ex, [])
            self._complete(ex, keep)

    def _complete(self, ex: Exchange, keep: bool) -> None:
        if self.out:
            self._flush(ex)
        self.ex = None
        self.served += 1
        self.got_bytes = False
        if self.paused_reading:
            self.paused_reading = False
            if self.transport is not None:
                self.transport.resume_reading()
        if keep and not self.closed and ex.request_complete:
            # Only ever kept from a parser callback, so inside data_received, which settles after the read.
            self.held = ex
            return
        self.close()
        ex.client.response_complete(ex)

    def _settle(self, ex: Exchange) -> None:
        # The read that completed ex's response was parsed to its end; a byte past that response closed the
        # connection (on_message_begin, on_body). Only now may it serve another request, which reporting the
        # completion can start at once (a pipelined one).
        self.held = None
        self.release()
        ex.client.response_complete(ex)

    def _fail(self, kind: str) -> None:
        ex = self.ex
        self.ex = None
        self.close()
        if ex is not None:
            ex.client.upstream_failed(ex, self, kind, not self.got_bytes)

    def _retry(self, ex: Exchange, status: int) -> bool:
        """A retry code of the route (GEP-1731), under turnout's rule: only a request that may be replayed
        (idempotent, its whole body buffered or none) is tried again. True: this response is dropped."""
        actions = ex.actions
        if (actions is None or status not in actions.retry_codes or ex.method not in IDEMPOTENT
                or not ex.request_complete or (ex.body_bytes and ex.replay is None) or ex.upgrade):
            return False
        self.ex = None
        self.abort()  # the rest of this response is nobody's
        ex.client.upstream_failed(ex, self, "retry", False)
        return True

    def _start_tunnel(self, rest: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        ex.open_tunnel()
        self.deadline = 0.0
        ex.client.start_tunnel(ex, rest)

    # -- what the client side and dispatch call

    def begin(self, ex: Exchange) -> None:
        """Serve ex next (a fresh connection, or one taken from the pool)."""
        self.ex = ex
        if self.lines or self.special:  # left over by a HEAD answer (on_message_complete resets them otherwise)
            self.lines = []
            self.special = []
        self.got_bytes = self.informational = self.until_eof = False
        self.in_head = True
        self.head_size = 0
        self.deadline = 0.0

    def expect_response(self, deadline: float) -> None:
        self.deadline = deadline

    def drop(self) -> None:
        self.ex = None
        self.abort()

    def release(self) -> None:
        """Back to the pool when it may serve again, else closed."""
        dp = self.dp
        ep = self.endpoint
        if ep.waiting and not dp.stopping and ep.hand_over(self):
            return
        if ep.put_idle(self, dp.pool_size, dp.stopping):
            self.deadline = self.now() + dp.t_pool_idle
        else:
            self.close()

    def reusable(self) -> bool:
        # `closed` is set both when we close and when the peer did (connection_lost).
        return not self.closed and self.ex is None

    def pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = True
            self.deadline = 0.0  # a slow client is not the upstream's fault
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.deadline = self.now() + self.dp.t_upstream_idle
            self.transport.resume_reading()

    def on_deadline(self) -> None:
        self.deadline = 0.0
        if self.ex is None:
            self.close()
        else:
            self._fail("timeout")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _special_name(name: bytes) -> bytes | None:
    n = name.lower()
    special = n if n in _SPECIAL else None
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    _NAMES[name] = special
    return special
