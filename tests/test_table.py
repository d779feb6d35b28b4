"""proxy/table.py: which route a request matches (most specific first, then file order), the compiled picks
(pins, sticky, weighted, assignment cookie), pins reused or patched across revisions, and the holder that
never installs an older table."""

from __future__ import annotations

import dataclasses

from proxy.model import IdentitySource, Match, Route, State, Version, VersionSpec
from proxy.table import (
    ASSIGNED,
    EMPTY_TABLE,
    PIN,
    STICKY,
    WEIGHTED,
    CompiledRoute,
    RouteTable,
    TableHolder,
    cookie_value,
    normalize_path,
)


def _versions(*names: str) -> dict[str, Version]:
    return {n: Version(n, VersionSpec("static", (f"http://127.0.0.1:{9100 + i}",)), ()) for i, n in enumerate(names)}


def _route(split: dict[str, float], **kw: object) -> CompiledRoute:
    return CompiledRoute(Route(name="web", identity=(IdentitySource("header", "x-client-id"),),
                               split=tuple(split.items()), **kw))  # type: ignore[arg-type]


def _table(*routes: Route, revision: int = 1) -> RouteTable:
    return RouteTable(State(versions=_versions("v1", "v2"), routes=routes), revision)


def _matched(t: RouteTable, host: str, path: str, headers: dict[str, str] | None = None) -> str | None:
    r = t.match(host, path, headers or {})
    return None if r is None else r.name


def test_route_table_matching_by_specificity_then_order() -> None:
    versions = _versions("v1", "v2")
    state = State(versions=versions, routes=(
        Route("catchall", split=(("v1", 1),)),
        Route("api", match=Match(path_prefix="/api"), split=(("v2", 1),)),
        Route("api-host", match=Match(host="shop.example.com", path_prefix="/api"), split=(("v1", 1),)),
        Route("beta", match=Match(path_prefix="/api", headers=(("x-beta", "1"),)), split=(("v2", 1),)),
        Route("wild", match=Match(host="*.example.com"), split=(("v1", 1),)),
    ))
    t = RouteTable(state, 7)
    def name(host: str, path: str, headers: dict[str, str] | None = None) -> str | None:
        r = t.match(host, path, headers or {})
        return None if r is None else r.name

    assert name("x", "/") == "catchall"
    assert name("x", "/api") == "api"
    assert name("x", "/api/users") == "api"
    assert name("x", "/apix") == "catchall"  # prefixes match whole path segments
    assert name("x", "/api/v", {"x-beta": "1"}) == "beta"
    assert name("shop.example.com", "/api/x", {"x-beta": "1"}) == "api-host"  # host beats headers
    assert name("a.example.com", "/") == "wild"
    assert repr(t) == "<RouteTable revision 7 [Routes: 5 | Versions: 2 | Pins: 0]>"


def test_identity_sources_in_order() -> None:
    r = CompiledRoute(Route("web", identity=(IdentitySource("header", "x-client-id"),
                                             IdentitySource("cookie", "cid"), IdentitySource("query", "client")),
                            split=(("v1", 1),)))
    assert r.client_id({"x-client-id": "h"}, "client=q") == "h"
    assert r.client_id({"cookie": "a=1; cid=c"}, "client=q") == "c"
    assert r.client_id({}, "x=1&client=q") == "q"
    assert r.client_id({"x-client-id": ""}, None) is None
    assert r.pick(None)[0] == WEIGHTED
    assert r.pick("someone")[0] == STICKY


def test_recompiling_after_a_weight_change_reuses_the_compiled_pins() -> None:
    versions = _versions("v1", "v2", "acme")
    route = Route("web", split=(("v1", 90), ("v2", 10)), pins={f"c{i}": "acme" for i in range(1000)},
                  fallback=("v1",))
    t1 = RouteTable(State(versions=versions, routes=(route,)), 1)
    moved = dataclasses.replace(route, split=(("v1", 50), ("v2", 50)))
    t2 = RouteTable(State(versions=versions, routes=(moved,)), 2, previous=t1)
    assert t2.routes[0]._pins is t1.routes[0]._pins
    assert t2.routes[0].pick("c7") == (PIN, ("acme", "v1"))
    repinned = dataclasses.replace(moved, pins={"c7": "v2"})
    t3 = RouteTable(State(versions=versions, routes=(repinned,)), 3, previous=t2)
    assert t3.routes[0]._pins is not t2.routes[0]._pins
    assert t3.routes[0].pick("c7") == (PIN, ("v2", "v1"))
    refallback = dataclasses.replace(moved, fallback=("v2",))
    t4 = RouteTable(State(versions=versions, routes=(refallback,)), 4, previous=t2)
    assert t4.routes[0].pick("c7") == (PIN, ("acme", "v2"))
    # A rollback brings an equal mapping (a different object, read back from the store): reused too; one
    # changed entry among the same number is not.
    equal = dataclasses.replace(moved, pins=dict(route.pins))
    t5 = RouteTable(State(versions=versions, routes=(equal,)), 5, previous=t2)
    assert t5.routes[0]._pins is t2.routes[0]._pins
    one_off = dataclasses.replace(moved, pins={**route.pins, "c999": "v2"})
    t6 = RouteTable(State(versions=versions, routes=(one_off,)), 6, previous=t2)
    assert t6.routes[0]._pins is not t2.routes[0]._pins and t6.routes[0].pick("c999") == (PIN, ("v2", "v1"))


def test_a_pin_change_patches_a_copy_of_the_compiled_pins() -> None:
    versions = _versions("v1", "v2", "acme")
    route = Route("web", split=(("v1", 90), ("v2", 10)), pins={f"c{i}": "acme" for i in range(1000)},
                  fallback=("v1",))
    t1 = RouteTable(State(versions=versions, routes=(route,)), 1)
    pins = {**route.pins, "new": "v2", "c5": "v2"}
    del pins["c9"]
    t2 = RouteTable(State(versions=versions, routes=(dataclasses.replace(route, pins=pins),)), 2, previous=t1)
    old, new = t1.routes[0], t2.routes[0]
    # Unchanged clients keep the very entries compiled before: nothing was recompiled.
    assert new._pins["c1"] is old._pins["c1"]
    assert (new.pick("new"), new.pick("c5"), new.pick("c1")) == (
        (PIN, ("v2", "v1")), (PIN, ("v2", "v1")), (PIN, ("acme", "v1")))
    assert new.pick("c9")[0] == STICKY and len(new._pins) == 1000
    # The previous table is untouched (it may still be serving).
    assert (old.pick("c5"), old.pick("c9"), old.pick("new")[0]) == (
        (PIN, ("acme", "v1")), (PIN, ("acme", "v1")), STICKY)
    # Many changes (more than one in 8): compiled afresh.
    many = {f"c{i}": ("v2" if i < 200 else "acme") for i in range(1000)}
    t3 = RouteTable(State(versions=versions, routes=(dataclasses.replace(route, pins=many),)), 3, previous=t1)
    assert t3.routes[0]._pins["c500"] is not old._pins["c500"] and t3.routes[0].pick("c5") == (PIN, ("v2", "v1"))


def test_normalize_path_resolves_what_an_upstream_would() -> None:
    cases = {
        "/": "/", "/a/b": "/a/b", "/x/../admin/users": "/admin/users", "/./admin/x": "/admin/x",
        "//admin/x": "/admin/x", "/%61dmin/x": "/admin/x", "/a/b/..": "/a/", "/..": "/", "/a//b/": "/a/b/",
        "/%2e%2e/admin": "/admin", "/a%2Fb": "/a%2Fb",  # an encoded slash stays data, not a separator
    }
    assert {p: normalize_path(p) for p in cases} == cases


def test_assignment_cookie_only_for_split_and_fallback_versions_and_pins_win() -> None:
    r = _route({"v1": 0, "v2": 100}, pins={"big": "dedicated"}, fallback=("v0",), assignment_cookie="tv")
    assert r.assigned("v1") == ("assigned", ("v1", "v0"))  # weight 0: a draining version keeps its sessions
    assert r.assigned("v0") == ("assigned", ("v0",))
    assert r.assigned("dedicated") is None  # reachable only through someone else's pin
    assert r.pick_session("big", "v1") == (PIN, ("dedicated", "v0"))
    assert r.pick_session("someone", "v1") == ("assigned", ("v1", "v0"))
    assert r.pick_session("someone", "dedicated")[0] == STICKY


def test_exact_host_beats_wildcard_host_beats_no_host_whatever_the_file_order() -> None:
    t = _table(Route("any", split=(("v1", 1),)), Route("wild", match=Match(host="*.example.com"), split=(("v1", 1),)),
               Route("exact", match=Match(host="shop.example.com"), split=(("v1", 1),)))
    assert [r.name for r in t.routes] == ["exact", "wild", "any"]
    assert _matched(t, "shop.example.com", "/") == "exact"
    assert _matched(t, "www.example.com", "/") == "wild"
    assert _matched(t, "example.org", "/") == "any"


def test_a_longer_prefix_beats_a_shorter_one_and_more_headers_beat_fewer() -> None:
    t = _table(Route("api", match=Match(path_prefix="/api"), split=(("v1", 1),)),
               Route("api-v2", match=Match(path_prefix="/api/v2"), split=(("v1", 1),)),
               Route("beta", match=Match(path_prefix="/api", headers=(("x-beta", "1"),)), split=(("v2", 1),)),
               Route("beta-eu", match=Match(path_prefix="/api", headers=(("x-beta", "1"), ("x-region", "eu"))),
                     split=(("v2", 1),)))
    assert _matched(t, "x", "/api/v2/users", {"x-beta": "1", "x-region": "eu"}) == "api-v2"
    assert _matched(t, "x", "/api/users", {"x-beta": "1", "x-region": "eu"}) == "beta-eu"
    assert _matched(t, "x", "/api/users", {"x-beta": "1"}) == "beta"
    assert _matched(t, "x", "/api/users", {"x-beta": "2"}) == "api"
    assert _matched(t, "x", "/other", {}) is None


def test_equally_specific_routes_match_in_file_order() -> None:
    first = Route("first", match=Match(path_prefix="/a"), split=(("v1", 1),))
    second = Route("second", match=Match(path_prefix="/b"), split=(("v2", 1),))
    twin = Route("twin", match=Match(path_prefix="/a"), split=(("v2", 1),))
    assert [r.name for r in _table(first, second, twin).routes] == ["first", "second", "twin"]
    assert [r.name for r in _table(twin, second, first).routes] == ["twin", "second", "first"]
    assert _matched(_table(first, twin), "x", "/a") == "first"
    assert _matched(_table(twin, first), "x", "/a") == "twin"


def test_a_single_catch_all_route_matches_every_request() -> None:
    t = _table(Route("all", split=(("v1", 1),)))
    assert _matched(t, "anything", "/deep/path", {"x": "y"}) == "all"
    assert _matched(_table(Route("api", match=Match(path_prefix="/api"), split=(("v1", 1),))), "x", "/") is None


def test_pins_compile_to_the_pinned_version_and_its_fallback_chain() -> None:
    r = _route({"v1": 100}, pins={"acme": "v2"}, fallback=("v1",))
    assert r.pick("acme") == (PIN, ("v2", "v1"))
    assert r.pinned("acme") is True
    assert r.pinned("someone") is False
    assert r.pinned(None) is False
    assert r.pick("someone") == (STICKY, ("v1",))
    assert r.pick(None) == (WEIGHTED, ("v1",))
    assert r.assigned("v1") == (ASSIGNED, ("v1",))


def test_cookie_value_reads_one_cookie() -> None:
    assert cookie_value('a=1; cid="c7"; b=2', "cid") == "c7"
    assert cookie_value("a=1; cid=", "cid") is None
    assert cookie_value("cidx=1", "cid") is None
    assert cookie_value(None, "cid") is None


def test_holder_refuses_an_older_revision_and_accepts_the_same_or_newer() -> None:
    holder = TableHolder()
    assert holder.table is EMPTY_TABLE
    t5, t4, t5b, t6 = (_table(Route("web", split=(("v1", 1),)), revision=n) for n in (5, 4, 5, 6))
    assert holder.offer(t5) is True
    assert holder.offer(t4) is False
    assert holder.table is t5
    assert holder.offer(t5b) is True
    assert holder.table is t5b
    assert holder.offer(t6) is True
    assert holder.table is t6


def test_reprs_name_the_revision_and_the_counts() -> None:
    t = RouteTable(State(versions=_versions("v1", "v2"), routes=(
        Route("web", match=Match(path_prefix="/app"), split=(("v1", 90), ("v2", 10)), pins={"a": "v2", "b": "v1"}),
    )), 3)
    assert repr(t) == "<RouteTable revision 3 [Routes: 1 | Versions: 2 | Pins: 2]>"
    assert repr(t.routes[0]) == "<CompiledRoute web [/app] split: v1=90 v2=10 | pins: 2 | sticky: on>"
    assert repr(TableHolder(t)) == "<TableHolder <RouteTable revision 3 [Routes: 1 | Versions: 2 | Pins: 2]>>"
    assert repr(TableHolder()) == "<TableHolder <RouteTable revision 0 [Routes: 0 | Versions: 0 | Pins: 0]>>"
