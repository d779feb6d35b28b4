"""One request and its response (Exchange), its lifecycle, and the two sides it connects.

Design rules:
- An exchange's progress is one ordered state field (PARSED < DISPATCHED < RESPONDING < TUNNEL < ANSWERED <
  FINISHED, or ABORTED), moved only forward and only by the transition methods here. The request side's
  end (`request_complete`) is the one flag of its own: a response may start, and even end, before the
  request body did.
- The other fields are the record the stages fill in, each its own part: the parser (downstream) the
  request fields, dispatch the route, chain, version and endpoint, the upstream side the response fields.
- This module knows no connection class. ClientSide (here) and UpstreamSide (proxy.dataplane.pool) are the
  concrete bases the client and upstream connections implement: each side calls the other only through
  their methods, so the modules above (upstream, dispatch, downstream) import downward only, and mypyc
  keeps native method calls.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.actions import RouteActions
    from proxy.dataplane.pool import Endpoint, UpstreamSide
    from proxy.identities import PeerCert
    from proxy.table import CompiledRoute
    from proxy.telemetry.stats import RejectReason

# Exchange.state, in the order an exchange moves through them.
PARSED: Final = 0  # head parsed, waiting for its turn in the connection's queue
DISPATCHED: Final = 1  # routed (or refused): a version is being asked, or a local answer is on its way
RESPONDING: Final = 2  # the response head went to the client
TUNNEL: Final = 3  # the upstream accepted an upgrade: bytes flow both ways until either side closes
ANSWERED: Final = 4  # the response is complete
FINISHED: Final = 5  # left the connection's queue
ABORTED: Final = 6  # its client connection closed before it finished


class Refuse(Exception):
    """A request the proxy answers itself with `status`, counted as stats.reject(reason)."""

    def __init__(self, status: int, reason: RejectReason) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason: RejectReason = reason


class Exchange:
    """One request and its response. Class attributes are the defaults; instances set what differs."""

    client: ClientSide
    state: int = PARSED
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
    refuse: Refuse | None = None
    request_complete: bool = False
    body_bytes: int = 0
    pending: list[bytes] | None = None
    pending_size: int = 0
    replay: list[bytes] | None = None
    replay_size: int = 0
    mirror_body: list[bytes] | None = None
    mirror_size: int = 0
    mirror_to: tuple[str, ...] = ()  # the versions this request's copy goes to (one draw decided them all)
    sent_body: bool = False
    attempts: int = 0
    retried_same: bool = False
    route: CompiledRoute | None = None
    chain: tuple[str, ...] = ()
    idx: int = 0
    version: str = ""
    endpoint: Endpoint | None = None
    up: UpstreamSide | None = None
    head_common: bytes = b""
    head_tail: bytes = b"\r\n"
    cookie_version: str | None = None
    close_after: bool = False
    early: bytes = b""
    status: int = 0
    bytes_out: int = 0
    t0: float = 0.0
    head_deferred: bool = False
    # The head of a chunked request may go upstream: its first chunk parsed cleanly (or more of it than
    # high_water arrived, or the message ended).
    chunk_ok: bool = False
    client_id: str | None = None
    # The verified source client_id came from ("client_cert", "jwt", "api_key"); "" when unverified or none.
    id_source: str = ""
    retried: bool = False
    fell_back: bool = False
    # Values of the headers routes and identities read (see proxy.dataplane.plan), lower-case names.
    wanted: dict[str, str] | None = None
    # The route's filters, timeouts and retry (proxy.dataplane.rewrite); None for a plain route.
    actions: RouteActions | None = None
    timer: asyncio.TimerHandle | None = None  # the route's request timeout
    t_response: float = 0.0  # the route's backend_request timeout; 0: the proxy's upstream_response
    retries_left: int = 0  # retries on the route's retry codes
    route_head: bytes = b""  # head_common before per-version header edits
    # The client can take trailers: an HTTP/1.1 `TE: trailers`, or any HTTP/2 client (trailers are native).
    te_trailers: bool = False
    # A gRPC call (content-type application/grpc*): the proxy's own answers to it are gRPC responses.
    grpc: bool = False
    # Why the last upstream attempt failed (dispatch.upstream_failed's kind), "" when none did.
    error_kind: str = ""
    # The client takes the response through ClientSide.response_start/data/end (an HTTP/2 stream), not as
    # HTTP/1.1 bytes: the one test the HTTP/1 upstream makes per response.
    structured: bool = False

    def __init__(self, client: ClientSide, plan: object) -> None:
        self.client = client
        # The Plan (proxy.dataplane.plan) the head was parsed under; dispatch compares it by identity only.
        self.plan = plan
        # Forwarded header lines, formatted as they will be sent ("Name: value\r\n", name as received).
        self.lines: list[bytes] = []

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.target.decode('latin-1')} [state {self.state} | {self.version}]>"

    # -- transitions

    def dispatch(self) -> None:
        self.state = DISPATCHED

    def respond(self, status: int) -> None:
        """The response head (the upstream's or a local one) goes to the client."""
        self.status = status
        self.state = max(self.state, RESPONDING)

    def open_tunnel(self) -> None:
        self.state = TUNNEL

    def answered(self) -> None:
        self.state = max(self.state, ANSWERED)

    def finish(self) -> bool:
        """Leave the queue; False when it already did."""
        if self.state == FINISHED:
            return False
        self.state = FINISHED
        return True

    def abort(self) -> None:
        self.state = ABORTED

    # -- what a side asks

    def done(self) -> bool:
        """Answered, finished or aborted: nothing more goes upstream or to the client for it."""
        return self.state >= ANSWERED


class ClientSide(asyncio.Protocol):
    """What the upstream side and dispatch call on the client connection an exchange came from."""

    closed: bool = False
    proto: bytes = b"http"  # the scheme the client spoke to the proxy (b"https" on a TLS listener)
    # The client certificate the TLS handshake verified; set by whoever makes TLS connections, None on
    # cleartext ones (and on TLS ones without a certificate).
    peer_cert: PeerCert | None = None
    # A client connection (what PlaneState.conns holds): the listener's sweeper calls on_deadline once
    # `deadline` (loop time, 0 for none) passed, and the graceful stop close_if_idle, then abort.
    deadline: float = 0.0
    # An idle HTTP/1 connection gives its parser back (ClientFlow.shed); connections that hold none say so.
    parser_shed: bool = True

    def on_deadline(self) -> None:
        raise NotImplementedError

    def shed(self, now: float) -> None:
        """Give back what an idle connection can make again on its next read (the sweeper calls this)."""

    def close_if_idle(self) -> bool:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def pause(self, reason: int) -> None:
        raise NotImplementedError

    def resume(self, reason: int) -> None:
        raise NotImplementedError

    def send_continue(self, ex: Exchange) -> None:
        """ex asked to be told to send its body (Expect: 100-continue), and a version was chosen."""
        raise NotImplementedError

    def upstream_full(self) -> None:
        """The upstream's write buffer is full: stop reading the request body."""
        raise NotImplementedError

    def upstream_writable(self) -> None:
        raise NotImplementedError

    def upstream_head(self, ex: Exchange, route: str) -> bytes:
        """The request head as it goes upstream, up to the version line dispatch adds."""
        raise NotImplementedError

    def send_head(self, ex: Exchange, up: UpstreamSide) -> None:
        """ex was just given connection `up`: send its head and what of its body waited."""
        raise NotImplementedError

    def answer(self, ex: Exchange, status: int) -> None:
        """Answer ex locally with `status` (before any response byte went out)."""
        raise NotImplementedError

    def abort_active(self, ex: Exchange, status: int) -> None:
        raise NotImplementedError

    def answer_with(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Answer ex locally with `status`, these headers and no body (a route's redirect)."""
        raise NotImplementedError

    def local_port(self) -> int:
        """The port the client connected to (a redirect without a scheme or port keeps it); 0: unknown."""
        return 0

    def response_complete(self, ex: Exchange) -> None:
        raise NotImplementedError

    def upstream_failed(self, ex: Exchange, up: UpstreamSide | None, kind: str, before_response: bool) -> None:
        raise NotImplementedError

    def start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        raise NotImplementedError

    def write_tunnel(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_eof(self) -> None:
        raise NotImplementedError

    def tunnel_closed(self) -> None:
        raise NotImplementedError

    # -- the structured response: used when the two sides do not both speak HTTP/1.x (an HTTP/2 client,
    # or an HTTP/2 upstream). An HTTP/1.x upstream answering an HTTP/1.x client keeps writing bytes.

    def response_start(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The response head: lower-case names, hop-by-hop headers removed. The client adds its own
        framing and the proxy's headers (version header, assignment cookie)."""
        raise NotImplementedError

    def response_data(self, ex: Exchange, data: bytes) -> None:
        raise NotImplementedError

    def response_end(self, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response ended (`trailers` may be empty); the upstream side then calls response_complete."""
        raise NotImplementedError
