"""Zone-aware endpoint choice: which share of one version's traffic each zone's endpoints get.

Design rule: zones choose endpoints *within* a version, never versions. The split, pins, sticky buckets and
the fallback chain have chosen the version before anything here runs, so a weight shift or a rollback means
the same thing in every zone. Pure arithmetic on counts (no I/O, no asyncio), exact (fractions), so tests
state the exact shares; the data plane turns them into a precomputed cycle on each health change.

The rule is Envoy's zone-aware routing. Let u[z] be zone z's share of the version's healthy endpoints and
t[z] its share of the traffic the proxies send (where clients arrive). A proxy in zone L:
- keeps everything in L while u[L] >= t[L] (its zone can take the traffic that arrives there);
- otherwise keeps u[L] / t[L] of it in L (so L's endpoints carry exactly their fair load) and spreads the
  rest over the other zones in proportion to their residual capacity u[z] - t[z] (those with some);
- sends everything elsewhere when L has no healthy endpoint; returns no share at all only when no zone has
  one, and then the fallback chain moves to the next version, as without zones.

A proxy replica does not know how much traffic the other replicas receive. turnout assumes the deployment is
provisioned for its traffic: t[z] is proportional to the version's endpoints in z (all of them, healthy or
not). So with every endpoint healthy each replica stays in its zone, and when one zone weakens (its other
zones whole) the excess goes to the other zones in proportion to their healthy endpoints; if every proxy
replica applies the rule, every healthy endpoint ends up with the same load.

Endpoints of unknown zone (plain URLs, zone "") count as one more zone: its t is their share of the
endpoints too, so they take spill-over like any zone, and a proxy without a zone uses the plain shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

from proxy.select import BUCKETS

UNKNOWN = ""  # the zone of an endpoint given as a plain URL


def zone_shares(local: str | None, healthy: Mapping[str, int], traffic: Mapping[str, int]) -> dict[str, Fraction]:
    """Share of the traffic arriving in zone `local` that each zone's healthy endpoints get, by zone (only
    zones with a share > 0; the shares sum to 1). `healthy`: healthy endpoints per zone; `traffic`: the
    relative traffic each zone receives (the data plane passes the version's endpoints per zone, see the
    module docstring). Empty when no zone has a healthy endpoint. Without a local zone (None, or one that
    receives no traffic) the shares are plain: proportional to healthy endpoints."""
    total_healthy = sum(n for n in healthy.values() if n > 0)
    if total_healthy == 0:
        return {}
    up = {z: Fraction(n, total_healthy) for z, n in healthy.items() if n > 0}
    total_traffic = sum(n for n in traffic.values() if n > 0)
    if local is None or local == UNKNOWN or traffic.get(local, 0) <= 0:
        return up
    arriving = {z: Fraction(n, total_traffic) for z, n in traffic.items() if n > 0}
    u_local = up.get(local, Fraction(0))
    t_local = arriving[local]
    if u_local >= t_local:
        return {local: Fraction(1)}
    keep = u_local / t_local
    # The residuals of the other zones sum to at least t_local - u_local > 0 (all u and t sum to 1).
    residual = {z: u - arriving.get(z, Fraction(0)) for z, u in up.items() if z != local}
    residual = {z: r for z, r in residual.items() if r > 0}
    spare = sum(residual.values())
    shares = {z: (1 - keep) * r / spare for z, r in residual.items()}
    if keep > 0:
        shares[local] = keep
    return shares


def endpoint_weights(zones: Sequence[str], healthy: Sequence[bool], local: str | None) -> list[int]:
    """Integer weights per endpoint (same order as `zones`, 0 for an unhealthy one) realising zone_shares
    for a version whose endpoints are in `zones`: a zone's share is split evenly over its healthy endpoints.
    Exact when the common denominator is at most BUCKETS; otherwise quantised to BUCKETS parts (each healthy
    endpoint with a share keeps at least one). All zero when no endpoint is healthy."""
    counts: dict[str, int] = {}
    up: dict[str, int] = {}
    for z, ok in zip(zones, healthy, strict=True):
        counts[z] = counts.get(z, 0) + 1
        if ok:
            up[z] = up.get(z, 0) + 1
    shares = zone_shares(local, up, counts)
    per = [shares.get(z, Fraction(0)) / up[z] if ok and z in up else Fraction(0)
           for z, ok in zip(zones, healthy, strict=True)]
    denominator = 1
    for f in per:
        denominator = denominator * f.denominator // math.gcd(denominator, f.denominator)
    if denominator <= BUCKETS:
        weights = [int(f * denominator) for f in per]
    else:
        weights = [max(1, round(f * BUCKETS)) if f > 0 else 0 for f in per]
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    return [w // g for w in weights] if g else weights


def slot_zones(replicas: int, zones: Sequence[str]) -> list[str]:
    """The zone of each replica slot: slot i in zones[i % len(zones)], so scaling up or down by one moves no
    other replica, and the counts are spread_replicas'. Empty without zones."""
    return [zones[i % len(zones)] for i in range(replicas)] if zones else []


def spread_replicas(replicas: int, zones: Sequence[str]) -> dict[str, int]:
    """How many replicas each zone runs: as even as possible, the remainder to the first zones listed."""
    if not zones:
        return {}
    base, extra = divmod(replicas, len(zones))
    return {z: base + (1 if i < extra else 0) for i, z in enumerate(zones)}
