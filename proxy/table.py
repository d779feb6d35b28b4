"""The compiled route table: built once per state revision, read once per request, swapped whole.

Design rule: everything a request needs is precomputed here, so the request path does a handful of dict
lookups and no allocation beyond what it must: pins map a client straight to a ready (reason, chain)
pair, sticky routes bisect precomputed bucket bounds, and per-request picks walk a precomputed cycle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

import re2

from proxy.actions import RouteActions, has_actions
from proxy.model import Match, Route, State, Version
from proxy.route_index import PATH_EXACT, PATH_PREFIX, PATH_REGEX, RouteIndex
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

# MatchEntry.path_kind: proxy.route_index's PATH_PREFIX, PATH_EXACT, PATH_REGEX.
_PATH_KINDS: Final = {"PathPrefix": PATH_PREFIX, "Exact": PATH_EXACT, "RegularExpression": PATH_REGEX}
# Where a path kind ranks (lower first): Exact, then RegularExpression, then PathPrefix (see precedence).
_PATH_RANK: Final = {PATH_EXACT: 0, PATH_REGEX: 1, PATH_PREFIX: 2}
_RE2_OPTIONS: Final[Any] = re2.Options()
_RE2_OPTIONS.log_errors = False

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
        "_sticky_picks", "_weighted_picks", "actions", "assignment_cookie", "chains", "challenge", "entries",
        "expose_version", "header_ids", "host", "host_suffix", "identity", "match_headers", "mirrored", "name",
        "pins_verified", "prefix", "prefix_dir", "require_identity", "route", "sources", "split_names", "verifying",
        "zone_affinity",
    )

    def __init__(self, route: Route, previous: CompiledRoute | None = None) -> None:
        self.route = route
        self.name = route.name
        self.expose_version = route.expose_version
        self.assignment_cookie = route.assignment_cookie
        # Read per request: an attribute of the (uncompiled) model.Route costs a generic getattr from compiled code.
        self.mirrored = bool(route.mirrors)
        self.zone_affinity = route.zone_affinity
        m = route.match
        self.host = None if m.host is None or m.host.startswith("*.") else m.host
        self.host_suffix = m.host[1:] if m.host and m.host.startswith("*.") else None
        self.prefix = m.path_prefix
        self.prefix_dir = m.path_prefix if m.path_prefix.endswith("/") else m.path_prefix + "/"
        self.match_headers = m.headers
        # One entry per match (ORed), in the route's order; RouteTable sorts all routes' entries together.
        self.entries = tuple(MatchEntry(self, mm, i) for i, mm in enumerate(route.matches))
        # Filters, timeouts, retry: None for a route that uses none (the request path tests this once).
        self.actions: RouteActions | None = RouteActions(route) if has_actions(route) else None
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
        if not self._cycle:
            # No weight (all 0, or a redirect's missing split): the pick names no version (dispatch: 500).
            self._cycle = [(WEIGHTED, ("",))]
        self._next = 0
        self.split_names: tuple[str, ...] = tuple(names)
        self._shares = quantise(weights)
        self._spread_current = [0] * len(names)

    def __repr__(self) -> str:
        split = " ".join(f"{v}={w:g}" for v, w in self.route.split)
        return (f"<CompiledRoute {self.name} [{self.prefix}] split: {split} | pins: {len(self._pins)}"
                f" | sticky: {'on' if self.route.sticky else 'off'}>")

    def matches(self, host: str, path: str, headers: Mapping[str, str], method: str = "GET",
                query: str | None = None) -> bool:
        """Any of the route's matches accepts the request."""
        for e in self.entries:
            if e.accepts(host, path, headers, method, query):
                return True
        return False

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


class MatchEntry:
    """One match of one route, compiled: what RouteTable scans (and proxy.route_index indexes) in
    precedence order. `host`, `host_suffix`, `path_kind` and `path` are the index's interface."""

    __slots__ = ("exact", "extra", "header_res", "headers", "host", "host_suffix", "match", "method", "order",
                 "path", "path_kind", "prefix_dir", "query", "query_res", "regex", "route")

    def __init__(self, route: CompiledRoute, m: Match, order: int) -> None:
        self.route = route
        self.match = m
        self.order = order  # position among the route's matches
        self.host = None if m.host is None or m.host.startswith("*.") else m.host
        self.host_suffix = m.host[1:] if m.host and m.host.startswith("*.") else None
        self.path_kind: int = _PATH_KINDS[m.path_type]
        # HTTPRoute's PathPrefix ignores a trailing "/": "/api/" matches "/api", "/api/" and "/api/x".
        self.path = (m.path_prefix.rstrip("/") or "/") if self.path_kind == PATH_PREFIX else m.path_prefix
        self.prefix_dir = self.path if self.path.endswith("/") else self.path + "/"
        self.exact = self.path_kind == PATH_EXACT
        self.regex: Any = re2.compile(m.path_prefix, options=_RE2_OPTIONS) if self.path_kind == PATH_REGEX else None
        self.headers = m.headers
        self.method = m.method
        self.header_res: tuple[tuple[str, Any], ...] = tuple(
            (n, re2.compile(p, options=_RE2_OPTIONS)) for n, p in m.header_regex)
        self.query = m.query
        self.query_res: tuple[tuple[str, Any], ...] = tuple(
            (n, re2.compile(p, options=_RE2_OPTIONS)) for n, p in m.query_regex)
        # Anything beyond host, prefix and exact headers: the plain case pays one test for all of it.
        self.extra = not m.plain

    def __repr__(self) -> str:
        return f"<MatchEntry {self.route.name}[{self.order}] {self.match.path_type} {self.path}>"

    def accepts(self, host: str, path: str, headers: Mapping[str, str], method: str = "GET",
                query: str | None = None) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if not self.extra:
            if self.path != "/" and path != self.path and not path.startswith(self.prefix_dir):
                return False
            for name, value in self.headers:
                if headers.get(name) != value:
                    return False
            return True
        kind = self.path_kind
        if kind == PATH_PREFIX:
            if self.path != "/" and path != self.path and not path.startswith(self.prefix_dir):
                return False
        elif kind == PATH_EXACT:
            if path != self.path:
                return False
        elif self.regex.fullmatch(path) is None:
            return False
        if self.method is not None and method != self.method:
            return False
        for name, value in self.headers:
            if headers.get(name) != value:
                return False
        for name, rx in self.header_res:
            v = headers.get(name)
            if v is None or rx.fullmatch(v) is None:
                return False
        if self.query or self.query_res:
            params = query_params(query)
            for name, value in self.query:
                if params.get(name) != value:
                    return False
            for name, rx in self.query_res:
                qv = params.get(name)
                if qv is None or rx.fullmatch(qv) is None:
                    return False
        return True


def query_params(query: str | None) -> dict[str, str]:
    """First value of each query parameter (HTTPRoute: only the first of repeated names counts)."""
    out: dict[str, str] = {}
    if query:
        for k, v in parse_qsl(query, keep_blank_values=True):
            if k not in out:
                out[k] = v
    return out


def precedence(m: Match) -> tuple[int, int, int, int, int, int, int]:
    """Sort key of a match (lower first), HTTPRoute's order: the most specific host (exact, then the longer
    wildcard, then any host), then the path (Exact, then RegularExpression by pattern length, then the
    longest PathPrefix), then a method match, then the most header matches, then the most query matches.
    Ties go to the earlier route, then the route's earlier match (the caller adds both)."""
    if m.host is None:
        host_rank, host_len = 2, 0
    elif m.host.startswith("*."):
        host_rank, host_len = 1, len(m.host)
    else:
        host_rank, host_len = 0, len(m.host)
    kind = _PATH_KINDS[m.path_type]
    return (host_rank, -host_len, _PATH_RANK[kind], -len(m.path_prefix), 0 if m.method is not None else 1,
            -(len(m.headers) + len(m.header_regex)), -(len(m.query) + len(m.query_regex)))


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
    __slots__ = ("_index", "_single", "entries", "revision", "routes", "state", "versions")

    def __init__(self, state: State, revision: int = 0, previous: RouteTable | None = None) -> None:
        self.state = state
        self.revision = revision
        self.versions: Mapping[str, Version] = state.versions
        indexed = list(enumerate(state.routes))
        # Routes by their best match (most specific first; file order breaks ties): what `routes` lists.
        indexed.sort(key=lambda ir: (min(precedence(m) for m in ir[1].matches), ir[0]))
        before: dict[str, CompiledRoute] = {} if previous is None else {r.name: r for r in previous.routes}
        self.routes: tuple[CompiledRoute, ...] = tuple(CompiledRoute(r, before.get(r.name)) for _, r in indexed)
        # Every route's matches together, in precedence order: the first that accepts a request wins.
        position = {r.name: i for i, r in enumerate(state.routes)}
        self.entries: tuple[MatchEntry, ...] = tuple(sorted(
            (e for r in self.routes for e in r.entries),
            key=lambda e: (precedence(e.match), position[e.route.name], e.order)))
        only = self.entries[0] if len(self.entries) == 1 else None
        self._single = only if only is not None and _matches_everything(only) else None
        # Candidates by host and path, so a match costs the same with 10,000 routes as with one.
        self._index: RouteIndex | None = RouteIndex(self.entries) if len(self.entries) > SCAN_MAX else None

    def __repr__(self) -> str:
        pins = sum(len(r.route.pins) for r in self.routes)
        return (f"<RouteTable revision {self.revision} [Routes: {len(self.routes)} | "
                f"Versions: {len(self.versions)} | Pins: {pins}]>")

    def match(self, host: str, path: str, headers: Mapping[str, str], method: str = "GET",
              query: str | None = None) -> CompiledRoute | None:
        """`host` is lower-case without port; `path` excludes the query."""
        e = self.lookup(host, path, headers, method, query)
        return e.route if e is not None else None

    def lookup(self, host: str, path: str, headers: Mapping[str, str], method: str = "GET",
               query: str | None = None) -> MatchEntry | None:
        """The match entry that accepts the request first (its route is `.route`), or None."""
        if self._single is not None:
            return self._single
        index = self._index
        if index is None:
            for e in self.entries:
                if e.accepts(host, path, headers, method, query):
                    return e
            return None
        entries = self.entries
        for i in index.candidates(host, path):
            e = entries[i]
            if e.accepts(host, path, headers, method, query):
                return e
        return None

    def match_linear(self, host: str, path: str, headers: Mapping[str, str], method: str = "GET",
                     query: str | None = None) -> CompiledRoute | None:
        """The scan the index stands in for: its specification, kept for the property test."""
        for e in self.entries:
            if e.accepts(host, path, headers, method, query):
                return e.route
        return None

    def route(self, name: str) -> CompiledRoute | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None


def _matches_everything(e: MatchEntry) -> bool:
    return e.host is None and e.host_suffix is None and e.path == "/" and not e.headers and not e.extra


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
