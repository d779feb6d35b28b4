"""proxy/route_index.py: the index answers exactly what the linear scan over the match entries answers
(random exact hosts, wildcards, prefixes, exact paths, regex entries, header conditions), through
RouteTable.match and on bare entries."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.model import Match, Route, State, Version, VersionSpec
from proxy.route_index import PATH_EXACT, PATH_PREFIX, PATH_REGEX, RouteIndex
from proxy.table import SCAN_MAX, RouteTable

LABELS = st.sampled_from(["a", "b", "com", "x-y"])
HOSTS = st.lists(LABELS, min_size=1, max_size=3).map(".".join)
SEGMENTS = st.sampled_from(["a", "ab", "", "x.y"])
PATHS = st.lists(SEGMENTS, min_size=0, max_size=3).map(lambda s: "/" + "/".join(s))
# Request paths may also be odd: empty, "*", without the leading slash.
REQUEST_PATHS = st.one_of(PATHS, st.sampled_from(["", "*", "a", "/a/", "//"]),
                          st.tuples(PATHS, st.sampled_from(["b", "/", "/b", "b/"])).map("".join))
PREFIXES = st.one_of(PATHS, PATHS.map(lambda p: p.rstrip("/") + "/"))
HEADER_SETS = st.lists(st.tuples(st.sampled_from(["x-env", "x-b"]), st.sampled_from(["1", "2"])),
                       max_size=2, unique_by=lambda hv: hv[0]).map(tuple)


def _host_pattern() -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), HOSTS, HOSTS.map(lambda h: "*." + h))


@st.composite
def states(draw: st.DrawFn) -> State:
    n = draw(st.integers(min_value=1, max_value=2 * SCAN_MAX))
    routes = tuple(Route(f"r{i}", match=Match(host=draw(_host_pattern()), path_prefix=draw(PREFIXES),
                                              headers=draw(HEADER_SETS)), split=(("v1", 1),))
                   for i in range(n))
    return State(versions={"v1": Version("v1", VersionSpec("static", ("http://127.0.0.1:9100",)), ())},
                 routes=routes)


def _name(r: object) -> str | None:
    return None if r is None else getattr(r, "name", None)


@settings(max_examples=150, deadline=None)
@given(states(), st.data())
def test_table_match_equals_the_linear_scan(state: State, data: st.DataObject) -> None:
    t = RouteTable(state, 1)
    requests = data.draw(st.lists(st.tuples(HOSTS, REQUEST_PATHS, HEADER_SETS), min_size=1, max_size=4))
    near = [Entry(r.match.host if r.match.host and not r.match.host.startswith("*.") else None,
                  r.match.host[1:] if r.match.host and r.match.host.startswith("*.") else None,
                  PATH_PREFIX, r.match.path_prefix) for r in state.routes]
    requests += [(*hp, h) for hp, h in data.draw(st.lists(st.tuples(
        st.builds(_near, st.sampled_from(near), LABELS, TAILS), HEADER_SETS), min_size=1, max_size=6))]
    for host, path, headers in requests:
        h = dict(headers)
        assert _name(t.match(host, path, h)) == _name(t.match_linear(host, path, h))


@dataclass(frozen=True)
class Entry:
    host: str | None
    host_suffix: str | None
    path_kind: int
    path: str
    regex: str | None = None

    def accepts(self, host: str, path: str) -> bool:
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if self.path_kind == PATH_EXACT:
            return path == self.path
        if self.path_kind == PATH_REGEX:
            return True  # the index hands regex entries to the table's own predicate
        if self.path == "/":
            return True
        return path == self.path or path.startswith(self.path if self.path.endswith("/") else self.path + "/")


@st.composite
def entries(draw: st.DrawFn) -> list[Entry]:
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=15))):
        pattern = draw(_host_pattern())
        host = pattern if pattern is not None and not pattern.startswith("*.") else None
        suffix = pattern[1:] if pattern is not None and pattern.startswith("*.") else None
        kind = draw(st.sampled_from([PATH_PREFIX, PATH_EXACT, PATH_REGEX]))
        out.append(Entry(host, suffix, kind, draw(PREFIXES if kind == PATH_PREFIX else PATHS)))
    return out


def _near(e: Entry, label: str, tail: str) -> tuple[str, str]:
    """A request close to entry `e`: its host (or one under its suffix), its path with `tail` appended."""
    host = e.host if e.host is not None else (label + e.host_suffix if e.host_suffix is not None else label)
    return host, e.path + tail


TAILS = st.sampled_from(["", "b", "/", "/b", "b/", "/a/b"])


@settings(max_examples=300, deadline=None)
@given(entries(), st.data())
def test_candidates_are_exactly_the_accepting_entries_in_order(es: list[Entry], data: st.DataObject) -> None:
    index = RouteIndex(es)
    requests = data.draw(st.lists(st.tuples(HOSTS, REQUEST_PATHS), min_size=1, max_size=4))
    if es:
        # Most random requests miss every entry: also aim at the entries' own hosts and path boundaries.
        requests += data.draw(st.lists(st.builds(_near, st.sampled_from(es), LABELS, TAILS), min_size=1,
                                       max_size=6))
    for host, path in requests:
        assert list(index.candidates(host, path)) == [i for i, e in enumerate(es) if e.accepts(host, path)]


def test_regex_entries_are_candidates_for_every_path_of_their_host_and_the_table_decides() -> None:
    es = [Entry("shop.example.com", None, PATH_REGEX, "", r"^/item/[0-9]+$"),
          Entry(None, ".example.com", PATH_EXACT, "/item/7"),
          Entry(None, None, PATH_PREFIX, "/")]
    index = RouteIndex(es)
    assert list(index.candidates("shop.example.com", "/item/7")) == [0, 1, 2]
    assert list(index.candidates("shop.example.com", "/other")) == [0, 2]
    assert list(index.candidates("a.example.com", "/item/7")) == [1, 2]
    assert list(index.candidates("example.com", "/item/7")) == [2]
    # The table's own predicate runs the regex: /item/x fails it, so the catch-all is the first to accept.
    accepted = [i for i in index.candidates("shop.example.com", "/item/x")
                if es[i].regex is None or re.search(es[i].regex or "", "/item/x")]
    assert accepted == [2]


def test_two_thousand_routes_match_the_last_one_by_host_and_prefix() -> None:
    v = {"v1": Version("v1", VersionSpec("static", ("http://127.0.0.1:9100",)), ())}
    routes = tuple(Route(f"r{i}", match=Match(host=f"h{i}.bench", path_prefix=f"/p{i}"), split=(("v1", 1),))
                   for i in range(2_000))
    t = RouteTable(State(versions=v, routes=routes), 1)
    assert _name(t.match("h1999.bench", "/p1999/x", {})) == "r1999"
    assert t.match("h1999.bench", "/p199", {}) is None
    assert t.match("h1999.bench", "/p19999", {}) is None


def test_an_unknown_path_kind_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^path_kind: expected 0, 1 or 2, got 7$"):
        RouteIndex([Entry(None, None, 7, "/")])
