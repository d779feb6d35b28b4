"""HTTP/2 upstreams (h2c with prior knowledge, h2 over TLS with ALPN): an endpoint's connections (H2Link),
shared by many streams (proxy.dataplane.h2ustream), and the pool that hands exchanges a stream (H2Pool).

Design rules:
- Sans-IO `h2` driven from an asyncio.Protocol, as the HTTP/1 side drives llhttp: events are handled in
  data_received, no coroutine per stream; only opening a connection awaits.
- A connection carries at most min(the peer's SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS) streams; an
  exchange that finds no room waits for a connection being opened (one more is opened when those cannot
  take every waiting exchange).
- Nothing the upstream did not process is failed: after GOAWAY the streams above its last_stream_id, and a
  stream refused with REFUSED_STREAM, are sent again on another connection of the same endpoint (RFC 9113
  8.7 allows it whatever the method), as long as their body can be sent again.
- Kept alive with PING: no frame for PING_EVERY and a PING goes out; no answer within PING_TIMEOUT and the
  connection is taken for dead (its streams fail as timeouts). A connection without streams closes after
  timeouts.upstream_pool_idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from proxy.dataplane import grpcwire
from proxy.dataplane.h2ustream import NO_HEADERS, H2UpstreamStream, StreamHost
from proxy.dataplane.pool import Multiplexer

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState
    from proxy.dataplane.pool import Endpoint

# Our own bound on concurrent streams per connection (the peer's SETTINGS may lower it): the usual server
# default, so one connection is not a bottleneck for a single slow endpoint.
MAX_STREAMS: Final = 100
# The connection's receive window: large enough that many streams stream at once, small enough to bound
# what one connection may have in flight (streams' own windows are limits.high_water).
CONN_WINDOW: Final = 16 * 1024 * 1024
# No frame from the upstream for this long: PING it; no answer within PING_TIMEOUT: the connection is dead.
PING_EVERY: Final = 10.0
PING_TIMEOUT: Final = 5.0
# Times a stream the upstream did not process is sent again (GOAWAY, REFUSED_STREAM) before it fails.
MAX_REPLAYS: Final = 2


class H2Pool(Multiplexer):
    """The HTTP/2 connections of one endpoint and the exchanges waiting for a stream on one."""

    def __init__(self, dp: PlaneState, ep: Endpoint) -> None:
        self.dp = dp
        self.ep = ep
        self.scheme = b"https" if ep.https else b"http"
        self.conns: list[H2Link] = []
        self.waiting: deque[Exchange] = deque()
        self.opening = 0
        self.replay_limit = dp.settings.limits.retry_buffer_bytes

    def __repr__(self) -> str:
        streams = sum(c.active for c in self.conns)
        return (f"<H2Pool {self.ep.address} [Connections: {len(self.conns)} open, {self.opening} opening | "
                f"Streams: {streams} active, {len(self.waiting)} waiting]>")

    def request(self, ex: Exchange) -> None:
        """ex needs a stream to this endpoint: on a connection with room now, else once one has room."""
        if ex.attempts <= 1 and grpcwire.head_is_grpc(ex.head_common):
            ex.grpc = True  # known before any stream exists: a failed connect is answered as gRPC too
        if ex.replay is None and not ex.body_bytes and (ex.cl is None or ex.cl <= self.replay_limit):
            # Keep the body (up to limits.retry_buffer_bytes) whatever the method: a stream the upstream
            # refuses or drops with GOAWAY unprocessed is sent again (see replay).
            ex.replay = []
        for c in self.conns:
            if c.has_room():
                self._give(c, ex)
                return
        self.waiting.append(ex)
        self._grow()

    def _grow(self) -> None:
        if self.opening * MAX_STREAMS < len(self.waiting):
            self.opening += 1
            dp = self.dp
            task = dp.loop.create_task(self._connect())
            dp.tasks.add(task)
            task.add_done_callback(dp.tasks.discard)

    async def _connect(self) -> None:
        ep = self.ep
        loop = self.dp.loop
        kind = ""
        try:
            async with asyncio.timeout(self.dp.t_connect):
                if not ep.https:
                    await loop.create_connection(lambda: H2Link(self), ep.host, ep.port)
                elif ep.ssl is None:
                    raise ssl.SSLError("no TLS context for this version (its tls files could not be loaded)")
                else:
                    t, _ = await loop.create_connection(lambda: H2Link(self), ep.host, ep.port, ssl=ep.ssl,
                                                        server_hostname=ep.server_hostname)
                    obj = t.get_extra_info("ssl_object")
                    if obj is None or obj.selected_alpn_protocol() != "h2":
                        t.abort()  # an upstream that cannot speak HTTP/2 over this TLS: never downgraded
                        raise ssl.SSLError("the upstream did not select ALPN h2")
        except TimeoutError:
            kind = "connect_timeout"
        except ssl.SSLError:
            kind = "tls"
        except OSError:
            kind = "connect"
        if kind:
            self.opening -= 1
            self._failed(kind)

    def _failed(self, kind: str) -> None:
        # The exchanges the connections still opening (and those open) cannot take fail with the connect.
        room = self.opening * MAX_STREAMS + sum(c.room() for c in self.conns)
        while len(self.waiting) > room:
            ex = self.waiting.pop()
            if not ex.done() and not ex.client.closed:
                ex.client.upstream_failed(ex, None, kind, True)

    def ready(self, link: H2Link) -> None:
        """link's server preface (SETTINGS) arrived: it takes streams up to the peer's limit from now."""
        self.opening -= 1
        self.conns.append(link)
        self.drain()

    def unsettled(self, kind: str) -> None:
        """A connection closed (or timed out) before its server preface: counts as a failed connect."""
        self.opening -= 1
        self._failed(kind)

    def drain(self) -> None:
        waiting = self.waiting
        while waiting:
            link = None
            for c in self.conns:
                if c.has_room():
                    link = c
                    break
            if link is None:
                break
            ex = waiting.popleft()
            if not ex.done() and not ex.client.closed:
                self._give(link, ex)
        if waiting:
            self._grow()

    def _give(self, link: H2Link, ex: Exchange) -> None:
        s = H2UpstreamStream(link, ex)
        link.active += 1
        ex.up = s
        ex.client.send_head(ex, s)

    def replay(self, ex: Exchange) -> bool:
        """Send ex again on another connection (the upstream did not process it); False when it cannot."""
        if ex.attempts > MAX_REPLAYS + 1 or (ex.sent_body and ex.replay is None) or ex.done():
            return False
        ex.up = None
        ex.attempts += 1  # send_head then replays the buffered body
        ex.sent_body = False
        route = ex.route
        if route is not None:
            self.dp.stats.retry(route.name)
        self.request(ex)
        return True

    def gone(self, link: H2Link) -> None:
        if link in self.conns:
            self.conns.remove(link)

    def close_idle(self) -> None:
        for c in list(self.conns):
            if not c.active:
                c.close()


class H2Link(StreamHost):
    """One HTTP/2 connection to an endpoint (in dp.uconns: the sweeper calls its on_deadline)."""

    def __init__(self, pool: H2Pool) -> None:
        super().__init__()
        self.pool = pool
        self.ep = pool.ep
        self.scheme = pool.scheme
        dp = self.dp = pool.dp
        self.now = dp.now
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.active = 0  # streams given to exchanges, started or not
        self.limit = MAX_STREAMS
        self.draining = False
        self.write_paused = False
        self.deadline = 0.0
        self.last_frame = self.now()
        self.ping_due = 0.0
        self.settled = False  # the server's SETTINGS arrived
        self.unsettled_kind = "connect"  # what a close before them counts as
        limits = dp.settings.limits
        self.window = limits.high_water
        self.low_water = limits.low_water
        self.max_head = limits.max_header_bytes

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("draining" if self.draining else "open")
        return f"<H2Link {self.pool.ep.address} [{state} | Streams: {self.active} of {self.limit}]>"

    def has_room(self) -> bool:
        return not self.closed and not self.draining and self.active < self.limit

    def room(self) -> int:
        return max(0, self.limit - self.active) if not self.closed and not self.draining else 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(self.window, self.low_water)
        h2 = self.h2
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: self.window,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.max_head, SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        })
        h2.initiate_connection()
        h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        self.dp.uconns.add(self)
        self.dp.stats.connection("upstream", 1)
        # The server preface must follow within the connect timeout (see on_deadline).
        self.arm(self.now() + self.dp.t_connect)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.dp.uconns.discard(self)
        self.dp.stats.connection("upstream", -1)
        self.pool.gone(self)
        if not self.settled:
            self.settled = True
            self.pool.unsettled(self.unsettled_kind)
        for s in list(self.streams.values()):
            s.fail("reset")
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unblock()

    def data_received(self, data: bytes) -> None:
        self.last_frame = self.now()
        self.ping_due = 0.0
        if not self.settled and (len(data) < 4 or data[3] != 0x04):
            # A server's preface is a SETTINGS frame (type 4); anything else is not an HTTP/2 server (an
            # HTTP/1 one answering "HTTP/1.1 400", which h2 would buffer as the start of a huge frame).
            self.unsettled_kind = "invalid_response"
            self.abort()
            return
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.unsettled_kind = "invalid_response"  # not an HTTP/2 server, if before its preface
            self.fail_all("invalid_response")
            return
        for ev in events:
            if isinstance(ev, DataReceived):
                s = self.streams.get(ev.stream_id or 0)
                if s is not None:
                    s.on_data(ev.data or b"", ev.flow_controlled_length or 0)
                elif ev.flow_controlled_length and ev.stream_id:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, ResponseReceived):
                s = self.streams.get(ev.stream_id or 0)
                if s is not None:
                    s.on_head(ev.headers or NO_HEADERS)
            elif isinstance(ev, TrailersReceived):
                s = self.streams.get(ev.stream_id or 0)
                if s is not None:
                    s.trailers = ev.headers or NO_HEADERS
            elif isinstance(ev, StreamEnded):
                s = self.streams.get(ev.stream_id or 0)
                if s is not None:
                    s.on_end()
            elif isinstance(ev, StreamReset):
                s = self.streams.get(ev.stream_id or 0)
                if s is not None:
                    s.on_reset(int(ev.error_code or 0))
            elif isinstance(ev, WindowUpdated):
                self.unblock()
            elif isinstance(ev, RemoteSettingsChanged):
                peer = self.h2.remote_settings.max_concurrent_streams
                self.limit = min(MAX_STREAMS, peer) if peer else MAX_STREAMS
                self.unblock()
                if not self.settled:
                    self.settled = True
                    self.deadline = 0.0
                    self.arm(self.now() + PING_EVERY)
                    self.pool.ready(self)
                else:
                    self.pool.drain()
            elif isinstance(ev, PingAckReceived):
                self.ping_due = 0.0
            elif isinstance(ev, ConnectionTerminated):
                self.on_goaway(ev.last_stream_id or 0)
        self.flush()

    # -- connection-wide

    def flush(self) -> None:
        out = self.h2.data_to_send()
        t = self.transport
        if out and t is not None and not self.closed:
            t.write(out)

    def ack(self, sid: int, n: int) -> None:
        # A stream that is gone: h2 already returned its share of the connection window.
        with contextlib.suppress(H2Error):
            self.h2.acknowledge_received_data(n, sid)

    def unblock(self) -> None:
        if self.write_paused or not self.blocked:
            return
        blocked, self.blocked = self.blocked, []
        for s in blocked:
            s.push()
        self.flush()

    def on_goaway(self, last: int) -> None:
        # h2's state machine takes any GOAWAY as the end of the connection and would refuse the frames of the
        # streams at or below `last` that the server still answers (RFC 9113 6.8): keep it open for those;
        # `draining` keeps new streams off this connection.
        self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        self.draining = True
        self.pool.gone(self)
        for sid, s in list(self.streams.items()):
            if sid > last:
                s.refused()
        for s in [s for s in self.blocked if not s.sid]:
            s.refused()
        if not self.active:
            self.close()
        self.pool.drain()

    def fail_all(self, kind: str) -> None:
        self.draining = True
        self.pool.gone(self)
        for s in list(self.streams.values()):
            s.fail(kind)
        self.abort()

    def stream_done(self, s: H2UpstreamStream) -> None:
        if s.sid:
            self.streams.pop(s.sid, None)
        self.active -= 1
        if self.draining and not self.active:
            self.close()
        else:
            self.pool.drain()

    def arm(self, when: float) -> None:
        if when and (not self.deadline or when < self.deadline):
            self.deadline = when

    # -- what the sweeper calls

    def on_deadline(self) -> None:
        now = self.now()
        self.deadline = 0.0
        if not self.settled:
            self.unsettled_kind = "connect_timeout"
            self.abort()
            return
        if self.ping_due and self.ping_due <= now:
            self.fail_all("timeout")  # no PING answer: the peer or the path is gone
            return
        for s in list(self.streams.values()):
            d = s.deadline
            if d and d <= now:
                s.fail(s.expiry)
            elif d:
                self.arm(d)
        if self.closed:
            return
        if not self.active and now - self.last_frame >= self.dp.t_pool_idle:
            self.close()
            return
        if not self.ping_due and now - self.last_frame >= PING_EVERY:
            self.h2.ping(b"turnout!")
            self.flush()
            self.ping_due = now + PING_TIMEOUT
        self.arm(self.ping_due or self.last_frame + PING_EVERY)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.draining = True
            self.pool.gone(self)
            try:
                self.h2.close_connection()
                self.flush()
            except H2Error:
                pass
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return False

    def replay(self, ex: Exchange) -> bool:
        return self.pool.replay(ex)
