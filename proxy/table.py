"""The compiled route table: built once per state revision, read once per request, swapped whole.

Design rule: everything a request needs is precomputed here, so the request path does a handful of dict
lookups and no allocation beyond what it must: pins map a client straight to a ready (reason, chain)
pair, sticky routes bisect precomputed bucket bounds, and per-request picks walk a precomputed cycle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

from proxy.model import Route, State, Version
from proxy.route_index import PATH_PREFIX, RouteIndex
from proxy.select import (
    bucket_bounds,
    bucket_of,
    fallback_chain,
    index_for_bucket,
    quantise,
    smooth_cycle,
    smooth_pick,
    spread_bucket,
)

# Why a version was chosen; the data plane reports "fallback" itself when it moves down the chain.
PIN: Final = "pin"
STICKY: Final = "sticky"
WEIGHTED: Final = "weighted"
ASSIGNED: Final = "assigned"

_PCT_UNRESERVED = re.compile(r"%(4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[Dd]|2[Ee]|5[Ff]|7[Ee])")

Pick = tuple[str, tuple[str, ...]]  # (reason, chain: chosen version first, then fallbacks)

# A changed pin set is patched into a copy of the previous compiled pins when it has at least PATCH_MIN
# entries and at most one in PATCH_SHARE of them changed; otherwise it is compiled afresh.
PATCH_MIN: Final = 1000
PATCH_SHARE: Final = 8
# Up to this many routes, scanning them costs less than probing the index (compiled: ~90 ns for one
# route, ~170 for eight, ~340 for an index probe).
SCAN_MAX: Final = 8


class CompiledRoute:
    __slots__ = (
        "_assignable", "_bounds", "_cycle", "_cycle_len", "_next", "_pins", "_shares", "_spread_current",
        "_sticky_picks", "_weighted_picks", "assignment_cookie", "chains", "challenge", "expose_version",
        "header_ids", "host", "host_suffix", "identity", "match_headers", "name", "path", "path_kind",
        "pins_verified", "prefix", "prefix_dir", "require_identity", "route", "sources", "split_names", "verifying",
    )

    def __init__(self, route: Route, previous: CompiledRoute | None = None) -> None:
        self.route = route
        self.name = route.name
        self.expose_version = route.expose_version
        self.assignment_cookie = route.assignment_cookie
        m = route.match
        self.host = None if m.host is None or m.host.startswith("*.") else m.host
        self.host_suffix = m.host[1:] if m.host and m.host.startswith("*.") else None
        self.prefix = m.path_prefix
        self.prefix_dir = m.path_prefix if m.path_prefix.endswith("/") else m.path_prefix + "/"
        # What the route index reads (proxy.route_index.IndexedEntry).
        self.path_kind: int = PATH_PREFIX
        self.path = m.path_prefix
        self.match_headers = m.headers
        self.identity = tuple((s.kind, s.name) for s in route.identity)
        # Only header identities are common enough to deserve their own fast path.
        self.header_ids = all(kind == "header" for kind, _ in self.identity)
        # Verified sources (proxy.dataplane.identity) take the request path's one extra branch; others never.
        self.sources = route.identity
        self.verifying = any(s.verified for s in route.identity)
        self.pins_verified = route.pins_require_verified
        self.require_identity = route.require_identity
        self.challenge = any(s.kind == "jwt" for s in route.identity)
        names = [v for v, _ in route.split]
        weights = [w for _, w in route.split]
        all_versions = set(names) | set(route.pins.values()) | set(route.fallback)
        self.chains = {v: fallback_chain(v, route.fallback) for v in all_versions}
        self._assignable = frozenset(names) | frozenset(route.fallback)
        self._sticky_picks = [(STICKY, self.chains[v]) for v in names]
        self._weighted_picks = [(WEIGHTED, self.chains[v]) for v in names]
        old = previous.route if previous is not None else None
        if old is not None and previous is not None and old.fallback == route.fallback and (
                old.pins is route.pins or (len(old.pins) == len(route.pins) and old.pins == route.pins)):
            # A weight change keeps the pins mapping: reuse its compiled form instead of rebuilding
            # 100,000 entries, so an operator's change is served within a millisecond or two. A rollback
            # brings an equal mapping read back from the store: comparing costs far less than rebuilding.
            self._pins: dict[str, Pick] = previous._pins
        else:
            changed = _pin_changes(route.pins, old.pins) \
                if old is not None and previous is not None and old.fallback == route.fallback else None
            if changed is not None and previous is not None:
                # A pin or unpin: patch a copy (the previous table may still be serving) instead of
                # compiling 100,000 entries again; the diff and the copy run in C at a third of the cost.
                self._pins = previous._pins.copy()
                for client in changed:
                    v = route.pins.get(client)
                    if v is None:
                        del self._pins[client]
                    else:
                        self._pins[client] = (PIN, self.chains[v])
            else:
                pin_picks = {v: (PIN, self.chains[v]) for v in set(route.pins.values())}
                self._pins = {client: pin_picks[v] for client, v in route.pins.items()}
        self._bounds = bucket_bounds(weights)
        self._cycle = [self._weighted_picks[i] for i in smooth_cycle(weights)]
        self._cycle_len = len(self._cycle)
        self._next = 0
        self.split_names: tuple[str, ...] = tuple(names)
        self._shares = quantise(weights)
        self._spread_current = [0] * len(names)

    def __repr__(self) -> str:
        split = " ".join(f"{v}={w:g}" for v, w in self.route.split)
        return (f"<CompiledRoute {self.name} [{self.prefix}] split: {split} | pins: {len(self._pins)}"
                f" | sticky: {'on' if self.route.sticky else 'off'}>")

    def matches(self, host: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if self.prefix != "/" and path != self.prefix and not path.startswith(self.prefix_dir):
            return False
        for name, value in self.match_headers:
            if headers.get(name) != value:
                return False
        return True

    def headers_match(self, headers: Mapping[str, str]) -> bool:
        for name, value in self.match_headers:
            if headers.get(name) != value:
                return False
        return True

    def client_id(self, headers: Mapping[str, str], query: str | None = None) -> str | None:
        """The first identity source that yields a non-empty value. `headers` has lower-case names."""
        for kind, name in self.identity:
            if kind == "header":
                v = headers.get(name)
                if v:
                    return v
            elif kind == "cookie":
                v = cookie_value(headers.get("cookie"), name)
                if v:
                    return v
            elif kind == "query" and query:
                for k, qv in parse_qsl(query, keep_blank_values=False):
                    if k == name and qv:
                        return qv
        return None

    def pick(self, client_id: str | None) -> Pick:
        if client_id is not None:
            pinned = self._pins.get(client_id)
            if pinned is not None:
                return pinned
            if self.route.sticky and self._cycle_len:
                return self._sticky_picks[index_for_bucket(self._bounds, bucket_of(self.name, client_id))]
        return self.pick_weighted()

    def pick_unpinned(self, client_id: str | None) -> Pick:
        """The sticky split for an id that may not use pins (pins_require_verified, unverified id)."""
        if client_id is not None and self.route.sticky and self._cycle_len:
            return self._sticky_picks[index_for_bucket(self._bounds, bucket_of(self.name, client_id))]
        return self.pick_weighted()

    def pick_weighted(self) -> Pick:
        i = self._next
        self._next = i + 1 if i + 1 < self._cycle_len else 0
        return self._cycle[i]

    def pinned(self, client_id: str | None) -> bool:
        return client_id is not None and client_id in self._pins

    def spread(self, usable: list[bool], client_id: str | None) -> int:
        """Index into split_names of the version standing in for one that cannot serve, weighted among the
        `usable` ones (split order; a weight-0 version never stands in), or -1. A sticky client always gets
        the same stand-in for the same usable set; nothing is remembered, so it is back on its own version
        once that serves."""
        if self._cycle_len == 0:
            return -1
        if client_id is not None and self.route.sticky:
            return spread_bucket(self._bounds, self._shares, usable, bucket_of(self.name, client_id))
        return smooth_pick(self._shares, usable, self._spread_current)

    def assigned(self, version: str) -> Pick | None:
        """Pick for a session whose assignment cookie names `version`: honoured only for versions of the
        split (weight 0 included: that is what a drain keeps serving) or the fallback chain, never for a
        version reachable only through someone else's pin."""
        if version not in self._assignable:
            return None
        return (ASSIGNED, self.chains[version])

    def pick_session(self, client_id: str | None, assigned_version: str | None) -> Pick:
        """Selection with the assignment cookie in its place: a pin (operator intent for this client)
        beats an older assignment, which beats the sticky split."""
        if client_id is not None:
            pinned = self._pins.get(client_id)
            if pinned is not None:
                return pinned
        if assigned_version is not None:
            pick = self.assigned(assigned_version)
            if pick is not None:
                return pick
        return self.pick(client_id)


def _pin_changes(new: Mapping[str, str], old: Mapping[str, str]) -> set[str] | None:
    """Clients whose pin differs, or None when so many differ (or the sets are small) that compiling
    afresh is as cheap."""
    if len(new) < PATCH_MIN or abs(len(new) - len(old)) * PATCH_SHARE > len(new):
        return None
    changed = {client for client, _ in new.items() ^ old.items()}
    return changed if len(changed) * PATCH_SHARE <= len(new) else None


def normalize_path(path: str) -> str:
    """The path an upstream will resolve: %-encoded unreserved characters decoded, repeated slashes merged,
    dot-segments removed (RFC 3986 5.2.4). Routes match on this, so `/x/../admin` and `//admin` cannot
    reach a catch-all route's version when the upstream reads them as `/admin`. Paths without '%', '//'
    or '/.' are returned as they are (the common case costs three substring checks)."""
    if "%" not in path and "//" not in path and "/." not in path:
        return path
    if "%" in path:
        path = _PCT_UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != "." and (seg or i == 0):
            out.append(seg)
    last = segments[-1]
    trailing = path.endswith("/") or last in (".", "..")
    result = "/".join(out) or ""
    if not result.startswith("/"):
        result = "/" + result.lstrip("/")
    if trailing and not result.endswith("/"):
        result += "/"
    return result


def cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip('"') or None
    return None


class RouteTable:
    __slots__ = ("_index", "_single", "revision", "routes", "state", "versions")

    def __init__(self, state: State, revision: int = 0, previous: RouteTable | None = None) -> None:
        self.state = state
        self.revision = revision
        self.versions: Mapping[str, Version] = state.versions
        indexed = list(enumerate(state.routes))
        # Most specific first; file order breaks ties.
        indexed.sort(key=lambda ir: (tuple(-x for x in ir[1].match.specificity), ir[0]))
        before: dict[str, CompiledRoute] = {} if previous is None else {r.name: r for r in previous.routes}
        self.routes: tuple[CompiledRoute, ...] = tuple(CompiledRoute(r, before.get(r.name)) for _, r in indexed)
        only = self.routes[0] if len(self.routes) == 1 else None
        self._single = only if only is not None and _matches_everything(only) else None
        # Candidates by host and path, so a match costs the same with 10,000 routes as with one.
        self._index: RouteIndex | None = RouteIndex(self.routes) if len(self.routes) > SCAN_MAX else None

    def __repr__(self) -> str:
        pins = sum(len(r.route.pins) for r in self.routes)
        return (f"<RouteTable revision {self.revision} [Routes: {len(self.routes)} | "
                f"Versions: {len(self.versions)} | Pins: {pins}]>")

    def match(self, host: str, path: str, headers: Mapping[str, str]) -> CompiledRoute | None:
        """`host` is lower-case without port; `path` excludes the query."""
        if self._single is not None:
            return self._single
        index = self._index
        if index is None:
            for r in self.routes:
                if r.matches(host, path, headers):
                    return r
            return None
        routes = self.routes
        for i in index.candidates(host, path):
            # The index answered for host and path exactly: only the headers are left to check.
            r = routes[i]
            if not r.match_headers or r.headers_match(headers):
                return r
        return None

    def match_linear(self, host: str, path: str, headers: Mapping[str, str]) -> CompiledRoute | None:
        """The scan the index stands in for: its specification, kept for the property test."""
        for r in self.routes:
            if r.matches(host, path, headers):
                return r
        return None

    def route(self, name: str) -> CompiledRoute | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None


def _matches_everything(r: CompiledRoute) -> bool:
    return r.host is None and r.host_suffix is None and r.prefix == "/" and not r.match_headers


EMPTY_TABLE = RouteTable(State())


# Shared cross-request state of one proxy process: the current route table, swapped whole.
class TableHolder:
    """Readers take `holder.table` once per request; writers replace it whole, never mutate it."""

    __slots__ = ("table",)

    def __init__(self, table: RouteTable = EMPTY_TABLE) -> None:
        self.table = table

    def __repr__(self) -> str:
        return f"<TableHolder {self.table!r}>"

    def offer(self, table: RouteTable) -> bool:
        """Install `table` unless a newer revision is already installed (watchers and writers race)."""
        if table.revision < self.table.revision:
            return False
        self.table = table
        return True
