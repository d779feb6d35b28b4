"""Traffic mirroring: a share of a route's requests is copied to other versions, their answers discarded.

Design rule: the client never waits for, or sees, a mirrored request. One draw per request decides for
every mirror of the route: the request drawn at u (in [0, 100)) is copied to each mirror whose percent is
above u, so mirrors with equal percents see exactly the same requests, and one with a larger percent sees
those and more. The draw is the per-route request counter's point of the base-2 van der Corput sequence:
uniform over [0, 100) and evenly spread (any run of n requests is within about log2(n) of the exact
share), with no random numbers, so a test can count. Copies run as separate tasks on fresh connections,
bounded in number; a copy that does not fit (too many in flight, body over the limit) is dropped and
counted per mirror.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.pool import Backend, Endpoint
    from proxy.settings import Settings
    from proxy.table import CompiledRoute
    from proxy.telemetry.stats import Stats

# Mirrored requests in flight per process; more are dropped so a hung mirror target costs bounded memory.
MAX_IN_FLIGHT = 64


def draw(n: int) -> float:
    """The n-th point (n >= 0) of the base-2 van der Corput sequence, scaled to [0, 100): n's bits mirrored
    behind the binary point. 0, 50, 25, 75, 12.5, 62.5, ..."""
    x = 0.0
    f = 50.0
    while n:
        if n & 1:
            x += f
        n >>= 1
        f *= 0.5
    return x


class Mirrorer:
    def __init__(self, stats: Stats, settings: Settings) -> None:
        self.stats = stats
        self.body_limit = settings.limits.retry_buffer_bytes
        self.timeout = settings.timeouts.upstream_response
        self.max_in_flight = MAX_IN_FLIGHT
        self.in_flight = 0
        # The same dict Stats.mirror fills: /metrics exports it as turnout_mirror_requests_total.
        self.counts: dict[tuple[str, str, str], int] = stats.mirrors
        self._drawn: dict[str, int] = {}  # route -> requests drawn for
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Mirrorer [In flight: {self.in_flight}/{self.max_in_flight}]>"

    def _count(self, route: str, version: str, code: str) -> None:
        self.stats.mirror(route, version, code)

    def consider(self, ex: Exchange, route: CompiledRoute, backends: dict[str, Backend]) -> None:
        mirrors = route.route.mirrors
        if not mirrors or ex.upgrade:
            return
        n = self._drawn.get(route.name, 0)
        self._drawn[route.name] = n + 1
        u = draw(n)
        targets = tuple(m.version for m in mirrors if u < m.percent)
        if not targets:
            return
        if ex.cl is not None and ex.cl > self.body_limit:
            for version in targets:
                self._count(route.name, version, "dropped")
            return
        ex.mirror_to = targets
        ex.mirror_body = []
        if ex.request_complete:
            self.send(ex, backends)

    def count_dropped(self, ex: Exchange) -> None:
        route = ex.route
        if route is not None:
            for version in ex.mirror_to:
                self._count(route.name, version, "dropped")

    def send(self, ex: Exchange, backends: dict[str, Backend]) -> None:
        body = ex.mirror_body
        ex.mirror_body = None
        route = ex.route
        if body is None or route is None:
            return
        for version in ex.mirror_to:
            if self.in_flight >= self.max_in_flight:
                self._count(route.name, version, "dropped")
                continue
            backend = backends.get(version)
            ep = backend.pick() if backend is not None else None
            if ep is None:
                self._count(route.name, version, "error")
                continue
            data = b"".join([ex.head_common, b"X-Turnout-Version: " + version.encode() + b"\r\n",
                             b"Connection: close\r\n", ex.head_tail, *body])
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(route.name, version, ep, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, route: str, version: str, ep: Endpoint, data: bytes) -> None:
        code = "error"
        try:
            async with asyncio.timeout(self.timeout):
                if ep.https and ep.ssl is None:
                    raise OSError("no TLS context for this version")
                # Same TLS settings as the version's own requests: a copy is never sent in cleartext.
                reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=ep.ssl,
                                                               server_hostname=ep.server_hostname)
                try:
                    writer.write(data)
                    line = await reader.readline()
                    parts = line.split(None, 2)
                    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
                        code = parts[1].decode()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            code = "error"
        finally:
            self.in_flight -= 1
            self._count(route, version, code)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
