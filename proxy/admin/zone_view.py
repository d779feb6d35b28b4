"""The zones part of the status API: per version, healthy endpoints per zone and traffic leaving the zone.

Design rule: computed at request time from the route table, the health view and the summed counters, like
the rest of proxy.admin.observe; the planned shares come from the same pure rule the data plane applies
(proxy.zones.endpoint_weights), so the page shows what the proxy does, not a second estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.model import Version
from proxy.telemetry.metrics import StatsSnapshot
from proxy.zones import UNKNOWN, endpoint_weights


def zone_view(v: Version, health: Mapping[str, bool] | None, local: str | None, now: StatsSnapshot,
              recent: StatsSnapshot | None) -> dict[str, Any] | None:
    """None for a version none of whose endpoints has a zone. Otherwise `zones`: per zone (sorted, ""
    for endpoints of unknown zone) its endpoints, healthy ones (None before any check) and planned share
    of this proxy's traffic; `leaving`: the planned share sent outside the proxy's zone (None without a
    proxy zone); `leaving_measured`: the share of upstream attempts that went to another zone, over the
    last seconds when there were some (else since start; None without a proxy zone or attempts)."""
    zones = dict(v.zones)
    if not any(zones.get(e) for e in v.endpoints):
        return None
    eps = list(dict.fromkeys(v.endpoints))
    ep_zones = [zones.get(e, UNKNOWN) for e in eps]
    ok = [True if health is None else bool(health.get(e, False)) for e in eps]
    weights = endpoint_weights(ep_zones, ok, local)
    total = sum(weights)
    rows: dict[str, dict[str, Any]] = {}
    for z, good, w in zip(ep_zones, ok, weights, strict=True):
        row = rows.setdefault(z, {"zone": z, "endpoints": 0, "healthy": None if health is None else 0,
                                  "share": 0.0})
        row["endpoints"] += 1
        if health is not None and good:
            row["healthy"] += 1
        row["share"] += w / total if total else 0.0
    leaving = None
    measured = None
    if local is not None:
        leaving = round(sum(r["share"] for z, r in rows.items() if z != local), 6) if total else None
        for snap in (recent, now):
            counts = {z: n for (ver, z), n in (snap.zone_requests if snap is not None else {}).items()
                      if ver == v.name}
            if sum(counts.values()):
                measured = round(sum(n for z, n in counts.items() if z != local) / sum(counts.values()), 6)
                break
    for row in rows.values():
        row["share"] = round(row["share"], 6)
    return {"zones": [rows[z] for z in sorted(rows)], "leaving": leaving, "leaving_measured": measured}
