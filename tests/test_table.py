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


# -- matches across routes (issue 14): HTTPRoute's precedence, per match

def _entry(t: RouteTable, host: str, path: str, headers: dict[str, str] | None = None, method: str = "GET",
           query: str | None = None) -> tuple[str, int] | None:
    e = t.lookup(host, path, headers or {}, method, query)
    return None if e is None else (e.route.name, e.order)


def test_precedence_exact_path_then_longest_prefix_then_method_headers_query_then_order() -> None:
    t = _table(
        Route("prefix-long", match=Match(path_prefix="/shop/cart"), split=(("v1", 1),)),
        Route("multi", match=Match(path_prefix="/shop", query=(("debug", "1"),)),
              more_matches=(Match(path_prefix="/shop", path_type="Exact"),
                            Match(path_prefix="/shop", method="POST"),
                            Match(path_prefix="/shop", headers=(("x-a", "1"),))), split=(("v1", 1),)),
        Route("plain", match=Match(path_prefix="/shop"), split=(("v2", 1),)),
        Route("headers2", match=Match(path_prefix="/shop", headers=(("x-a", "1"),), header_regex=(("x-b", "[0-9]+"),)),
              split=(("v2", 1),)),
    )
    assert _entry(t, "h", "/shop") == ("multi", 1)  # Exact beats every prefix
    assert _entry(t, "h", "/shop/cart/1", method="POST") == ("prefix-long", 0)  # longer prefix beats a method
    assert _entry(t, "h", "/shop/x", {"x-a": "1", "x-b": "7"}, method="POST") == ("multi", 2)  # method beats headers
    assert _entry(t, "h", "/shop/x", {"x-a": "1", "x-b": "7"}) == ("headers2", 0)  # two headers beat one
    assert _entry(t, "h", "/shop/x", {"x-a": "1"}, query="debug=1") == ("multi", 3)  # a header beats a query
    assert _entry(t, "h", "/shop/x", query="debug=1") == ("multi", 0)
    assert _entry(t, "h", "/shop/x") == ("plain", 0)
    assert [e.route.name for e in t.entries] == ["multi", "prefix-long", "multi", "headers2", "multi", "multi", "plain"]


def test_hosts_rank_before_paths_and_a_longer_wildcard_first() -> None:
    t = _table(
        Route("any-exact", match=Match(path_prefix="/x", path_type="Exact"), split=(("v1", 1),)),
        Route("wild", match=Match(host="*.example.com"), split=(("v1", 1),)),
        Route("wild-long", match=Match(host="*.a.example.com"), split=(("v1", 1),)),
        Route("exact-host", match=Match(host="shop.a.example.com"), split=(("v1", 1),)),
    )
    assert _entry(t, "shop.a.example.com", "/x") == ("exact-host", 0)
    assert _entry(t, "b.a.example.com", "/x") == ("wild-long", 0)
    assert _entry(t, "b.example.com", "/x") == ("wild", 0)
    assert _entry(t, "other", "/x") == ("any-exact", 0)


def test_regex_paths_rank_after_exact_and_before_prefixes() -> None:
    t = _table(
        Route("prefix", match=Match(path_prefix="/v1/items"), split=(("v1", 1),)),
        Route("regex", match=Match(path_prefix="/v[0-9]+/.*", path_type="RegularExpression"), split=(("v1", 1),)),
        Route("exact", match=Match(path_prefix="/v1/items/7", path_type="Exact"), split=(("v1", 1),)),
    )
    assert _entry(t, "h", "/v1/items/7") == ("exact", 0)
    assert _entry(t, "h", "/v1/items/8") == ("regex", 0)
    assert _entry(t, "h", "/v1/items") == ("regex", 0)
    assert _entry(t, "h", "/vx/items") is None


def test_a_trailing_slash_of_a_path_prefix_is_ignored() -> None:
    # HTTPRoute: PathPrefix "/api/" matches "/api", "/api/" and "/api/x" (earlier, "/api" did not match).
    t = _table(Route("api", match=Match(path_prefix="/api/"), split=(("v1", 1),)))
    got = [_entry(t, "h", p) for p in ("/api", "/api/", "/api/x", "/apix")]
    assert got == [("api", 0), ("api", 0), ("api", 0), None]


def test_query_matches_take_the_first_of_repeated_parameters() -> None:
    t = _table(Route("q", match=Match(query=(("a", "1"),), query_regex=(("b", "x+"),)), split=(("v1", 1),)))
    assert _entry(t, "h", "/", query="a=1&b=xx") == ("q", 0)
    assert _entry(t, "h", "/", query="a=2&a=1&b=xx") is None
    assert _entry(t, "h", "/", query="a=1&b=xy") is None
    assert _entry(t, "h", "/", query=None) is None


def test_route_index_interface_of_match_entries() -> None:
    from proxy.table import PATH_EXACT, PATH_PREFIX, PATH_REGEX

    t = _table(Route("a", match=Match(host="*.example.com", path_prefix="/p"),
                     more_matches=(Match(host="h", path_prefix="/e", path_type="Exact"),
                                   Match(path_prefix="/r.*", path_type="RegularExpression")), split=(("v1", 1),)))
    got = [(e.host, e.host_suffix, e.path_kind, e.path) for e in t.entries]  # in precedence order
    assert got == [("h", None, PATH_EXACT, "/e"), (None, ".example.com", PATH_PREFIX, "/p"),
                   (None, None, PATH_REGEX, "/r.*")]


# A reference of HTTPRoute's precedence, written as the spec states it (a comparison, rule by rule), to check
# the table's one sort key against.

def _ref_accepts(m: Match, host: str, path: str, headers: dict[str, str], method: str,
                 query: dict[str, str]) -> bool:
    import re

    if m.host is not None:
        if m.host.startswith("*."):
            if not host.endswith(m.host[1:]):
                return False
        elif host != m.host:
            return False
    if m.path_type == "Exact":
        if path != m.path_prefix:
            return False
    elif m.path_type == "RegularExpression":
        if re.fullmatch(m.path_prefix, path) is None:
            return False
    else:
        p = m.path_prefix.rstrip("/")
        if not (p == "" or path == p or path.startswith(p + "/")):
            return False
    if m.method is not None and m.method != method:
        return False
    if any(headers.get(n) != v for n, v in m.headers):
        return False
    if any(headers.get(n) is None or re.fullmatch(p, headers[n]) is None for n, p in m.header_regex):
        return False
    if any(query.get(n) != v for n, v in m.query):
        return False
    return all(query.get(n) is not None and re.fullmatch(p, query[n]) is not None for n, p in m.query_regex)


def _ref_better(a: tuple[int, int, Match], b: tuple[int, int, Match]) -> bool:
    """a wins over b."""
    ma, mb = a[2], b[2]

    def host_rank(m: Match) -> tuple[int, int]:
        if m.host is None:
            return (0, 0)
        return (1, len(m.host)) if m.host.startswith("*.") else (2, len(m.host))

    def path_rank(m: Match) -> tuple[int, int]:
        return ({"Exact": 2, "RegularExpression": 1, "PathPrefix": 0}[m.path_type], len(m.path_prefix))

    for ka, kb in ((host_rank(ma), host_rank(mb)), (path_rank(ma), path_rank(mb)),
                   (ma.method is not None, mb.method is not None),
                   (len(ma.headers) + len(ma.header_regex), len(mb.headers) + len(mb.header_regex)),
                   (len(ma.query) + len(ma.query_regex), len(mb.query) + len(mb.query_regex))):
        if ka != kb:
            return ka > kb
    return (a[0], a[1]) < (b[0], b[1])


def test_precedence_equals_a_reference_implementation() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from proxy.table import query_params

    match_st = st.builds(
        Match,
        host=st.sampled_from([None, "a.example.com", "*.example.com", "*.a.example.com"]),
        path_prefix=st.sampled_from(["/", "/a", "/a/", "/a/b", "/ab"]),
        path_type=st.sampled_from(["PathPrefix", "Exact"]),
        method=st.sampled_from([None, "GET", "POST"]),
        headers=st.sampled_from([(), (("x-a", "1"),), (("x-a", "1"), ("x-b", "2"))]),
        header_regex=st.sampled_from([(), (("x-c", "[0-9]"),)]),
        query=st.sampled_from([(), (("q", "1"),)]),
    ) | st.builds(Match, path_prefix=st.sampled_from(["/a.*", "/[ab]+", ".*"]),
                  path_type=st.just("RegularExpression"), method=st.sampled_from([None, "GET"]))
    routes_st = st.lists(st.lists(match_st, min_size=1, max_size=3), min_size=1, max_size=5)
    request_st = st.tuples(
        st.sampled_from(["a.example.com", "b.example.com", "x.a.example.com", "other"]),
        st.sampled_from(["/", "/a", "/a/b", "/ab", "/a/b/c", "/b"]),
        st.fixed_dictionaries({}, optional={"x-a": st.sampled_from(["1", "2"]), "x-b": st.just("2"),
                                            "x-c": st.sampled_from(["5", "x"])}),
        st.sampled_from(["GET", "POST"]),
        st.sampled_from([None, "q=1", "q=2"]),
    )

    @settings(max_examples=300, deadline=None)
    @given(routes_st, st.lists(request_st, min_size=1, max_size=8))
    def check(route_matches: list[list[Match]],
              requests: list[tuple[str, str, dict[str, str], str, str | None]]) -> None:
        routes = [Route(f"r{i}", match=ms[0], more_matches=tuple(ms[1:]), split=(("v1", 1),))
                  for i, ms in enumerate(route_matches)]
        t = _table(*routes)
        for host, path, headers, method, query in requests:
            params = query_params(query)
            best: tuple[int, int, Match] | None = None
            for ri, ms in enumerate(route_matches):
                for mi, m in enumerate(ms):
                    if _ref_accepts(m, host, path, headers, method, params) and (
                            best is None or _ref_better((ri, mi, m), best)):
                        best = (ri, mi, m)
            expected = None if best is None else (f"r{best[0]}", best[1])
            assert _entry(t, host, path, headers, method, query) == expected

    check()
