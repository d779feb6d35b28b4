"""Choosing a version for one request: sticky buckets, exact weighted cycles, and the fallback chain.

Design rules:
- Sticky assignment hashes (route, client id) with BLAKE2b into BUCKETS buckets; versions occupy contiguous
  bucket ranges in the order the split lists them. Moving weight between neighbours moves only the
  clients in the range between the old and new boundary, and a version whose share grows never loses a
  client while the versions before it in the split keep or lose weight (put canaries last).
  BLAKE2b, not Python's salted `hash()`, so every process and machine agrees.
- Requests without a client id follow a precomputed smooth weighted round-robin cycle: exact proportions
  (a 3:1 split over 4 picks gives 3 and 1), O(1) per pick, no random numbers on the hot path.
- A request whose version (and fallback chain) cannot serve goes to the split's other versions that can,
  weighted among them: a sticky client by its position inside its own version's bucket range (the same
  stand-in on every request and every machine, and its own version again once that is healthy), other
  requests by a smooth weighted round robin over the usable versions only.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b

BUCKETS = 10_000

# Longest precomputed weighted cycle; weights are quantised to BUCKETS parts first, so this suffices.
MAX_CYCLE = BUCKETS


def bucket_of(route: str, client_id: str) -> int:
    key = f"{route}\0{client_id}".encode("utf-8", "surrogatepass")
    digest = blake2b(key, digest_size=8, person=b"turnout1").digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket_bounds(weights: Sequence[float]) -> list[int]:
    """Upper bucket bound (exclusive) of each version's range, in split order."""
    total = sum(weights)
    bounds = []
    acc = 0.0
    for w in weights:
        acc += w
        bounds.append(round(acc / total * BUCKETS) if total > 0 else 0)
    if bounds and total > 0:
        bounds[-1] = BUCKETS
    return bounds


def unrouted(weights: Sequence[float]) -> list[int]:
    """Indices of the weights > 0 that would get no traffic: under 1/BUCKETS of the total (the resolution
    of both the buckets and the weighted cycle), or left without a bucket by rounding at a neighbour's
    boundary. The tolerance lets a share meant to be exactly 1/BUCKETS (0.01 of 100) pass despite binary
    fractions; whether it then really got a bucket is checked on the bounds themselves."""
    total = sum(weights)
    if total <= 0:
        return []
    bounds = bucket_bounds(weights)
    out = []
    lo = 0
    for i, w in enumerate(weights):
        if w > 0 and (w * BUCKETS < total * (1 - 1e-9) or bounds[i] <= lo):
            out.append(i)
        lo = bounds[i]
    return out


def smallest_routing_weight(weights: Sequence[float], i: int) -> float:
    """The smallest weight (5 significant digits, rounded up) that makes weights[i] route, the others kept."""
    others = sum(weights) - weights[i]
    w = max(weights[i], others / (BUCKETS - 1))
    trial = list(weights)
    for _ in range(1000):
        w = _ceil_digits(w)
        trial[i] = w
        if i not in unrouted(trial):
            break
        w *= 1.0001
    return w


def _ceil_digits(x: float, digits: int = 5) -> float:
    if x <= 0:
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def index_for_bucket(bounds: Sequence[int], bucket: int) -> int:
    return bisect_right(bounds, bucket)


def quantise(weights: Sequence[float]) -> list[int]:
    """Integer shares that keep the ratios, reduced by their gcd, summing to at most BUCKETS."""
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    if all(float(w).is_integer() for w in weights) and total <= BUCKETS:
        shares = [int(w) for w in weights]
    else:
        bounds = bucket_bounds(weights)
        shares = [b - a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    g = 0
    for s in shares:
        g = math.gcd(g, s)
    return [s // g for s in shares] if g else shares


def smooth_cycle(weights: Sequence[float]) -> list[int]:
    """Indices of versions in nginx-style smooth weighted round-robin order, one full period long."""
    shares = quantise(weights)
    period = sum(shares)
    if period == 0:
        return []
    current = [0] * len(shares)
    out = []
    for _ in range(min(period, MAX_CYCLE)):
        best = 0
        for i, s in enumerate(shares):
            current[i] += s
            if current[i] > current[best]:
                best = i
        current[best] -= period
        out.append(best)
    return out


def spread_bucket(bounds: Sequence[int], shares: Sequence[int], usable: Sequence[bool], bucket: int) -> int:
    """Index of the version serving a sticky client whose bucket's version cannot: the bucket's place inside
    that version's range, laid over the shares of the usable versions. -1 when no version is usable."""
    k = bisect_right(bounds, bucket)
    if usable[k]:
        return k
    lo = bounds[k - 1] if k else 0
    total = 0
    for i, s in enumerate(shares):
        if usable[i]:
            total += s
    if total == 0:
        return -1
    target = (bucket - lo) * total // (bounds[k] - lo)
    acc = 0
    for i, s in enumerate(shares):
        if usable[i]:
            acc += s
            if target < acc:
                return i
    return -1


def smooth_pick(shares: Sequence[int], usable: Sequence[bool], current: list[int]) -> int:
    """One step of nginx's smooth weighted round robin over the usable versions (`current` is its state,
    kept by the caller). Exact proportions among them for as long as the usable set stays the same."""
    total = 0
    best = -1
    for i, s in enumerate(shares):
        if s > 0 and usable[i]:
            total += s
            current[i] += s
            if best < 0 or current[i] > current[best]:
                best = i
    if best >= 0:
        current[best] -= total
    return best


def fallback_chain(chosen: str, fallback: Sequence[str]) -> tuple[str, ...]:
    """The chosen version, then the route's fallbacks in order, each once."""
    return (chosen, *(f for f in fallback if f != chosen))
