"""Observability endpoints of the admin listener: /metrics, the status page's JSON, and the page itself.

- `GET /metrics`: Prometheus text, built at scrape time from every process's statistics (proxy.telemetry.metrics).
  Public unless settings.metrics_auth (proxy.admin.auth's allow-list decides).
- `GET /api/v1/stats`: per route and version, the configured split, live rates, error ratio and p99 over
  the last few seconds, endpoint health and pins: what the status page draws. Needs the token.
- `GET /ui`: the status page (one static HTML file, proxy/admin/ui/index.html). Public: it holds no data
  and asks for the token itself.

Design rule: statistics are summed at request time, never kept here; only rates need state. Rates need
two points in time: every stats request records a sample, and rates compare against the
newest sample at least WINDOW seconds old (or the oldest one while fewer exist).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.admin import cockpit
from proxy.admin.auth import public
from proxy.admin.context import AdminContext
from proxy.admin.zone_view import zone_view
from proxy.control.rechecks import check_views
from proxy.table import RouteTable
from proxy.telemetry.metrics import CONTENT_TYPE, StatsSnapshot, VersionStats, aggregate, render

UI_FILE = Path(__file__).parent / "ui" / "index.html"
# Rates and p99 on the status page cover about this many seconds: steady enough to read, quick to react.
WINDOW = 5.0
# Samples older than this are useless for a WINDOW-second rate.
KEEP = 4 * WINDOW
# Shortest interval worth computing a rate over (below it, rates jump around).
MIN_INTERVAL = 0.5


class Sampler:
    """Recent aggregated snapshots, for rates over a sliding window."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.samples: deque[StatsSnapshot] = deque(maxlen=256)

    def __repr__(self) -> str:
        return f"<Sampler window {self.window:g}s [Samples: {len(self.samples)}]>"

    def add(self, snap: StatsSnapshot) -> StatsSnapshot | None:
        """Record `snap`; return the sample to compare it with, if one is old enough."""
        while self.samples and snap.time - self.samples[0].time > KEEP:
            self.samples.popleft()
        base: StatsSnapshot | None = None
        for s in self.samples:
            if snap.time - s.time >= self.window:
                base = s
            else:
                break
        if base is None and self.samples and snap.time - self.samples[0].time >= MIN_INTERVAL:
            base = self.samples[0]
        self.samples.append(snap)
        return base


def _num(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _version_view(total: VersionStats, recent: VersionStats | None, seconds: float) -> dict[str, Any]:
    view: dict[str, Any] = {
        "requests": total.requests, "errors_5xx": total.errors_5xx, "upstream_errors": total.upstream_errors,
        "rps": None, "error_ratio": None, "p99": None, "p50": None,
    }
    if recent is not None and seconds > 0:
        view["rps"] = round(recent.requests / seconds, 3)
        if recent.requests:
            view["error_ratio"] = round(recent.error_ratio, 6)
            view["p99"] = _num(recent.quantile(0.99))
            view["p50"] = _num(recent.quantile(0.5))
    return view


def stats_view(now: StatsSnapshot, base: StatsSnapshot | None, table: RouteTable,
               health: Mapping[str, Mapping[str, bool]], zone: str | None = None) -> dict[str, Any]:
    recent = now.since(base) if base is not None else None
    seconds = now.time - base.time if base is not None else 0.0
    # One colour per version across the whole page: versions in order of registration.
    order = sorted(table.versions.values(), key=lambda v: (v.created, v.name))
    versions = []
    for i, v in enumerate(order):
        eps = health.get(v.name)
        healthy = None if eps is None else sum(1 for ep in v.endpoints if eps.get(ep))
        versions.append({"name": v.name, "kind": v.spec.kind, "color": i, "endpoints": len(v.endpoints),
                         "healthy": healthy, "zones": zone_view(v, eps, zone, now, recent)})
    known = {v["name"] for v in versions}
    routes = []
    for route in table.state.routes:
        total_weight = sum(w for _, w in route.split)
        names = [v for v, _ in route.split]
        names += [v for v in route.fallback if v not in names]
        names += sorted({v for v in route.pins.values()} - set(names))
        names += [m.version for m in route.mirrors if m.version not in names]
        mirrored = {m.version for m in route.mirrors}
        names += sorted(set(now.versions_of(route.name)) - set(names))
        weights = route.split_map
        rows = []
        for name in names:
            row = _version_view(now.get(route.name, name), recent.get(route.name, name) if recent else None, seconds)
            w = weights.get(name, 0.0)
            row.update(name=name, weight=w, share=(w / total_weight if total_weight else 0.0),
                       fallback=name in route.fallback,
                       mirror=name in mirrored,
                       pinned=sum(1 for pv in route.pins.values() if pv == name), known=name in known)
            rows.append(row)
        m = route.match
        routes.append({
            # Sticky in effect: without an identity source there is no client id to stick by, whatever the
            # route's `sticky` says, so every request is split on its own.
            "name": route.name, "host": m.host, "path_prefix": m.path_prefix,
            "sticky": route.sticky and bool(route.identity),
            "pins": len(route.pins), "fallback": list(route.fallback),
            "mirror": None if route.mirror is None else {"version": route.mirror.version,
                                                         "percent": route.mirror.percent},
            "mirrors": [{"version": m.version, "percent": m.percent} for m in route.mirrors],
            "rps": None if recent is None else round(sum(v["rps"] or 0.0 for v in rows), 3),
            "fallbacks_rps": None if recent is None or seconds <= 0 else round(
                sum(n for (rt, _, _), n in recent.fallbacks.items() if rt == route.name) / seconds, 3),
            "versions": rows,
            **cockpit.route_extras(now, recent, route.name, seconds, {v["name"]: v["requests"] for v in rows}),
        })
    stale = len(now.stale_workers)
    return {
        "time": now.time, "window": round(seconds, 3) if base is not None else None,
        "revision": table.revision, "zone": zone, "versions": versions, "routes": routes,
        "connections": dict(now.connections), "workers": {"live": len(now.workers) - stale, "stale": stale},
        "rejected": dict(now.rejected), "applied": now.applied, "apply_errors": now.apply_errors,
        "unrouted": cockpit.unrouted(now, recent),
    }


class Observe:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.sampler = Sampler()
        self._page: bytes | None = None

    def snapshot(self) -> StatsSnapshot:
        return aggregate(self.ctx.stats, self.ctx.metrics_dir)

    async def metrics(self, request: web.Request) -> web.Response:
        body = render(self.snapshot(), self.ctx.holder.table, self.ctx.health())
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        now = self.snapshot()
        base = self.sampler.add(now)
        table = self.ctx.holder.table
        view = stats_view(now, base, table, self.ctx.health(), self.ctx.settings.zone)
        checks = await check_views(self.ctx.store, table.state, self.ctx.settings.check_interval)
        for v in view["versions"]:
            v["check"] = checks.get(v["name"])
        return web.json_response(view, headers={"Cache-Control": "no-store"})

    async def page(self, request: web.Request) -> web.Response:
        if self._page is None:
            self._page = UI_FILE.read_bytes()
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-cache",
            # Everything is inline; nothing may load from elsewhere, and the page may not be framed.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    o = Observe(ctx)

    @public
    async def page(request: web.Request) -> web.Response:
        return await o.page(request)

    return [
        web.get("/metrics", o.metrics),
        web.get("/api/v1/stats", o.stats),
        web.get("/ui", page),
        web.get("/ui/", page),
    ]
