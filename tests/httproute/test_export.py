"""`turnout export --format httproute` (proxy.httproute_export): the documents a state becomes, and the
property that reading them back gives the same state, apply(export(state)) == state, over generated
route files in the native syntax."""

from __future__ import annotations

import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.errors import ValidationError
from proxy.httproute_export import ExportError, export_documents
from proxy.parse import parse_document, state_to_stored
from proxy.routefile import load_route_file

VERSIONS = ("v1", "v2", "v3", "canary")
token = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=8).filter(
    lambda s: s[0].isalnum())
label = st.builds(lambda a, b: a + b, st.sampled_from(string.ascii_lowercase),
                  st.text(string.ascii_lowercase + string.digits, max_size=5))
host = st.builds(lambda wild, parts: ("*." if wild else "") + ".".join(parts), st.booleans(),
                 st.lists(label, min_size=2, max_size=3))
path = st.lists(label, max_size=3).map(lambda parts: "/" + "/".join(parts))


@st.composite
def route_file(draw: st.DrawFn) -> dict[str, Any]:
    versions = {v: {"endpoints": [f"http://127.0.0.1:{9100 + i}"]} for i, v in enumerate(VERSIONS)}
    routes = []
    for i in range(draw(st.integers(1, 3))):
        split_versions = draw(st.lists(st.sampled_from(VERSIONS), min_size=1, max_size=4, unique=True))
        r: dict[str, Any] = {"name": f"r{i}" + draw(st.sampled_from(["", ".main", "-api"])),
                             "split": {v: draw(st.integers(0, 100)) for v in split_versions}}
        if draw(st.booleans()):
            m: dict[str, Any] = {"path_prefix": draw(path)}
            if draw(st.booleans()):
                m["host"] = draw(host)
            if draw(st.booleans()):
                m["headers"] = draw(st.dictionaries(token, st.text(string.ascii_letters + " ,=", max_size=6),
                                                    max_size=2))
            r["match"] = m
        else:
            r.update(draw(actions(list(r["split"]))))
            if r.get("split", 1) is None:
                del r["split"]  # a redirecting route reaches no version
        if draw(st.booleans()):
            kinds = draw(st.lists(st.sampled_from(["header", "cookie", "query"]), min_size=1, max_size=3))
            r["identity"] = [{k: draw(token)} for k in kinds]
        if draw(st.booleans()):
            r["sticky"] = draw(st.booleans())
        if draw(st.booleans()):
            r["pins"] = draw(st.dictionaries(st.text(string.ascii_letters + ",={ ", min_size=1, max_size=6),
                                             st.sampled_from(VERSIONS), max_size=3))
        if draw(st.booleans()):
            r["fallback"] = draw(st.lists(st.sampled_from(VERSIONS), max_size=3, unique=True))
        if draw(st.booleans()):
            r["mirror"] = {"version": draw(st.sampled_from(VERSIONS)),
                           "percent": draw(st.sampled_from([100, 50, 12.5, 0.1, 33.333]))}
        for flag in ("expose_version",):
            if draw(st.booleans()):
                r[flag] = True
        if draw(st.booleans()):
            r["assignment_cookie"] = draw(token)
            if draw(st.booleans()):
                r["assignment_cookie_max_age"] = draw(st.integers(1, 400 * 86400))
        routes.append(r)
    return {"versions": versions, "routes": routes}


def name_values(regex: bool) -> st.SearchStrategy[list[dict[str, str]]]:
    entry = st.builds(lambda n, v, rx: {"name": n, "value": "^v[0-9]+$", "type": "RegularExpression"} if rx
                      else {"name": n, "value": v}, token, st.text(string.ascii_letters + " ,=", max_size=6),
                      st.booleans() if regex else st.just(False))
    return st.lists(entry, max_size=2, unique_by=lambda e: e["name"])


ms = st.integers(1, 90_000_000).map(lambda n: n / 1000)


@st.composite
def actions(draw: st.DrawFn, versions: list[str]) -> dict[str, Any]:
    """The fields of SPEC part A: typed matches (hostnames x matches), filters, per-version filters,
    timeouts and retry."""
    hosts = draw(st.lists(host, max_size=2, unique=True))
    bases = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["PathPrefix", "Exact", "RegularExpression"]))
        m: dict[str, Any] = {"path": {"type": kind, "value": "^/v[0-9]+/.*" if kind == "RegularExpression"
                                      else draw(path)}}
        if draw(st.booleans()):
            m["method"] = draw(st.sampled_from(["GET", "POST", "PATCH"]))
        for key in ("headers", "query"):
            entries = draw(name_values(regex=True))
            if entries:
                m[key] = entries
        bases.append(m)
    out: dict[str, Any] = {"matches": [{"host": h, **b} for b in bases for h in hosts] if hosts else bases}
    edit = st.fixed_dictionaries({}, optional={
        "set": st.dictionaries(token.map(lambda t: "x-s" + t), token, min_size=1, max_size=2),
        "add": st.dictionaries(token.map(lambda t: "x-a" + t), token, min_size=1, max_size=2),
        "remove": st.lists(token.map(lambda t: "x-r" + t), min_size=1, max_size=2, unique=True)})
    filters: dict[str, Any] = {}
    for key in ("request_headers", "response_headers"):
        e = draw(edit)
        if e:
            filters[key] = e
    prefix_only = all(b["path"]["type"] == "PathPrefix" for b in bases)
    path_edit = st.fixed_dictionaries({"type": st.sampled_from(["ReplaceFullPath", "ReplacePrefixMatch"]
                                                               if prefix_only else ["ReplaceFullPath"]),
                                       "value": path})
    choice = draw(st.sampled_from(["none", "rewrite", "redirect"]))
    if choice == "rewrite":
        filters["rewrite"] = draw(st.fixed_dictionaries({}, optional={"hostname": host.filter(
            lambda h: not h.startswith("*")), "path": path_edit}).filter(bool))
    elif choice == "redirect":
        filters["redirect"] = draw(st.fixed_dictionaries(
            {"status": st.sampled_from([301, 302, 303, 307, 308])},
            optional={"scheme": st.sampled_from(["http", "https"]), "port": st.integers(1, 65535),
                      "hostname": host.filter(lambda h: not h.startswith("*")), "path": path_edit}))
        out["split"] = None
    if filters:
        out["filters"] = filters
    if choice != "redirect" and draw(st.booleans()):
        vf = {v: {"request_headers": draw(edit.filter(bool))} for v in versions[:1]}
        out["version_filters"] = vf
    if draw(st.booleans()):
        request = draw(ms)
        t = draw(st.fixed_dictionaries({}, optional={"request": st.just(request),
                                                     "backend_request": ms.filter(lambda b: b <= request)}))
        if t:
            out["timeouts"] = t
    if draw(st.booleans()):
        out["retry"] = draw(st.fixed_dictionaries(
            {"attempts": st.integers(1, 5), "codes": st.lists(st.sampled_from([500, 502, 503, 504]), min_size=1,
                                                                unique=True)},
            optional={"backoff": st.integers(1, 60_000).map(lambda n: n / 1000)}))
    return out


def roundtrip(doc: dict[str, Any]) -> None:
    try:
        state = parse_document(doc, now=1000.0)
    except ValidationError:
        assume(False)
        return
    text = yaml.safe_dump_all(export_documents(state_to_stored(state)), sort_keys=False)
    assert load_route_file(text, now=2000.0, current=state) == state


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(route_file())
def test_apply_of_export_is_the_state(doc: dict[str, Any]) -> None:
    roundtrip(doc)


def test_documents_of_a_canary() -> None:
    state = parse_document({
        "versions": {"v1": {"endpoints": ["http://127.0.0.1:9001"]}, "v2": {"endpoints": ["http://127.0.0.1:9002"]}},
        "routes": [{"name": "shop", "match": {"host": "shop.example.com", "path_prefix": "/",
                                              "headers": {"X-Env": "canary"}},
                    "identity": [{"header": "X-Client-Id"}], "split": {"v1": 90, "v2": 10},
                    "pins": {"acme": "v2"}, "fallback": ["v1"], "assignment_cookie": "tv",
                    "mirror": {"version": "v2", "percent": 12.5}}],
    })
    assert export_documents(state_to_stored(state)) == [
        {"apiVersion": "turnout/v1", "kind": "Version", "metadata": {"name": "v1"},
         "spec": {"endpoints": ["http://127.0.0.1:9001"]}},
        {"apiVersion": "turnout/v1", "kind": "Version", "metadata": {"name": "v2"},
         "spec": {"endpoints": ["http://127.0.0.1:9002"]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "shop", "annotations": {"turnout/identity": "header:x-client-id",
                                                      "turnout/pins": "acme=v2", "turnout/fallback": "v1"}},
         "spec": {"hostnames": ["shop.example.com"], "rules": [{
             "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                          "headers": [{"name": "x-env", "value": "canary"}]}],
             "filters": [{"type": "RequestMirror", "requestMirror": {
                 "backendRef": {"name": "v2"}, "fraction": {"numerator": 125, "denominator": 1000}}}],
             "backendRefs": [{"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}],
             "sessionPersistence": {"sessionName": "tv", "type": "Cookie"}}]}},
    ]


def test_one_route_and_the_versions_it_names() -> None:
    state = parse_document({
        "versions": {"v1": {"endpoints": ["http://127.0.0.1:9001"]}, "v2": {"endpoints": ["http://127.0.0.1:9002"]}},
        "routes": [{"name": "a", "split": {"v1": 1}}, {"name": "b", "split": {"v2": 1}}],
    })
    docs = export_documents(state_to_stored(state), "b")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Version", "v2"), ("HTTPRoute", "b")]
    with pytest.raises(ExportError, match="no route named 'c'"):
        export_documents(state_to_stored(state), "c")


def test_what_httproute_cannot_say_is_an_error() -> None:
    stored = {"versions": {}, "routes": {"a": {"split": {"v1": 0.5, "v2": 1}}}}
    with pytest.raises(ExportError, match=r"route a: split.v1: weight 0.5 is not an integer 0..1000000"):
        export_documents(stored)
    stored = {"versions": {}, "routes": {"a": {"split": {"v1": 1}, "teleport": True}}}
    with pytest.raises(ExportError, match="route a: teleport: no HTTPRoute form for this field"):
        export_documents(stored)
    stored = {"versions": {}, "routes": {"a": {"split": {"v1": 1}, "matches": [
        {"host": "a.example", "path_prefix": "/"}, {"path_prefix": "/x"}]}}}
    with pytest.raises(ExportError, match="some give a host and some do not"):
        export_documents(stored)
    stored = {"versions": {}, "routes": {"a": {"split": {"v1": 1}, "timeouts": {"request": 0.0001}}}}
    with pytest.raises(ExportError, match=r"timeouts.request: 0.0001 s is not a whole number of milliseconds"):
        export_documents(stored)


def test_durations_and_several_hosts() -> None:
    stored = {"versions": {}, "routes": {"a": {
        "split": {"v1": 1}, "timeouts": {"request": 5400.5, "backend_request": 2.5},
        "retry": {"attempts": 2, "codes": [503], "backoff": 0.1},
        "matches": [{"host": "a.example", "path": {"type": "Exact", "value": "/x"}},
                    {"host": "b.example", "path": {"type": "Exact", "value": "/x"}},
                    {"host": "a.example", "path_prefix": "/y", "method": "GET"},
                    {"host": "b.example", "path_prefix": "/y", "method": "GET"}]}}}
    (doc,) = export_documents(stored)
    assert doc["spec"] == {"hostnames": ["a.example", "b.example"], "rules": [{
        "matches": [{"path": {"type": "Exact", "value": "/x"}},
                    {"path": {"type": "PathPrefix", "value": "/y"}, "method": "GET"}],
        "backendRefs": [{"name": "v1", "weight": 1}],
        "timeouts": {"request": "1h30m500ms", "backendRequest": "2s500ms"},
        "retry": {"attempts": 2, "codes": [503], "backoff": "100ms"}}]}
