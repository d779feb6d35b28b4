"""Per-process request statistics recorded by the data plane (interface; exported by proxy.metrics).

Design rule: the request path only increments plain Python ints in dicts keyed by label tuples; the
Prometheus text, cross-worker sums and the status page's numbers are computed at scrape time, because
prometheus-client's per-request cost (2-7 us) would be a large share of the proxy's CPU budget.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Literal

# Upper bounds (seconds) of latency buckets: from a cache-hit 0.5 ms to a 10 s slow request.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

UpstreamErrorKind = Literal["connect", "timeout", "reset", "invalid_response"]
RejectReason = Literal["bad_request", "too_large", "timeout", "no_route", "no_healthy_version"]
Side = Literal["downstream", "upstream"]


class Stats:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.duration_sum: dict[tuple[str, str], float] = {}
        # (route, version) -> count per LATENCY_BUCKETS bucket, plus one overflow slot (> 10 s)
        self.latency: dict[tuple[str, str], list[int]] = {}
        self.bytes_in: dict[tuple[str, str], int] = {}
        self.bytes_out: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.connections: dict[str, int] = {"downstream": 0, "upstream": 0}

    def request(self, route: str, version: str, status: int, duration: float, bytes_in: int, bytes_out: int) -> None:
        key = (route, version, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        k2 = (route, version)
        self.duration_sum[k2] = self.duration_sum.get(k2, 0.0) + duration
        hist = self.latency.get(k2)
        if hist is None:
            hist = self.latency[k2] = [0] * (len(LATENCY_BUCKETS) + 1)
        hist[bisect_left(LATENCY_BUCKETS, duration)] += 1
        self.bytes_in[k2] = self.bytes_in.get(k2, 0) + bytes_in
        self.bytes_out[k2] = self.bytes_out.get(k2, 0) + bytes_out

    def upstream_error(self, version: str, kind: UpstreamErrorKind) -> None:
        key = (version, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def fallback(self, route: str, from_version: str, to_version: str) -> None:
        key = (route, from_version, to_version)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def retry(self, route: str) -> None:
        self.retries[route] = self.retries.get(route, 0) + 1

    def reject(self, reason: RejectReason) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def connection(self, side: Side, delta: int) -> None:
        self.connections[side] += delta
