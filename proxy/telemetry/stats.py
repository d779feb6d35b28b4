"""Per-process request statistics recorded by the data plane (interface; exported by proxy.telemetry.metrics).

Design rule: the request path only increments plain Python ints held in slotted objects reached through
nested dicts keyed by plain strings (no tuple key is built per request; str hashes are cached); the
Prometheus text, cross-worker sums and the status page's numbers are computed at scrape time, because
prometheus-client's per-request cost (2-7 us) would be a large share of the proxy's CPU budget.
`Stats.request` costs about 0.25 us (timeit, 200k calls, CPython 3.11; see the README, "Observability").

Everything here runs on the event loop thread: no locks. `snapshot()` copies the counters into plain
JSON-able data that proxy.telemetry.metrics publishes across worker processes and sums.
"""

from __future__ import annotations

from typing import Any, Final, Literal

# Upper bounds (seconds) of latency buckets: from a cache-hit 0.5 ms to a 10 s slow request. Declared of any
# length: compiled code would unbox a fixed-length tuple of floats into 14 C doubles on every read.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One count per bucket plus an overflow slot (> 10 s, only in the +Inf bucket).
HIST_SLOTS = len(LATENCY_BUCKETS) + 1

UpstreamErrorKind = Literal["connect", "timeout", "reset", "invalid_response", "tls"]
RejectReason = Literal["bad_request", "too_large", "timeout", "no_route", "no_healthy_version", "too_many_connections",
                       "no_identity", "misdirected"]
IdentityRejectReason = Literal[
    "malformed", "signature", "expired", "not_yet_valid", "issuer", "audience", "algorithm", "unknown_kid",
    "missing_claim", "bad_claim", "unknown_key", "keys_unavailable", "missing_field",
]
Side = Literal["downstream", "upstream"]
CanaryResult = Literal["pass", "fail", "inconclusive"]


class Cell:
    """Counters of one (route, version) pair; the request path touches only this object."""

    __slots__ = ("bytes_in", "bytes_out", "codes", "duration_sum", "grpc_errors", "hist", "upstream_errors")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.duration_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.hist = [0] * HIST_SLOTS  # non-cumulative: slot i counts durations in (bucket i-1, bucket i]
        self.upstream_errors = 0
        self.grpc_errors = 0  # gRPC responses whose grpc-status is in settings.grpc_error_codes


class Stats:
    def __init__(self) -> None:
        self.cells: dict[str, dict[str, Cell]] = {}  # route -> version -> Cell
        self.upstream_errors: dict[tuple[str, str], int] = {}  # (version, kind)
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        # (route, reason) of the same refusals: route "" when refused before a route matched (no_route, bad input)
        self.answers: dict[tuple[str, str], int] = {}
        self.connections: dict[str, int] = {"downstream": 0, "upstream": 0}
        # (route, version, code as text: "200", or "error" / "dropped" when there was no response)
        self.mirrors: dict[tuple[str, str, str], int] = {}
        self.identity_rejects: dict[tuple[str, str, str], int] = {}  # (route, source, reason)
        # Route tables installed / refused by this process (the lead increments these directly).
        self.applied = 0
        self.apply_errors = 0
        self.access_log_dropped = 0
        self.canary_steps: dict[str, int] = {}
        self.canary_results: dict[tuple[str, str], int] = {}
        # The canary judge and the re-checks (control plane, supervisor process only).
        self.canary_outcomes: dict[tuple[str, str], int] = {}  # (route, outcome): finished steps
        self.canary_aborts: dict[str, int] = {}  # route: rollouts rolled back (failed analysis or aborted)
        self.canary_weights: dict[str, list[Any]] = {}  # route -> [canary version, its share in percent] (gauge)
        self.check_failed: dict[str, int] = {}  # version -> 1 while flagged by a failed re-check (gauge)
        self.tls_handshake_errors: dict[tuple[str, str], int] = {}  # (listener, reason)
        self.zone_requests: dict[str, dict[str, int]] = {}  # version -> zone of the endpoint -> attempts
        # gRPC responses: (route, version, grpc-status as text, method or "" unless the route asks for it)
        self.grpc: dict[tuple[str, str, str, str], int] = {}

    def __repr__(self) -> str:
        n = sum(sum(c.codes.values()) for vs in self.cells.values() for c in vs.values())
        conns = self.connections
        return (f"<Stats [Requests: {n} | Connections: {conns['downstream']} downstream, "
                f"{conns['upstream']} upstream]>")

    def _cell(self, route: str, version: str) -> Cell:
        return self.cells.setdefault(route, {}).setdefault(version, Cell())

    # -- request path -------------------------------------------------------------------------------

    def request(self, route: str, version: str, status: int, duration: float, bytes_in: int, bytes_out: int) -> None:
        try:
            c = self.cells[route][version]
        except KeyError:
            c = self._cell(route, version)
        codes = c.codes
        codes[status] = codes.get(status, 0) + 1
        c.duration_sum += duration
        c.bytes_in += bytes_in
        c.bytes_out += bytes_out
        # bisect_left's slot, by a compiled scan: most requests end in the first few buckets, and calling
        # bisect_left from compiled code (boxing the duration, a C call, float objects compared) costs more.
        i = 0
        for bound in LATENCY_BUCKETS:
            if duration <= bound:
                break
            i += 1
        c.hist[i] += 1

    def upstream_error(self, version: str, kind: UpstreamErrorKind, route: str | None = None) -> None:
        """`route`, when the caller knows it, also feeds the per-(route, version) error count canaries use."""
        key = (version, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1
        if route is not None:
            try:
                c = self.cells[route][version]
            except KeyError:
                c = self._cell(route, version)
            c.upstream_errors += 1

    def zone_request(self, version: str, zone: str) -> None:
        """An upstream attempt to an endpoint of known zone (zones only: endpoints never become labels)."""
        try:
            by_zone = self.zone_requests[version]
        except KeyError:
            by_zone = self.zone_requests[version] = {}
        by_zone[zone] = by_zone.get(zone, 0) + 1
    def grpc_response(self, route: str, version: str, code: int, method: str, error: bool) -> None:
        """A gRPC response ended with grpc-status `code` (HTTP 200; its request() counts it too)."""
        key = (route, version, str(code), method)
        self.grpc[key] = self.grpc.get(key, 0) + 1
        if error:
            try:
                c = self.cells[route][version]
            except KeyError:
                c = self._cell(route, version)
            c.grpc_errors += 1

    def fallback(self, route: str, from_version: str, to_version: str) -> None:
        key = (route, from_version, to_version)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def retry(self, route: str) -> None:
        self.retries[route] = self.retries.get(route, 0) + 1

    def reject(self, reason: RejectReason, route: str = "") -> None:
        """The proxy answered a request itself; `route` when one had matched (the status page adds them up)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        key = (route, reason)
        self.answers[key] = self.answers.get(key, 0) + 1

    def identity_rejected(self, route: str, source: str, reason: IdentityRejectReason) -> None:
        """A credential for a verified source was present but failed: the request goes on anonymous."""
        key = (route, source, reason)
        self.identity_rejects[key] = self.identity_rejects.get(key, 0) + 1

    def connection(self, side: Side, delta: int) -> None:
        self.connections[side] += delta

    def tls_handshake_error(self, listener: str, reason: str) -> None:
        key = (listener, reason)
        self.tls_handshake_errors[key] = self.tls_handshake_errors.get(key, 0) + 1

    def mirror(self, route: str, version: str, code: int | str) -> None:
        """A mirrored (shadow) request finished with status `code`, or "error" / "dropped" without one."""
        key = (route, version, str(code))
        self.mirrors[key] = self.mirrors.get(key, 0) + 1

    # -- control plane ------------------------------------------------------------------------------

    def canary_step(self, route: str, step: int) -> None:
        self.canary_steps[route] = step

    def canary_analysis(self, route: str, result: CanaryResult) -> None:
        key = (route, result)
        self.canary_results[key] = self.canary_results.get(key, 0) + 1

    def canary_step_outcome(self, route: str, outcome: CanaryResult) -> None:
        key = (route, outcome)
        self.canary_outcomes[key] = self.canary_outcomes.get(key, 0) + 1

    def canary_abort(self, route: str) -> None:
        self.canary_aborts[route] = self.canary_aborts.get(route, 0) + 1

    def canary_weight(self, route: str, version: str, percent: float) -> None:
        self.canary_weights[route] = [version, percent]

    def version_check(self, version: str, failed: bool) -> None:
        self.check_failed[version] = 1 if failed else 0

    # -- read side ----------------------------------------------------------------------------------

    @property
    def requests(self) -> dict[tuple[str, str, int], int]:
        return {(r, v, code): n for r, vs in self.cells.items() for v, c in vs.items() for code, n in c.codes.items()}

    @property
    def latency(self) -> dict[tuple[str, str], list[int]]:
        return {(r, v): list(c.hist) for r, vs in self.cells.items() for v, c in vs.items()}

    def snapshot(self) -> dict[str, Any]:
        """Counters as JSON-able data: the wire format workers publish, read by telemetry.metrics.StatsSnapshot."""
        return {
            "cells": [
                [r, v, {str(k): n for k, n in c.codes.items()}, c.duration_sum, c.bytes_in, c.bytes_out,
                 list(c.hist), c.upstream_errors]
                for r, vs in self.cells.items() for v, c in vs.items()
            ],
            "upstream_errors": [[v, k, n] for (v, k), n in self.upstream_errors.items()],
            "fallbacks": [[r, a, b, n] for (r, a, b), n in self.fallbacks.items()],
            "retries": dict(self.retries),
            "rejected": dict(self.rejected),
            "answers": [[r, reason, n] for (r, reason), n in self.answers.items()],
            "connections": dict(self.connections),
            "mirrors": [[r, v, code, n] for (r, v, code), n in self.mirrors.items()],
            "identity_rejected": [[*k, n] for k, n in self.identity_rejects.items()],
            "applied": self.applied,
            "apply_errors": self.apply_errors,
            "access_log_dropped": self.access_log_dropped,
            "canary_steps": dict(self.canary_steps),
            "canary_results": [[r, res, n] for (r, res), n in self.canary_results.items()],
            "canary_outcomes": [[r, res, n] for (r, res), n in self.canary_outcomes.items()],
            "canary_aborts": dict(self.canary_aborts),
            "canary_weights": dict(self.canary_weights),
            "check_failed": dict(self.check_failed),
            "tls_handshake_errors": [[li, r, n] for (li, r), n in self.tls_handshake_errors.items()],
            "zone_requests": [[v, z, n] for v, zs in self.zone_requests.items() for z, n in zs.items()],
            "grpc": [[*k, n] for k, n in self.grpc.items()],
            "grpc_errors": [[r, v, c.grpc_errors] for r, vs in self.cells.items() for v, c in vs.items()
                            if c.grpc_errors],
        }
