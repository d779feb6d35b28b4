"""What the request path derives from one route table, built once per table instead of once per request.

Design rule: a request's headers are never turned into a full lower-cased dict. Routes and identities name
the few headers they read; those names join the header-kind table the parser consults anyway, so their
values are captured in the one lookup every header already costs. Picks that depend only on the client id
(pins, sticky buckets) are remembered per route, so a returning client skips the BLAKE2b hash.
"""

from __future__ import annotations

from typing import Final

from proxy.dataplane.headers import REQUEST_HEADER_KIND
from proxy.table import PIN, STICKY, CompiledRoute, MatchEntry, Pick, RouteTable

# Header kind of a header some route or identity reads (forwarded as usual, and captured).
WANTED: Final = 100
# Remembered picks per route; the cache starts over when full (client ids are client-controlled).
PICK_CACHE: Final = 20_000
# Reasons whose pick is a pure function of (route, client id).
_STABLE: Final = frozenset({PIN, STICKY})


class Plan:
    __slots__ = ("exact", "kinds", "picks", "single", "table")

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        wanted: set[str] = set()
        for e in table.entries:
            wanted.update(name for name, _ in e.headers)
            wanted.update(name for name, _ in e.header_res)
        for r in table.routes:
            for kind, name in r.identity:
                if kind == "header" or kind == "jwt" or kind == "api_key":
                    wanted.add(name)  # a jwt in a cookie has name "cookie"
                elif kind == "cookie":
                    wanted.add("cookie")
            if r.assignment_cookie is not None:
                wanted.add("cookie")
        kinds = dict(REQUEST_HEADER_KIND)
        exact = True
        for name in wanted:
            key = name.encode("latin-1", "replace")
            # A route reading a header the proxy itself handles (Host, X-Forwarded-*) sees it the way
            # LazyHeaders presents the forwarded lines: such tables take the general path.
            if key in kinds:
                exact = False
            kinds[key] = WANTED
        # True: the captured values are exactly what a LazyHeaders over the forwarded lines would give.
        self.exact = exact
        self.kinds: dict[bytes, int] = kinds if exact else REQUEST_HEADER_KIND
        # The one entry of a table whose only route matches every request (its route is `.route`).
        only = table.entries[0] if len(table.entries) == 1 else None
        self.single: MatchEntry | None = only if only is not None and _matches_everything(only) else None
        self.picks: dict[str, dict[str, Pick]] = {r.name: {} for r in table.routes}

    def __repr__(self) -> str:
        return (f"<Plan revision {self.table.revision} [{'exact' if self.exact else 'general'} headers | "
                f"single: {self.single.route.name if self.single else '-'}]>")

    def pick(self, route: CompiledRoute, client_id: str | None) -> Pick:
        if client_id is None:
            return route.pick(None)
        cache = self.picks.get(route.name)
        if cache is None:
            return route.pick(client_id)
        pick = cache.get(client_id)
        if pick is None:
            pick = route.pick(client_id)
            if pick[0] in _STABLE:
                if len(cache) >= PICK_CACHE:
                    cache.clear()
                cache[client_id] = pick
        return pick


def _matches_everything(e: MatchEntry) -> bool:
    return e.host is None and e.host_suffix is None and e.path == "/" and not e.headers and not e.extra
