"""proxy.revdiff: what changed between two states, per route and per version, as data, JSON and text."""

from __future__ import annotations

import dataclasses
import re

from proxy.model import Match, Mirror, Route, State, Version, VersionSpec
from proxy.revdiff import PIN_EXAMPLES, diff_states, diff_to_json, render_diff


def static(name: str, port: int) -> Version:
    ep = f"http://127.0.0.1:{port}"
    return Version(name, VersionSpec("static", endpoints=(ep,)), (ep,))


V1, V2, V3 = static("v1", 9001), static("v2", 9002), static("v3", 9003)
BASE = State(versions={"v1": V1, "v2": V2},
             routes=(Route("web", split=(("v1", 100.0),), pins={"a": "v1", "b": "v1"}, fallback=("v1",)),))


def test_equal_states_have_no_diff() -> None:
    d = diff_states(BASE, dataclasses.replace(BASE))
    assert (d.changed, d.routes, d.versions) == (False, (), ())
    assert diff_to_json(d) == {"changed": False, "routes": [], "versions": []}
    assert render_diff(d) == "no differences"


def test_weights_pins_and_fields_of_a_changed_route() -> None:
    web = BASE.routes[0]
    after = dataclasses.replace(
        BASE, routes=(dataclasses.replace(
            web, split=(("v1", 95.0), ("v2", 5.0)), pins={"a": "v2", "c": "v2"}, fallback=("v1", "v2"),
            mirrors=(Mirror("v2", 10.0),), sticky=False, match=Match(host="shop.example.com")),))
    j = diff_to_json(diff_states(BASE, after))
    assert j["versions"] == []
    [r] = j["routes"]
    assert (r["route"], r["change"]) == ("web", "changed")
    assert r["split"] == {"before": {"v1": 100.0}, "after": {"v1": 95.0, "v2": 5.0},
                          "changes": [{"version": "v1", "before": 100.0, "after": 95.0},
                                      {"version": "v2", "before": None, "after": 5.0}]}
    assert r["pins"] == {"before": 2, "after": 2, "added": 1, "removed": 1, "changed": 1, "examples": {
        "added": [{"client": "c", "version": "v2"}], "removed": [{"client": "b", "version": "v1"}],
        "changed": [{"client": "a", "before": "v1", "after": "v2"}]}}
    assert r["fields"] == {
        "match": {"before": {"path_prefix": "/"}, "after": {"path_prefix": "/", "host": "shop.example.com"}},
        "sticky": {"before": True, "after": False},
        "fallback": {"before": ["v1"], "after": ["v1", "v2"]},
        "mirror": {"before": None, "after": {"version": "v2", "percent": 10.0}},
    }
    assert render_diff(diff_states(BASE, after)).splitlines() == [
        "ROUTE  WHAT       BEFORE               AFTER",
        "web    weight v1  100                  95",
        "web    weight v2  -                    5",
        "web    pins       2                    2 (+1 -1 ~1)",
        "web      pin c    -                    v2",
        "web      pin b    v1                   -",
        "web      pin a    v1                   v2",
        'web    match      {"path_prefix":"/"}  {"host":"shop.example.com","path_prefix":"/"}',
        "web    sticky     true                 false",
        'web    fallback   ["v1"]               ["v1","v2"]',
        'web    mirror     -                    {"percent":10.0,"version":"v2"}',
    ]


def test_a_split_change_alone_shares_the_pins_mapping_and_reports_no_pins() -> None:
    web = BASE.routes[0]
    after = dataclasses.replace(BASE, routes=(dataclasses.replace(web, split=(("v1", 50.0), ("v2", 50.0))),))
    [r] = diff_to_json(diff_states(BASE, after))["routes"]
    assert (r["pins"], r["fields"]) == (None, {})


def test_many_pins_are_counted_with_a_few_examples() -> None:
    web = BASE.routes[0]
    many = {f"c{i:05d}": "v2" for i in range(10_000)}
    after = dataclasses.replace(BASE, routes=(dataclasses.replace(web, pins=many),))
    [r] = diff_to_json(diff_states(BASE, after))["routes"]
    assert {k: r["pins"][k] for k in ("before", "after", "added", "removed", "changed")} == {
        "before": 2, "after": 10_000, "added": 10_000, "removed": 2, "changed": 0}
    assert [e["client"] for e in r["pins"]["examples"]["added"]] == [f"c{i:05d}" for i in range(PIN_EXAMPLES)]


def test_routes_and_versions_added_and_removed() -> None:
    after = State(versions={"v1": V1, "v3": V3},
                  routes=(Route("api", split=(("v3", 1.0),)),))
    d = diff_states(BASE, after)
    j = diff_to_json(d)
    assert [(r["route"], r["change"]) for r in j["routes"]] == [("api", "added"), ("web", "removed")]
    api, web = j["routes"]
    assert api["split"]["before"] == {} and api["split"]["after"] == {"v3": 1.0}
    assert api["fields"] == {"match": {"before": None, "after": {"path_prefix": "/"}},
                             "sticky": {"before": None, "after": True}}
    assert web["pins"]["removed"] == 2 and web["split"]["after"] == {}
    assert j["versions"] == [
        {"version": "v2", "change": "removed", "before": {"kind": "static", "endpoints": ["http://127.0.0.1:9002"]},
         "after": None},
        {"version": "v3", "change": "added", "before": None,
         "after": {"kind": "static", "endpoints": ["http://127.0.0.1:9003"]}},
    ]
    assert [re.split(r"\s{2,}", line) for line in render_diff(d).splitlines()] == [
        ["ROUTE", "WHAT", "BEFORE", "AFTER"],
        ["api", "route added"],
        ["api", "weight v3", "-", "1"],
        ["api", "match", "-", '{"path_prefix":"/"}'],
        ["api", "sticky", "-", "true"],
        ["web", "route removed"],
        ["web", "weight v1", "100", "-"],
        ["web", "pins", "2", "0 (+0 -2 ~0)"],
        ["web", "pin a", "v1", "-"],
        ["web", "pin b", "v1", "-"],
        ["web", "match", '{"path_prefix":"/"}', "-"],
        ["web", "sticky", "true", "-"],
        ["web", "fallback", '["v1"]', "-"],
        [""],
        ["VERSION", "CHANGE", "SPEC"],
        ["v2", "removed", '{"endpoints":["http://127.0.0.1:9002"],"kind":"static"}'],
        ["v3", "added", '{"endpoints":["http://127.0.0.1:9003"],"kind":"static"}'],
    ]


def test_a_version_re_registered_with_another_spec_is_changed_and_instances_alone_are_not() -> None:
    moved = dataclasses.replace(BASE, versions={"v1": static("v1", 9101), "v2": dataclasses.replace(
        V2, endpoints=("http://127.0.0.1:9999",))})
    j = diff_to_json(diff_states(BASE, moved))
    assert j["versions"] == [{"version": "v1", "change": "changed",
                              "before": {"kind": "static", "endpoints": ["http://127.0.0.1:9001"]},
                              "after": {"kind": "static", "endpoints": ["http://127.0.0.1:9101"]},
                              "fields": ["endpoints"]}]
