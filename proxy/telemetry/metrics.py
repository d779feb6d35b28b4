"""Statistics across worker processes, and the Prometheus exposition built from them at scrape time.

Design rule: nothing here runs per request. Each worker's `WorkerPublisher` writes its Stats snapshot to
`<directory>/<worker_id>.json` (write to a temporary file, then atomic rename) every half second; the
supervisor's `aggregate` sums its own Stats with every published file. Counters stay monotonic:
- a dead worker's file stays and keeps being summed (its gauges are dropped once the file is stale);
- the supervisor starts a dead or replaced worker's successor under a new id (`<slot>-<generation>`) and
  marks the predecessor's file retired: still summed, no longer counted as a live or stale worker;
- files left by an earlier run (written before this supervisor process started) are ignored, and a new
  worker overwrites its slot's file from zero, so a restart of the whole proxy starts counters afresh.

All names and labels of the exported series live in this module; the README's "Observability" section
is their reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.table import RouteTable
from proxy.telemetry.published import STALE_AFTER, read_published, read_worker_file, replace_file
from proxy.telemetry.stats import HIST_SLOTS, LATENCY_BUCKETS, Stats

# The classic text format: our names are plain ASCII, and every Prometheus version reads 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How often a worker publishes: the status page polls every second, so half a second keeps it current.
PUBLISH_INTERVAL = 0.5


# -- snapshot ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionStats:
    """Counters of one (route, version) pair. `latency` holds non-cumulative counts per LATENCY_BUCKETS
    bucket plus a final overflow slot (> 10 s)."""

    requests: int = 0
    errors_5xx: int = 0
    upstream_errors: int = 0
    latency: tuple[int, ...] = (0,) * HIST_SLOTS
    duration_sum: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    codes: Mapping[int, int] = field(default_factory=dict)
    grpc_errors: int = 0  # gRPC responses (HTTP 200) whose grpc-status is one of settings.grpc_error_codes

    @property
    def error_ratio(self) -> float:
        """5xx responses and gRPC errors / requests; 0.0 without requests."""
        return (self.errors_5xx + self.grpc_errors) / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        return quantile(self.latency, q)

    def minus(self, older: VersionStats) -> VersionStats:
        """Counts since `older` (a snapshot of the same pair taken earlier); never negative."""
        codes = {c: max(0, n - older.codes.get(c, 0)) for c, n in self.codes.items()}
        return VersionStats(
            requests=max(0, self.requests - older.requests),
            errors_5xx=max(0, self.errors_5xx - older.errors_5xx),
            upstream_errors=max(0, self.upstream_errors - older.upstream_errors),
            latency=tuple(max(0, a - b) for a, b in zip(self.latency, older.latency, strict=True)),
            duration_sum=max(0.0, self.duration_sum - older.duration_sum),
            bytes_in=max(0, self.bytes_in - older.bytes_in),
            bytes_out=max(0, self.bytes_out - older.bytes_out),
            codes={c: n for c, n in codes.items() if n},
            grpc_errors=max(0, self.grpc_errors - older.grpc_errors),
        )


EMPTY_VERSION_STATS = VersionStats()


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Statistics of the whole proxy (supervisor + every worker) at one moment.

    Counters are totals since the proxy started; use `since(older)` for a window.
    """

    time: float
    cells: Mapping[tuple[str, str], VersionStats]  # (route, version)
    upstream_errors: Mapping[tuple[str, str], int]  # (version, kind)
    fallbacks: Mapping[tuple[str, str, str], int]  # (route, from_version, to_version)
    retries: Mapping[str, int]  # route
    rejected: Mapping[str, int]  # reason
    connections: Mapping[str, int]  # side -> open now (gauge)
    mirrors: Mapping[tuple[str, str, str], int]  # (route, version, code: "200", "error", "dropped")
    applied: int
    apply_errors: int
    access_log_dropped: int
    canary_steps: Mapping[str, int]  # route -> current step (gauge)
    canary_results: Mapping[tuple[str, str], int]  # (route, result)
    workers: tuple[str, ...] = ()  # worker ids whose published files were summed
    identity_rejected: Mapping[tuple[str, str, str], int] = field(default_factory=dict)  # (route, source, reason)
    stale_workers: tuple[str, ...] = ()  # ... of which these stopped publishing (dead or hung)
    tls_handshake_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (listener, reason)
    answers: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (route or "", reason): rejected per route
    canary_outcomes: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (route, outcome)
    canary_aborts: Mapping[str, int] = field(default_factory=dict)  # route
    canary_weights: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # route -> [version, percent]
    check_failed: Mapping[str, int] = field(default_factory=dict)  # version -> 0/1 (gauge)
    zone_requests: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (version, endpoint zone)
    grpc: Mapping[tuple[str, str, str, str], int] = field(default_factory=dict)  # (route, version, status, method)

    def get(self, route: str, version: str) -> VersionStats:
        return self.cells.get((route, version), EMPTY_VERSION_STATS)

    def versions_of(self, route: str) -> dict[str, VersionStats]:
        return {v: s for (r, v), s in self.cells.items() if r == route}

    def since(self, older: StatsSnapshot) -> StatsSnapshot:
        """Counters as differences from `older`; gauges as they are now."""
        return StatsSnapshot(
            time=self.time,
            cells={k: s.minus(older.get(*k)) for k, s in self.cells.items()},
            upstream_errors=_minus(self.upstream_errors, older.upstream_errors),
            fallbacks=_minus(self.fallbacks, older.fallbacks),
            retries=_minus(self.retries, older.retries),
            rejected=_minus(self.rejected, older.rejected),
            connections=self.connections,
            mirrors=_minus(self.mirrors, older.mirrors),
            applied=max(0, self.applied - older.applied),
            apply_errors=max(0, self.apply_errors - older.apply_errors),
            access_log_dropped=max(0, self.access_log_dropped - older.access_log_dropped),
            canary_steps=self.canary_steps,
            canary_results=_minus(self.canary_results, older.canary_results),
            workers=self.workers,
            stale_workers=self.stale_workers,
            identity_rejected=_minus(self.identity_rejected, older.identity_rejected),
            tls_handshake_errors=_minus(self.tls_handshake_errors, older.tls_handshake_errors),
            answers=_minus(self.answers, older.answers),
            canary_outcomes=_minus(self.canary_outcomes, older.canary_outcomes),
            canary_aborts=_minus(self.canary_aborts, older.canary_aborts),
            canary_weights=self.canary_weights, check_failed=self.check_failed,
            zone_requests=_minus(self.zone_requests, older.zone_requests),
            grpc=_minus(self.grpc, older.grpc),
        )


def _minus(new: Mapping[Any, int], old: Mapping[Any, int]) -> dict[Any, int]:
    return {k: max(0, n - old.get(k, 0)) for k, n in new.items()}


def quantile(hist_counts: Iterable[int], q: float) -> float:
    """Estimate the q-quantile (0..1) in seconds from non-cumulative bucket counts (LATENCY_BUCKETS order,
    an optional trailing overflow slot), interpolating linearly inside the bucket the rank falls in, as
    Prometheus' histogram_quantile does. NaN without observations; the largest bound when the rank is in
    the overflow slot."""
    counts = list(hist_counts)
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = min(max(q, 0.0), 1.0) * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * ((rank - seen) / n)
        seen += n
    return LATENCY_BUCKETS[-1]


KEYED_COUNTERS = ("canary_results", "identity_rejected", "tls_handshake_errors", "answers", "canary_outcomes",
                  "zone_requests", "grpc")


class _Sum:
    """Accumulates Stats.snapshot() wire dicts."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], list[Any]] = {}  # [codes, dsum, bin, bout, hist, uerr, grpc_errors]
        self.counters: dict[str, dict[Any, int]] = {
            "upstream_errors": {}, "fallbacks": {}, "retries": {}, "rejected": {}, "mirrors": {},
            "canary_results": {}, "identity_rejected": {}, "tls_handshake_errors": {},
            "canary_outcomes": {}, "canary_aborts": {}, "answers": {}, "zone_requests": {}, "grpc": {},
        }
        self.scalars = {"applied": 0, "apply_errors": 0, "access_log_dropped": 0}
        self.connections: dict[str, int] = {"downstream": 0, "upstream": 0}
        self.canary_steps: dict[str, int] = {}
        self.gauges: dict[str, dict[str, Any]] = {"canary_weights": {}, "check_failed": {}}

    def add(self, wire: Mapping[str, Any], gauges: bool = True) -> None:
        for r, v, codes, dsum, bin_, bout, hist, uerr in wire.get("cells", ()):
            cell = self.cells.get((r, v))
            if cell is None:
                cell = self.cells[(r, v)] = [{}, 0.0, 0, 0, [0] * HIST_SLOTS, 0, 0]
            for code, n in codes.items():
                cell[0][int(code)] = cell[0].get(int(code), 0) + n
            cell[1] += dsum
            cell[2] += bin_
            cell[3] += bout
            h = cell[4]
            for i, n in enumerate(hist[:HIST_SLOTS]):
                h[i] += n
            cell[5] += uerr
        for r, v, n in wire.get("grpc_errors", ()):
            cell = self.cells.get((r, v))
            if cell is None:
                cell = self.cells[(r, v)] = [{}, 0.0, 0, 0, [0] * HIST_SLOTS, 0, 0]
            cell[6] += n
        c = self.counters
        _add(c["upstream_errors"], ((tuple(x[:-1]), x[-1]) for x in wire.get("upstream_errors", ())))
        _add(c["fallbacks"], ((tuple(x[:-1]), x[-1]) for x in wire.get("fallbacks", ())))
        _add(c["retries"], wire.get("retries", {}).items())
        _add(c["rejected"], wire.get("rejected", {}).items())
        _add(c["mirrors"], (((x[0], x[1], str(x[2])), x[3]) for x in wire.get("mirrors", ())))
        for key in KEYED_COUNTERS:
            _add(c[key], ((tuple(x[:-1]), x[-1]) for x in wire.get(key, ())))
        _add(c["canary_aborts"], wire.get("canary_aborts", {}).items())
        for k in self.scalars:
            self.scalars[k] += int(wire.get(k, 0))
        if gauges:
            for side, n in wire.get("connections", {}).items():
                self.connections[side] = self.connections.get(side, 0) + n
            self.canary_steps.update(wire.get("canary_steps", {}))
            for name, g in self.gauges.items():
                g.update(wire.get(name, {}))

    def wire(self) -> dict[str, Any]:
        """Counters only (the base a restarted worker continues from)."""
        c = self.counters
        return {
            "cells": [[r, v, {str(k): n for k, n in cell[0].items()}, cell[1], cell[2], cell[3], cell[4], cell[5]]
                      for (r, v), cell in self.cells.items()],
            "upstream_errors": [[*k, n] for k, n in c["upstream_errors"].items()],
            "fallbacks": [[*k, n] for k, n in c["fallbacks"].items()],
            "retries": dict(c["retries"]),
            "rejected": dict(c["rejected"]),
            "mirrors": [[*k, n] for k, n in c["mirrors"].items()],
            **{key: [[*k, n] for k, n in c[key].items()] for key in KEYED_COUNTERS},
            "canary_aborts": dict(c["canary_aborts"]),
            "grpc_errors": [[r, v, cell[6]] for (r, v), cell in self.cells.items() if cell[6]],
            **self.scalars,
        }

    def freeze(self, now: float, workers: tuple[str, ...], stale: tuple[str, ...]) -> StatsSnapshot:
        cells = {}
        for key, (codes, dsum, bin_, bout, hist, uerr, gerr) in self.cells.items():
            cells[key] = VersionStats(
                requests=sum(codes.values()), errors_5xx=sum(n for code, n in codes.items() if code >= 500),
                upstream_errors=uerr, latency=tuple(hist), duration_sum=dsum, bytes_in=bin_, bytes_out=bout,
                codes=dict(codes), grpc_errors=gerr)
        c = self.counters
        return StatsSnapshot(
            time=now, cells=cells, upstream_errors=c["upstream_errors"], fallbacks=c["fallbacks"],
            retries=c["retries"], rejected=c["rejected"], connections=self.connections, mirrors=c["mirrors"],
            applied=self.scalars["applied"], apply_errors=self.scalars["apply_errors"],
            access_log_dropped=self.scalars["access_log_dropped"], canary_steps=self.canary_steps,
            canary_results=c["canary_results"], workers=workers, stale_workers=stale,
            identity_rejected=c["identity_rejected"],
            tls_handshake_errors=c["tls_handshake_errors"], canary_outcomes=c["canary_outcomes"],
            canary_aborts=c["canary_aborts"], canary_weights=self.gauges["canary_weights"],
            check_failed=self.gauges["check_failed"], answers=c["answers"],
            zone_requests=c["zone_requests"], grpc=c["grpc"])


def _add(into: dict[Any, int], items: Iterable[tuple[Any, int]]) -> None:
    for k, n in items:
        into[k] = into.get(k, 0) + n


# -- cross-process publishing -----------------------------------------------------------------------


def aggregate(local: Stats, directory: Path | None) -> StatsSnapshot:
    """This process's Stats plus every worker's published file. The caller must not also publish
    `local` into `directory` (it would be counted twice)."""
    acc = _Sum()
    acc.add(local.snapshot())
    now = time.time()
    workers: list[str] = []
    stale: list[str] = []
    if directory is not None:
        for pub in read_published(directory):
            fresh = now - pub.time < STALE_AFTER and not pub.retired
            acc.add(pub.stats, gauges=fresh)
            if pub.retired:
                continue
            workers.append(pub.worker)
            if not fresh:
                stale.append(pub.worker)
    return acc.freeze(now, tuple(workers), tuple(stale))


class WorkerPublisher:
    """Publishes one worker's Stats (plus `extra()`, e.g. its health view) for the supervisor to sum."""

    def __init__(self, stats: Stats, directory: Path, worker_id: str,
                 extra: Callable[[], dict[str, Any]] | None = None, interval: float = PUBLISH_INTERVAL) -> None:
        if not worker_id or "/" in worker_id or worker_id.startswith("."):
            raise ValueError(f"worker_id must be a plain file name, got {worker_id!r}")
        self.stats = stats
        self.directory = Path(directory)
        self.worker_id = worker_id
        self.extra = extra
        self.interval = interval
        self.path = self.directory / f"{worker_id}.json"
        self.publishes = 0
        self._base: Mapping[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<WorkerPublisher {self.worker_id} -> {self.path} [Publishes: {self.publishes}]>"

    def _load_base(self) -> None:
        """Continue from the counters of the previous worker in this slot, if the same supervisor ran it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        prev = read_worker_file(self.path)
        if prev is not None and prev.ppid == os.getppid() and prev.pid != os.getpid():
            self._base = prev.stats

    def render(self) -> bytes:
        wire = self.stats.snapshot()
        if self._base is not None:
            acc = _Sum()
            acc.add(self._base, gauges=False)
            acc.add(wire)
            merged = acc.wire()
            merged["connections"] = wire["connections"]
            merged["canary_steps"] = wire["canary_steps"]
            for name in ("canary_weights", "check_failed"):
                merged[name] = wire.get(name, {})
            wire = merged
        extra = self.extra() if self.extra is not None else {}
        doc = {"worker": self.worker_id, "time": time.time(), "pid": os.getpid(), "ppid": os.getppid(),
               "stats": wire, "extra": extra}
        return json.dumps(doc, separators=(",", ":")).encode()

    def write(self, data: bytes) -> None:
        replace_file(self.path, data)

    def publish(self) -> None:
        self.write(self.render())
        self.publishes += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._load_base()
        try:
            while True:
                # Snapshot on the loop thread (Stats has no locks); the file write happens off it.
                data = self.render()
                await loop.run_in_executor(None, self.write, data)
                self.publishes += 1
                await asyncio.sleep(self.interval)
        finally:
            with contextlib.suppress(OSError):
                self.publish()


# -- Prometheus exposition --------------------------------------------------------------------------

Health = Mapping[str, Mapping[str, bool]]


def families(snap: StatsSnapshot, table: RouteTable, health: Health) -> list[Metric]:
    """Every exported series. Names and labels here are the contract documented in the README ("Series")."""
    out: list[Metric] = []

    reqs = CounterMetricFamily("turnout_requests", "Requests answered, by route, version and status code; a 502, "
                               "503 or 504 the proxy answered itself counts under the version the request was "
                               "meant for.", labels=["route", "version", "code"])
    dur = HistogramMetricFamily("turnout_request_duration_seconds",
                                "Time from request head received to response fully sent, by route and version.",
                                labels=["route", "version"])
    nbytes = CounterMetricFamily("turnout_request_bytes", "Body bytes received from clients (in) and sent to "
                                 "them (out), by route and version.", labels=["route", "version", "direction"])
    for (route, version), s in sorted(snap.cells.items()):
        for code, n in sorted(s.codes.items()):
            reqs.add_metric([route, version, str(code)], n)
        cum = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip(LATENCY_BUCKETS, s.latency, strict=False):
            cum += n
            buckets.append((_fmt_le(bound), cum))
        buckets.append(("+Inf", s.requests))
        dur.add_metric([route, version], buckets, s.duration_sum)
        nbytes.add_metric([route, version, "in"], s.bytes_in)
        nbytes.add_metric([route, version, "out"], s.bytes_out)
    out += [reqs, dur, nbytes]

    out.append(_counter("turnout_upstream_errors", "Failed upstream attempts, by version and kind "
                        "(connect, timeout, reset, invalid_response, tls).", ["version", "kind"], snap.upstream_errors))
    out.append(_counter("turnout_fallbacks", "Requests served by another version than the one chosen for them "
                        "(its fallback chain, or another version of the split) because it could not serve.",
                        ["route", "from_version", "to_version"], snap.fallbacks))
    out.append(_counter("turnout_retries", "Upstream attempts retried, by route.", ["route"], snap.retries))
    out.append(_counter("turnout_requests_rejected", "Requests refused before reaching any version, by reason "
                        "(no_healthy_version: also in turnout_requests_total, code 503).",
                        ["reason"], snap.rejected))
    out.append(_counter("turnout_identity_rejected", "Requests whose credential for a verified identity source was "
                        "present but failed (they go on anonymous), by route, source and reason.",
                        ["route", "source", "reason"], snap.identity_rejected))
    out.append(_counter("turnout_mirror_requests", "Mirrored (shadow) requests, by route, version and status code "
                        "(error: no response; dropped: not sent, too many in flight).", ["route", "version", "code"],
                        snap.mirrors))
    out.append(_counter("turnout_tls_handshake_errors", "TLS handshakes that failed, by listener and reason "
                        "(protocol_version, client_certificate, timeout, not_tls, closed, ...); none reached "
                        "an upstream.", ["listener", "reason"], snap.tls_handshake_errors))
    out.append(_counter("turnout_upstream_requests", "Upstream attempts to endpoints of a known zone, by version "
                        "and the endpoint's zone.", ["version", "zone"], snap.zone_requests))
    out.append(_counter("turnout_grpc_responses", "gRPC responses by route, version and grpc-status (method: "
                        "the call's path on routes with grpc_method_label, else empty).",
                        ["route", "version", "grpc_status", "method"], snap.grpc))
    out.append(_counter("turnout_canary_analysis", "Canary analysis rounds, by route and result.",
                        ["route", "result"], snap.canary_results))
    out.append(_counter("turnout_canary_steps", "Canary steps judged, by route and outcome (pass, fail, "
                        "inconclusive: the rollout paused).", ["route", "outcome"], snap.canary_outcomes))
    out.append(_counter("turnout_canary_aborts", "Canary rollouts rolled back (a failed analysis or an operator's "
                        "abort), by route.", ["route"], snap.canary_aborts))

    weight = GaugeMetricFamily("turnout_route_weight", "Configured split weight of a version in a route "
                               "(share = weight / sum of the route's weights).", labels=["route", "version"])
    pins = GaugeMetricFamily("turnout_pins", "Clients pinned to a dedicated version, by route.", labels=["route"])
    for r in table.routes:
        for version, w in r.route.split:
            weight.add_metric([r.name, version], w)
        pins.add_metric([r.name], len(r.route.pins))
    healthy = GaugeMetricFamily("turnout_route_healthy_versions", "Versions that can serve a route's traffic "
                                "(weight > 0, or in its fallback chain) with at least one healthy endpoint.",
                                labels=["route"])
    for r in table.routes:
        serving = {v for v, w in r.route.split if w > 0} | set(r.route.fallback)
        healthy.add_metric([r.name], sum(1 for v in serving if _version_healthy(table, health, v)))
    out += [weight, pins, healthy]

    up = GaugeMetricFamily("turnout_endpoint_up", "1 when the endpoint is considered healthy, else 0 (zone: "
                           "where it runs, \"\" when unknown).", labels=["version", "endpoint", "zone"])
    for version in sorted(health):
        v = table.versions.get(version)
        zones = dict(v.zones) if v is not None else {}
        for endpoint, ok in sorted(health[version].items()):
            up.add_metric([version, endpoint, zones.get(endpoint, "")], 1.0 if ok else 0.0)
    out.append(up)

    conns = GaugeMetricFamily("turnout_connections", "Open connections, downstream (clients) and upstream.",
                              labels=["side"])
    for side, n in sorted(snap.connections.items()):
        conns.add_metric([side], n)
    out.append(conns)

    steps = GaugeMetricFamily("turnout_canary_step", "Current step of a route's canary rollout.", labels=["route"])
    for route, step in sorted(snap.canary_steps.items()):
        steps.add_metric([route], step)
    out.append(steps)
    cw = GaugeMetricFamily("turnout_canary_weight", "The canary's share of a route in percent, as its rollout set "
                           "it (version: the canary).", labels=["route", "version"])
    for route, (version, pct) in sorted(snap.canary_weights.items()):
        cw.add_metric([route, version], pct)
    failed = GaugeMetricFamily("turnout_version_check_failed", "1 while a version that receives traffic failed its "
                               "last check (re-check), else 0.", labels=["version"])
    for version, flag in sorted(snap.check_failed.items()):
        failed.add_metric([version], flag)
    out += [cw, failed]

    out.append(GaugeMetricFamily("turnout_state_revision", "Revision of the route table being served.",
                                 value=table.revision))
    out.append(CounterMetricFamily("turnout_state_applied", "Route tables installed (summed over processes).",
                                   value=snap.applied))
    out.append(CounterMetricFamily("turnout_state_apply_errors", "Revisions or route files that could not be "
                                   "installed; the previous table kept serving.", value=snap.apply_errors))
    out.append(CounterMetricFamily("turnout_access_log_dropped", "Access log lines dropped because the writer "
                                   "fell behind.", value=snap.access_log_dropped))
    workers = GaugeMetricFamily("turnout_workers", "Worker processes whose statistics are summed, by state "
                                "(stale: stopped publishing).", labels=["state"])
    stale = len(snap.stale_workers)
    workers.add_metric(["live"], len(snap.workers) - stale)
    workers.add_metric(["stale"], stale)
    out.append(workers)
    return out


def _version_healthy(table: RouteTable, health: Health, version: str) -> bool:
    """A version the health view does not know yet (no checks run) counts as healthy: no false alarm at start."""
    v = table.versions.get(version)
    if v is None or not v.endpoints:
        return False
    eps = health.get(version)
    if eps is None:
        return True
    return any(eps.get(ep, False) for ep in v.endpoints)


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items(), key=lambda kv: tuple(map(str, _tuple(kv[0])))):
        fam.add_metric([str(x) for x in _tuple(key)], n)
    return fam


def _tuple(key: Any) -> tuple[Any, ...]:
    return key if isinstance(key, tuple) else (key,)


def _fmt_le(bound: float) -> str:
    return repr(float(bound))


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def render(snap: StatsSnapshot, table: RouteTable, health: Health) -> bytes:
    """The /metrics body (Prometheus text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(snap, table, health)))
    return bytes(generate_latest(registry))
