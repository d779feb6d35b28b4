"""PlaneState: the per-process state every request of the data plane reads, and the header lines it caches.

Design rule: read-mostly and owned here; the request path reads timeouts, limits and the route table from
plain attributes (concrete class, so mypyc reads them at fixed offsets) and concatenates cached header
lines instead of formatting them. The listener (DataPlane) extends it with listening, table changes and the
graceful stop; nothing below the listener needs more than this.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.dataplane.headers import TrustedPeers
from proxy.dataplane.health import Health
from proxy.dataplane.identity import Identity
from proxy.dataplane.mirror import Mirrorer
from proxy.dataplane.plan import Plan

if TYPE_CHECKING:
    from proxy.dataplane.exchange import ClientSide, Exchange
    from proxy.dataplane.pool import Backend, Endpoint, UpstreamSide
    from proxy.settings import Settings
    from proxy.table import RouteTable, TableHolder
    from proxy.telemetry.accesslog import AccessLog
    from proxy.telemetry.stats import Stats

_CRLF = b"\r\n"


class PlaneState:
    def __init__(self, settings: Settings, holder: TableHolder, stats: Stats) -> None:
        self.settings = settings
        self.holder = holder
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time
        t = settings.timeouts
        self.t_header_read = t.header_read
        self.t_keepalive = t.keepalive_idle
        self.t_body_idle = t.body_read_idle
        self.t_upstream_response = t.upstream_response
        self.t_upstream_idle = t.upstream_idle
        self.t_pool_idle = t.upstream_pool_idle
        self.t_connect = t.upstream_connect
        self.pool_size = settings.pool_size
        self.grpc_error_codes = frozenset(settings.grpc_error_codes)
        self.max_upstream = settings.limits.max_upstream_connections
        self.trusted = TrustedPeers(settings.trusted_proxies)
        self.conns: set[ClientSide] = set()
        # TLS connections accepted whose handshake has not ended: they hold a socket and memory too, so they
        # count against max_connections with the connections above (proxy.dataplane.tls).
        self.handshaking = 0
        self.uconns: set[UpstreamSide] = set()
        self.backends: dict[str, Backend] = {}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.health = Health(settings.passive_eject_after)
        self.mirror = Mirrorer(stats, settings)
        self.mirror_counts = self.mirror.counts
        self.identity = Identity(stats)
        self.plan = Plan(holder.table)
        # A graceful stop is under way: answers say `Connection: close`, no connection is pooled again.
        self.stopping = False
        self.clients_gone = asyncio.Event()  # set when stopping and the last client connection closed
        self.tasks: set[asyncio.Task[None]] = set()
        self.hosts: dict[bytes, str] = {}  # Host header value -> lower-case host without port
        self._version_lines: dict[str, bytes] = {}
        self._route_lines: dict[str, bytes] = {}
        self._cookie_lines: dict[tuple[str, str, int | None], bytes] = {}
        # One JSON line per finished request when settings.access_log is set (start_dataplane opens it).
        self.access_log: AccessLog | None = None

    def use_plan(self, table: RouteTable) -> Plan:
        if self.plan.table is not table:
            self.plan = Plan(table)
        return self.plan

    def client_closed(self, c: ClientSide) -> None:
        self.conns.discard(c)
        self.stats.connection("downstream", -1)
        if self.stopping and not self.conns:
            self.clients_gone.set()

    def version_header(self, version: str) -> bytes:
        line = self._version_lines.get(version)
        if line is None:
            line = self._version_lines[version] = b"X-Turnout-Version: " + version.encode() + _CRLF
        return line

    def cookie_header(self, cookie: str, version: str, max_age: int | None = None) -> bytes:
        key = (cookie, version, max_age)
        line = self._cookie_lines.get(key)
        if line is None:
            life = "" if max_age is None else f"; Max-Age={max_age}"
            line = self._cookie_lines[key] = (f"Set-Cookie: {cookie}={version}; Path=/{life}; HttpOnly; SameSite=Lax"
                                              .encode() + _CRLF)
        return line

    def response_lines(self, ex: Exchange, parts: list[bytes]) -> None:
        """Append the proxy's own response header lines for ex (version header, assignment cookie): the one
        rule every response formatter (an HTTP/1 upstream's bytes, a structured response) follows."""
        route = ex.route
        if route is None:
            return
        if route.expose_version:
            parts.append(self.version_header(ex.version))
        cookie = route.assignment_cookie
        # A version standing in for an unhealthy one does not become the session's assignment.
        if (cookie is not None and route.route.sticky and ex.cookie_version != ex.version and not ex.fell_back
                and (ex.id_source != "" or not route.pins_verified)):
            parts.append(self.cookie_header(cookie, ex.version, route.route.assignment_cookie_max_age))

    def route_header(self, route: str) -> bytes:
        line = self._route_lines.get(route)
        if line is None:
            line = self._route_lines[route] = b"X-Turnout-Route: " + route.encode() + _CRLF
        return line
