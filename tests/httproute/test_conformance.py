"""The Gateway API's HTTPRoute conformance expectations, ported to turnout.

Source: the Gateway API conformance suite, kubernetes-sigs/gateway-api, `conformance/tests/httproute-*.go`
and their `.yaml` manifests (commit 4564255ac, Apache License 2.0). The manifests below are re-expressed
from those files (the same rules, matches, filters and backends; Gateways, parentRefs, namespaces and
ports left out, as turnout has none of them), and each test's table of request -> backend / response is the
suite's, case by case, unless a comment says where turnout differs and why. The echo upstreams answer
like the suite's echo-basic (tests/httproute/echo.py); one turnout serves the whole module and each test
applies its own stream (the suite's Version documents plus the test's HTTPRoutes) through the admin API.

Tolerances are the suite's: weights within 5 percentage points over 500 requests (conformance/utils/weight).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPMessage
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.helpers import Turnout, http
from tests.httproute.echo import Echo

V1, V2, V3 = "infra-backend-v1", "infra-backend-v2", "infra-backend-v3"
BACKENDS = (V1, V2, V3)
HR = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"


@dataclass
class Reply:
    status: int
    headers: HTTPMessage
    body: dict[str, Any] | None

    @property
    def backend(self) -> str | None:
        return None if self.body is None else str(self.body["backend"])

    def upstream_header(self, name: str) -> str | None:
        """The header as the upstream saw it: its values joined with "," as the suite compares them."""
        assert self.body is not None
        values = self.body["headers"].get(name.title())
        if values is None:
            return None
        return ",".join(v.strip() for line in values for v in line.split(","))

    def header(self, name: str) -> str | None:
        values = self.headers.get_all(name)
        return None if values is None else ",".join(v.strip() for line in values for v in line.split(","))


@pytest.fixture(scope="module")
def echoes() -> Iterator[dict[str, Echo]]:
    servers = {name: Echo(name).start() for name in BACKENDS}
    yield servers
    for e in servers.values():
        e.stop()


EXAMPLE = Path(__file__).resolve().parents[2] / "routes" / "httproute-canary.yaml"


def example(echoes: dict[str, Echo]) -> str:
    """routes/httproute-canary.yaml as written, its endpoints pointed at this module's upstreams."""
    text = EXAMPLE.read_text()
    for old, new in (("http://127.0.0.1:9201", echoes[V1].url), ("http://127.0.0.1:9202", echoes[V2].url)):
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def turnout(tmp_path_factory: pytest.TempPathFactory, echoes: dict[str, Echo]) -> Iterator[Turnout]:
    tmp = tmp_path_factory.mktemp("conformance")
    seed = tmp / "httproute-canary.yaml"
    seed.write_text(example(echoes))
    # The deadline sweeper checks a tenth of the shortest *proxy* timeout apart (1 s with the defaults), not
    # a route's: with a 2 s pool idle timeout it ticks every 0.2 s, so a route's 500 ms backendRequest fires
    # before the suite's 1 s delayed answer arrives (with the defaults it fires between 0.5 and 1.5 s).
    with Turnout(tmp, str(seed), "--timeout-upstream-pool-idle", "2") as t:
        yield t


def versions(echoes: dict[str, Echo]) -> str:
    return "".join(f"apiVersion: turnout/v1\nkind: Version\nmetadata: {{name: {n}}}\n"
                   f"spec: {{endpoints: [\"{e.url}\"], health: {{interval: 60}}}}\n---\n" for n, e in echoes.items())


class Conformance:
    def __init__(self, turnout: Turnout, echoes: dict[str, Echo]) -> None:
        self.turnout = turnout
        self.echoes = echoes

    def post(self, text: str) -> tuple[int, Any]:
        status, _, body = http("POST", self.turnout.admin + "/api/v1/apply", text.encode(),
                               {"Authorization": f"Bearer {self.turnout.token}", "Content-Type": "application/yaml"})
        return status, json.loads(body)

    def apply(self, manifest: str) -> dict[str, Any]:
        status, data = self.post(versions(self.echoes) + manifest)
        assert status == 200, data
        for e in self.echoes.values():
            e.clear()
        return data

    def refused(self, manifest: str) -> list[tuple[str, str]]:
        status, data = self.post(versions(self.echoes) + manifest)
        assert status == 422, data
        return [(e["path"], e["message"]) for e in data["errors"]]

    def send(self, path: str, host: str = "example.com", method: str = "GET",
             headers: dict[str, str] | None = None, timeout: float = 5.0) -> Reply:
        conn = HTTPConnection("127.0.0.1", self.turnout.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            raw = r.read()
            body = None
            if r.headers.get("Content-Type") == "application/json" and raw:
                body = json.loads(raw)
            return Reply(r.status, r.headers, body)
        finally:
            conn.close()

    def outcomes(self, cases: list[tuple[Any, ...]]) -> list[Any]:
        """(path, headers, method[, host]) -> the backend's name, or the status when no backend answered."""
        out = []
        for case in cases:
            path, headers, method = case[:3]
            host = case[3] if len(case) > 3 else "example.com"
            r = self.send(path, host=host, method=method, headers=headers)
            out.append(r.backend if r.status == 200 and r.body is not None else r.status)
        return out


@pytest.fixture
def suite(turnout: Turnout, echoes: dict[str, Echo]) -> Conformance:
    return Conformance(turnout, echoes)


def check(suite: Conformance, table: list[tuple[Any, ...]]) -> None:
    """Every case's expected outcome is the table's last column; all cases are compared at once."""
    got = suite.outcomes([case[:-1] for case in table])
    assert list(zip([c[:-1] for c in table], got, strict=True)) == [(c[:-1], c[-1]) for c in table]


def canary_outcome(suite: Conformance) -> tuple[str | None, Counter[Any]]:
    tester = suite.send("/cart", host="shop.example.com", headers={"X-Canary": "always"})
    return tester.backend, Counter(suite.outcomes([("/", {}, "GET", "shop.example.com")] * 100))


# routes/httproute-canary.yaml, the file `serve --routes` started this module's turnout with: a 90/10
# HTTPRoute canary (exact proportions: requests without a client id follow turnout's weighted cycle) and a
# header match that sends testers to the canary.
def test_serve_routes_reads_the_httproute_example(suite: Conformance) -> None:
    status, state = suite.turnout.api("GET", "/api/v1/state")
    assert (status, list(state["routes"]), list(state["versions"])) == (
        200, ["shop.testers", "shop.main"], ["shop-v1", "shop-v2"])
    assert canary_outcome(suite) == (V2, {V1: 90, V2: 10})
    r = suite.send("/", host="shop.example.com")
    # 100 requests are whole cycles of the 90/10 split: the next one starts the cycle again, on shop-v1, and
    # its assignment cookie (sessionPersistence) records that version.
    assert (r.backend, r.headers.get("Set-Cookie")) == (
        V1, "shop-version=shop-v1; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax")


# HTTPRouteMatching (httproute-matching)
MATCHING = HR + """metadata: {name: matching}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2}]
"""


def test_matching(suite: Conformance) -> None:
    suite.apply(MATCHING)
    check(suite, [
        ("/", {}, "GET", V1), ("/example", {}, "GET", V1), ("/", {"Version": "one"}, "GET", V1),
        ("/v2", {}, "GET", V2), ("/v2/example", {}, "GET", V2), ("/", {"Version": "two"}, "GET", V2),
        ("/v2/", {}, "GET", V2),
        ("/v2example", {}, "GET", V1),  # not a path-segment prefix of /v2
        ("/foo/v2/example", {}, "GET", V1),
    ])


# HTTPRouteExactPathMatching
def test_exact_path_matching(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: exact-matching}
spec:
  rules:
  - matches: [{path: {type: Exact, value: /one}}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: Exact, value: /two}}]
    backendRefs: [{name: infra-backend-v2}]
""")
    check(suite, [("/one", {}, "GET", V1), ("/two", {}, "GET", V2), ("/", {}, "GET", 404),
                  ("/one/example", {}, "GET", 404), ("/two/", {}, "GET", 404), ("/Two", {}, "GET", 404)])


# HTTPRoutePathMatchOrder
def test_path_match_order(suite: Conformance) -> None:
    rules = [("Exact", "/match", V1), ("Exact", "/match/exact", V2), ("Exact", "/match/exact/one", V3),
             ("PathPrefix", "/match/", V3), ("PathPrefix", "/match/prefix/", V1),
             ("PathPrefix", "/match/prefix/one", V2)]
    suite.apply(HR + "metadata: {name: path-matching-order}\nspec:\n  rules:\n" + "".join(
        f"  - matches: [{{path: {{type: {t}, value: {v}}}}}]\n    backendRefs: [{{name: {b}}}]\n" for t, v, b in rules))
    check(suite, [("/match/exact/one", {}, "GET", V3), ("/match/exact", {}, "GET", V2), ("/match", {}, "GET", V1),
                  ("/match/prefix/one/any", {}, "GET", V2), ("/match/prefix/any", {}, "GET", V1),
                  ("/match/any", {}, "GET", V3)])


# HTTPRouteHeaderMatching
def test_header_matching(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: header-matching}
spec:
  rules:
  - matches: [{headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2}]
  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
    backendRefs: [{name: infra-backend-v2}]
""")
    check(suite, [
        ("/", {"Version": "one"}, "GET", V1), ("/", {"Version": "two"}, "GET", V2),
        ("/", {"Version": "two", "Color": "orange"}, "GET", V1), ("/", {"Version": "two", "Color": "blue"}, "GET", V2),
        ("/", {"Color": "orange"}, "GET", 404), ("/", {"Some-Other-Header": "one"}, "GET", 404),
        ("/", {"Color": "blue"}, "GET", V1), ("/", {"Color": "green"}, "GET", V1), ("/", {"Color": "red"}, "GET", V2),
        ("/", {"Color": "yellow"}, "GET", V2), ("/", {"Color": "purple"}, "GET", 404),
    ])


# HTTPRouteQueryParamMatching
def test_query_param_matching(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: query-param-matching}
spec:
  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: infra-backend-v2}]
  - matches:
    - queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]
    - queryParams: [{name: ANIMAL, value: Whale}]
    backendRefs: [{name: infra-backend-v3}]
  - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v2}]
  - matches:
    - path: {type: PathPrefix, value: /path2}
      headers: [{name: version, value: two}]
      queryParams: [{name: animal, value: whale}]
    backendRefs: [{name: infra-backend-v3}]
  - matches:
    - {path: {type: PathPrefix, value: /path3}, queryParams: [{name: animal, value: shark}]}
    - path: {type: PathPrefix, value: /path4}
      headers: [{name: version, value: three}]
      queryParams: [{name: animal, value: kraken}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{queryParams: [{name: animal, value: hydra}]}]
    backendRefs: [{name: infra-backend-v2}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3}]
""")
    check(suite, [
        ("/?animal=whale", {}, "GET", V1), ("/?animal=dolphin", {}, "GET", V2),
        ("/?animal=dolphin&color=blue", {}, "GET", V3), ("/?ANIMAL=Whale", {}, "GET", V3),
        ("/?animal=whale&otherparam=irrelevant", {}, "GET", V1), ("/?animal=dolphin&color=yellow", {}, "GET", V2),
        ("/?color=blue", {}, "GET", 404), ("/?animal=dog", {}, "GET", 404), ("/?animal=whaledolphin", {}, "GET", 404),
        ("/", {}, "GET", 404),
        ("/path1?animal=whale", {}, "GET", V1), ("/?animal=whale", {"version": "one"}, "GET", V2),
        ("/path2?animal=whale", {"version": "two"}, "GET", V3),
        ("/path3?animal=shark", {}, "GET", V1), ("/path4?animal=kraken", {"version": "three"}, "GET", V1),
        ("/?animal=shark", {}, "GET", 404), ("/path4?animal=kraken", {}, "GET", 404),
        ("/path5?animal=hydra", {}, "GET", V1), ("/?animal=hydra", {"version": "four"}, "GET", V3),
    ])


# HTTPRouteMethodMatching
def test_method_matching(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: method-matching}
spec:
  rules:
  - matches: [{method: POST}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{method: GET}]
    backendRefs: [{name: infra-backend-v2}]
  - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{headers: [{name: version, value: one}], method: PUT}]
    backendRefs: [{name: infra-backend-v2}]
  - matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
    backendRefs: [{name: infra-backend-v3}]
  - matches:
    - {path: {type: PathPrefix, value: /path3}, method: PATCH}
    - {path: {type: PathPrefix, value: /path4}, headers: [{name: version, value: three}], method: DELETE}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{method: PATCH}]
    backendRefs: [{name: infra-backend-v2}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3}]
""")
    check(suite, [
        ("/", {}, "POST", V1), ("/", {}, "GET", V2), ("/", {}, "HEAD", 404),
        ("/path1", {}, "GET", V1), ("/", {"version": "one"}, "PUT", V2), ("/path2", {"version": "two"}, "POST", V3),
        ("/path3", {}, "PATCH", V1), ("/path4", {"version": "three"}, "DELETE", V1),
        ("/", {}, "PUT", 404), ("/path4", {}, "DELETE", 404),
        ("/path5", {}, "PATCH", V1), ("/", {"version": "four"}, "PATCH", V2),
    ])


# HTTPRouteMatchingAcrossRoutes
def test_matching_across_routes(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: matching-part1}
spec:
  hostnames: [example.com, example.net]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1}]
---
""" + HR + """metadata: {name: matching-part2}
spec:
  hostnames: [example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2}]
""")
    check(suite, [
        ("/", {}, "GET", "example.com", V1), ("/example", {}, "GET", "example.com", V1),
        ("/example", {}, "GET", "example.net", V1), ("/", {"Version": "one"}, "GET", "example.com", V1),
        ("/v2", {}, "GET", "example.com", V2), ("/v2", {}, "GET", "example.net", V1),
        ("/v2/example", {}, "GET", "example.com", V2), ("/", {"Version": "two"}, "GET", "example.com", V2),
    ])


# HTTPRouteHostnameIntersection, the route side only: turnout has no listeners whose hostnames a route's
# are intersected with, so the route's hostnames alone decide (non.matching.com and foo.specific.com,
# which the suite's listeners keep out, reach the route here).
def test_hostnames_exact_and_wildcard(suite: Conformance) -> None:
    routes = [("s1", ["non.matching.com", "*.nonmatchingwildcard.io", "very.specific.com"], V1),
              ("s2", ["non.matching.com", "wildcard.io", "foo.wildcard.io", "bar.wildcard.io", "foo.bar.wildcard.io"],
               V2),
              ("s3", ["non.matching.com", "*.specific.com"], V3), ("s4", ["*.anotherwildcard.io"], V1)]
    docs = [HR + f"metadata: {{name: {p}}}\nspec:\n  hostnames: {json.dumps(h)}\n  rules:\n"
            f"  - matches: [{{path: {{type: PathPrefix, value: /{p}}}}}]\n    backendRefs: [{{name: {b}}}]\n"
            for p, h, b in routes]
    docs.append(HR + "metadata: {name: all}\nspec:\n  hostnames: [first.com, sub.first.com, second.com, sub.second.com]"
                "\n  rules:\n  - backendRefs: [{name: infra-backend-v2}]\n")
    suite.apply("---\n".join(docs))
    check(suite, [
        ("/s1", {}, "GET", "very.specific.com", V1), ("/s1", {}, "GET", "very.specific.com:1234", V1),
        ("/s1", {}, "GET", "non.matching.com", V1), ("/s1", {}, "GET", "foo.nonmatchingwildcard.io", V1),
        ("/s1", {}, "GET", "foo.wildcard.io", 404), ("/non-matching-prefix", {}, "GET", "very.specific.com", 404),
        ("/s2", {}, "GET", "foo.wildcard.io", V2), ("/s2", {}, "GET", "bar.wildcard.io", V2),
        ("/s2", {}, "GET", "foo.bar.wildcard.io", V2), ("/s2", {}, "GET", "very.specific.com", 404),
        ("/s2", {}, "GET", "baz.wildcard.io", 404),
        ("/s3", {}, "GET", "very.specific.com", V3), ("/s3", {}, "GET", "foo.specific.com", V3),
        ("/s3", {}, "GET", "specific.com", 404), ("/s3", {}, "GET", "foo.wildcard.io", 404),
        ("/s4", {}, "GET", "foo.anotherwildcard.io", V1), ("/s4", {}, "GET", "bar.anotherwildcard.io", V1),
        ("/s4", {}, "GET", "foo.bar.anotherwildcard.io", V1), ("/s4", {}, "GET", "anotherwildcard.io", 404),
        ("/s4", {}, "GET", "very.specific.com", 404),
        ("/", {}, "GET", "first.com", V2), ("/", {}, "GET", "sub.first.com", V2), ("/", {}, "GET", "second.com", V2),
        ("/", {}, "GET", "sub.second.com", V2), ("/", {}, "GET", "third.com", 404),
        ("/", {}, "GET", "sub.third.com", 404),
    ])


# HTTPRouteWeight: 70/30/0 within the suite's tolerance (5 points over 500 requests); the 0 gets nothing.
def test_weight(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: weighted-backends}
spec:
  rules:
  - backendRefs:
    - {name: infra-backend-v1, weight: 70}
    - {name: infra-backend-v2, weight: 30}
    - {name: infra-backend-v3, weight: 0}
""")
    seen = Counter(suite.outcomes([(f"/?entropy={i}", {}, "GET") for i in range(500)]))
    assert set(seen) == {V1, V2}
    assert abs(seen[V1] / 500 - 0.7) <= 0.05 and abs(seen[V2] / 500 - 0.3) <= 0.05, seen


# HTTPRouteRequestHeaderModifier
HEADER_EDIT = "{set: [{name: X-Header-Set, value: set-overwrites-values}], " \
              "add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}], " \
              "remove: [X-Header-Remove]}"


def test_request_header_modifier(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: request-header-modifier}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /set}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /add}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /remove}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [X-Header-Remove]}}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /multiple}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add:
        - {name: X-Header-Add-1, value: header-add-1}
        - {name: X-Header-Add-2, value: header-add-2}
        - {name: X-Header-Add-3, value: header-add-3}
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: header-set}]
        add: [{name: X-Header-Add, value: header-add}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-backend-v1}]
""")
    cases: list[tuple[str, dict[str, str], dict[str, str | None]]] = [
        ("/set", {"Some-Other-Header": "val"}, {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
        ("/set", {"Some-Other-Header": "val", "X-Header-Set": "some-other-value"},
         {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
        ("/add", {"Some-Other-Header": "val"}, {"Some-Other-Header": "val", "X-Header-Add": "add-appends-values"}),
        ("/add", {"Some-Other-Header": "val", "X-Header-Add": "some-other-value"},
         {"Some-Other-Header": "val", "X-Header-Add": "some-other-value,add-appends-values"}),
        ("/remove", {"X-Header-Remove": "val"}, {"X-Header-Remove": None}),
        ("/multiple", {"X-Header-Set-2": "set-val-2", "X-Header-Add-2": "add-val-2",
                       "X-Header-Remove-2": "remove-val-2", "Another-Header": "another-header-val"},
         {"X-Header-Set-1": "header-set-1", "X-Header-Set-2": "header-set-2", "X-Header-Add-1": "header-add-1",
          "X-Header-Add-2": "add-val-2,header-add-2", "X-Header-Add-3": "header-add-3",
          "Another-Header": "another-header-val", "X-Header-Remove-1": None, "X-Header-Remove-2": None}),
        ("/case-insensitivity", {"x-header-set": "original-val-set", "x-header-add": "original-val-add",
                                 "x-header-remove": "original-val-remove", "Another-Header": "another-header-val"},
         {"X-Header-Set": "header-set", "X-Header-Add": "original-val-add,header-add",
          "Another-Header": "another-header-val", "X-Header-Remove": None}),
    ]
    for path, sent, want in cases:
        r = suite.send(path, headers=sent)
        assert (r.backend, {k: r.upstream_header(k) for k in want}) == (V1, want), path


# HTTPRouteResponseHeaderModifier
def test_response_header_modifier(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: response-header-modifier}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /set}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /add}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /remove}}]
    filters:
    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [X-Header-Remove]}}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /multiple}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add:
        - {name: X-Header-Add-1, value: header-add-1}
        - {name: X-Header-Add-2, value: header-add-2}
        - {name: X-Header-Add-3, value: header-add-3}
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set, value: header-set}]
        add:
        - {name: X-Header-Add, value: header-add}
        - {name: x-lowercase-add, value: lowercase-add}
        - {name: x-Mixedcase-ADD-1, value: mixedcase-add-1}
        - {name: X-mixeDcase-add-2, value: mixedcase-add-2}
        - {name: X-UPPERCASE-ADD, value: uppercase-add}
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /response-and-request-header-modifiers}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}]
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    - {type: RequestHeaderModifier, requestHeaderModifier: """ + HEADER_EDIT + """}
    backendRefs: [{name: infra-backend-v1}]
""")
    cases: list[tuple[str, str, dict[str, str | None]]] = [
        ("/set", "Some-Other-Header:val", {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
        ("/set", "Some-Other-Header:val,X-Header-Set:some-other-value",
         {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
        ("/add", "Some-Other-Header:val", {"Some-Other-Header": "val", "X-Header-Add": "add-appends-values"}),
        ("/add", "Some-Other-Header:val,X-Header-Add:some-other-value",
         {"Some-Other-Header": "val", "X-Header-Add": "some-other-value,add-appends-values"}),
        ("/remove", "X-Header-Remove:val", {"X-Header-Remove": None}),
        ("/multiple", "X-Header-Set-2:set-val-2,X-Header-Add-2:add-val-2,X-Header-Remove-2:remove-val-2,"
                      "Another-Header:another-header-val,X-Header-Remove-1:val",
         {"X-Header-Set-1": "header-set-1", "X-Header-Set-2": "header-set-2", "X-Header-Add-1": "header-add-1",
          "X-Header-Add-2": "add-val-2,header-add-2", "X-Header-Add-3": "header-add-3",
          "Another-Header": "another-header-val", "X-Header-Remove-1": None, "X-Header-Remove-2": None}),
        ("/case-insensitivity", "x-header-set:original-val-set,x-header-add:original-val-add,"
                                "x-header-remove:original-val-remove,Another-Header:another-header-val",
         {"X-Header-Set": "header-set", "X-Header-Add": "original-val-add,header-add",
          "X-Lowercase-Add": "lowercase-add", "X-Mixedcase-Add-1": "mixedcase-add-1",
          "X-Mixedcase-Add-2": "mixedcase-add-2", "X-Uppercase-Add": "uppercase-add",
          "Another-Header": "another-header-val", "X-Header-Remove": None}),
    ]
    for path, backend_sets, want in cases:
        r = suite.send(path, headers={"X-Echo-Set-Header": backend_sets})
        assert (r.backend, {k: r.header(k) for k in want}) == (V1, want), path
    r = suite.send("/response-and-request-header-modifiers", headers={
        "X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Echo": "echo",
        "X-Echo-Set-Header": "X-Header-Set-2:set-val-2,X-Header-Add-2:add-val-2,X-Header-Remove-2:remove-val-2,"
                             "Another-Header:another-header-val,X-Header-Remove-1:remove-val-1,X-Header-Echo:echo"})
    upstream = {k: r.upstream_header(k) for k in ("X-Header-Add", "X-Header-Set", "X-Header-Add-Append",
                                                  "X-Header-Echo", "X-Header-Remove")}
    response = {k: r.header(k) for k in ("X-Header-Set-1", "X-Header-Set-2", "X-Header-Add-1", "X-Header-Add-2",
                                         "Another-Header", "X-Header-Echo", "X-Header-Remove-1", "X-Header-Remove-2")}
    assert (r.backend, upstream, response) == (V1, {
        "X-Header-Add": "header-val-1", "X-Header-Set": "set-overwrites-values",
        "X-Header-Add-Append": "append-val-1,header-val-2", "X-Header-Echo": "echo", "X-Header-Remove": None}, {
        "X-Header-Set-1": "header-set-1", "X-Header-Set-2": "header-set-2", "X-Header-Add-1": "header-add-1",
        "X-Header-Add-2": "add-val-2,header-add-2", "Another-Header": "another-header-val", "X-Header-Echo": "echo",
        "X-Header-Remove-1": None, "X-Header-Remove-2": None})


# HTTPRouteRewriteHost
def test_rewrite_host(suite: Conformance) -> None:
    suite.apply(HR + f"""metadata: {{name: rewrite-host}}
spec:
  hostnames: [rewrite.example]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{hostname: one.example.org}}}}]
    backendRefs: [{{name: infra-backend-v1}}]
  - filters: [{{type: URLRewrite, urlRewrite: {{hostname: example.org}}}}]
    backendRefs: [{{name: infra-backend-v2}}]
  - matches: [{{path: {{type: PathPrefix, value: /rewrite-host-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{hostname: test.example.org}}}}
    - {{type: RequestHeaderModifier, requestHeaderModifier: {HEADER_EDIT}}}
    backendRefs: [{{name: infra-backend-v2}}]
""")
    got = []
    for path, want_host, backend in [("/one", "one.example.org", V1), ("/two", "example.org", V2)]:
        r = suite.send(path, host="rewrite.example")
        got.append((r.backend, r.body and r.body["host"], r.body and r.body["path"]))
        assert got[-1] == (backend, want_host, path)
    r = suite.send("/rewrite-host-and-modify-headers", host="rewrite.example",
                   headers={"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1"})
    assert (r.backend, r.body and r.body["host"], r.upstream_header("X-Header-Add"),
            r.upstream_header("X-Header-Add-Append"), r.upstream_header("X-Header-Set"),
            r.upstream_header("X-Header-Remove")) == (
        V2, "test.example.org", "header-val-1", "append-val-1,header-val-2", "set-overwrites-values", None)


# HTTPRouteRewritePath
def test_rewrite_path(suite: Conformance) -> None:
    suite.apply(HR + f"""metadata: {{name: rewrite-path}}
spec:
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /prefix/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1}}]
  - matches: [{{path: {{type: PathPrefix, value: /strip-prefix}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}}}]
    backendRefs: [{{name: infra-backend-v1}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /test}}}}}}
    - {{type: RequestHeaderModifier, requestHeaderModifier: {HEADER_EDIT}}}
    backendRefs: [{{name: infra-backend-v1}}]
  - matches: [{{path: {{type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}}}}}
    - {{type: RequestHeaderModifier, requestHeaderModifier: {HEADER_EDIT}}}
    backendRefs: [{{name: infra-backend-v1}}]
""")
    table = [("/prefix/one/two", "/one/two"), ("/strip-prefix/three", "/three"), ("/strip-prefix", "/"),
             ("/full/one/two", "/one")]
    assert [(p, suite.send(p).body["path"]) for p, _ in table] == table  # type: ignore[index]
    sent = {"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"}
    for path, upstream in [("/full/rewrite-path-and-modify-headers/test", "/test"),
                           ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one")]:
        r = suite.send(path, headers=sent)
        assert (r.body and r.body["path"], r.upstream_header("X-Header-Add"), r.upstream_header("X-Header-Add-Append"),
                r.upstream_header("X-Header-Set"), r.upstream_header("X-Header-Remove")) == (
            upstream, "header-val-1", "append-val-1,header-val-2", "set-overwrites-values", None)


def redirects(suite: Conformance, name: str, rules: list[tuple[str, str]]) -> None:
    suite.apply(HR + f"metadata: {{name: {name}}}\nspec:\n  rules:\n" + "".join(
        f"  - matches: [{{path: {{type: PathPrefix, value: {p}}}}}]\n"
        f"    filters: [{{type: RequestRedirect, requestRedirect: {r}}}]\n" for p, r in rules))


def locations(suite: Conformance, paths: list[str], host: str = "example.com") -> list[tuple[int, str | None]]:
    return [(r.status, r.headers.get("Location")) for r in (suite.send(p, host=host) for p in paths)]


# HTTPRouteRedirectHostAndStatus, HTTPRouteRedirectPath, HTTPRoute303/307/308Redirect
def test_redirect_host_status_and_path(suite: Conformance) -> None:
    redirects(suite, "redirect-host-and-status", [
        ("/hostname-redirect", "{hostname: example.org}"),
        ("/host-and-status", "{statusCode: 301, hostname: example.org}"),
        ("/original-prefix", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}"),
        ("/full", "{path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}"),
        ("/path-and-host", "{hostname: example.org, path: {type: ReplacePrefixMatch, "
                           "replacePrefixMatch: /replacement-prefix}}"),
        ("/path-and-status", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}, "
                             "statusCode: 301}"),
        ("/full-path-and-host", "{hostname: example.org, path: {type: ReplaceFullPath, "
                                "replaceFullPath: /replacement-full}}"),
        ("/full-path-and-status", "{path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, "
                                  "statusCode: 301}"),
        ("/see-other", "{statusCode: 303}"), ("/temporary", "{statusCode: 307}"), ("/permanent", "{statusCode: 308}"),
    ])
    port = suite.turnout.port
    assert locations(suite, ["/hostname-redirect", "/host-and-status", "/original-prefix/lemon",
                             "/full/path/original", "/path-and-host", "/path-and-status", "/full-path-and-host",
                             "/full-path-and-status", "/see-other", "/temporary", "/permanent"]) == [
        (302, f"http://example.org:{port}/hostname-redirect"), (301, f"http://example.org:{port}/host-and-status"),
        (302, f"http://example.com:{port}/replacement-prefix/lemon"),
        (302, f"http://example.com:{port}/full-path-replacement"),
        (302, f"http://example.org:{port}/replacement-prefix"), (301, f"http://example.com:{port}/replacement-prefix"),
        (302, f"http://example.org:{port}/replacement-full"), (301, f"http://example.com:{port}/replacement-full"),
        (303, f"http://example.com:{port}/see-other"), (307, f"http://example.com:{port}/temporary"),
        (308, f"http://example.com:{port}/permanent"),
    ]


# HTTPRouteRedirectScheme, HTTPRouteRedirectPort, HTTPRouteRedirectPortAndScheme (the listener here is
# http on the test's port: a port is left out of Location only when it is the scheme's well-known one).
def test_redirect_scheme_and_port(suite: Conformance) -> None:
    redirects(suite, "redirect-scheme-and-port", [
        ("/scheme-and-host-and-status", "{scheme: https, statusCode: 302, hostname: example.org}"),
        ("/scheme-and-host", "{hostname: example.org, scheme: https}"),
        ("/scheme-and-status", "{scheme: https, statusCode: 301}"),
        ("/scheme", "{scheme: https}"),
        ("/port-and-host-and-status", "{port: 8083, hostname: example.org, statusCode: 302}"),
        ("/port-and-host", "{hostname: example.org, port: 8083}"),
        ("/port-and-status", "{port: 8083, statusCode: 301}"),
        ("/port", "{port: 8083}"),
        ("/scheme-nil-and-port-80", "{port: 80, hostname: example.org}"),
        ("/scheme-https-and-port-443", "{scheme: https, port: 443, hostname: example.org}"),
        ("/scheme-https-and-port-8443", "{scheme: https, port: 8443, hostname: example.org}"),
        ("/scheme-http-and-port-nil", "{scheme: http, hostname: example.org}"),
    ])
    port = suite.turnout.port
    assert locations(suite, ["/scheme", "/scheme-and-host", "/scheme-and-status", "/scheme-and-host-and-status",
                             "/port", "/port-and-host", "/port-and-status", "/port-and-host-and-status",
                             "/scheme-nil-and-port-80", "/scheme-https-and-port-443", "/scheme-https-and-port-8443",
                             "/scheme-http-and-port-nil"]) == [
        (302, "https://example.com/scheme"), (302, "https://example.org/scheme-and-host"),
        (301, "https://example.com/scheme-and-status"), (302, "https://example.org/scheme-and-host-and-status"),
        (302, "http://example.com:8083/port"), (302, "http://example.org:8083/port-and-host"),
        (301, "http://example.com:8083/port-and-status"), (302, "http://example.org:8083/port-and-host-and-status"),
        (302, "http://example.org/scheme-nil-and-port-80"), (302, "https://example.org/scheme-https-and-port-443"),
        (302, "https://example.org:8443/scheme-https-and-port-8443"),
        (302, "http://example.org/scheme-http-and-port-nil"),
    ]
    assert port > 0


def mirrored(echo: Echo, path: str, n: int, timeout: float = 10.0) -> int:
    """Copies of `path` the mirror target received, once their number stops growing (they are sent aside;
    on a loaded machine a copy can trail its request by more than half a second, so wait 1.5 s of quiet)."""
    deadline = time.monotonic() + timeout
    last, stable = -1, 0
    while time.monotonic() < deadline:
        count = len(echo.seen(path))
        stable = stable + 1 if count == last else 0
        if count >= n or stable >= 75:  # 1.5 s without a new copy
            return count
        last = count
        time.sleep(0.02)
    return len(echo.seen(path))


# HTTPRouteRequestMirror
def test_request_mirror(suite: Conformance) -> None:
    suite.apply(HR + f"""metadata: {{name: request-mirror}}
spec:
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /mirror}}}}]
    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: infra-backend-v2}}}}}}]
    backendRefs: [{{name: infra-backend-v1}}]
  - matches: [{{path: {{type: PathPrefix, value: /mirror-and-modify-headers}}}}]
    filters:
    - {{type: RequestHeaderModifier, requestHeaderModifier: {HEADER_EDIT}}}
    - {{type: RequestMirror, requestMirror: {{backendRef: {{name: infra-backend-v2}}}}}}
    backendRefs: [{{name: infra-backend-v1}}]
""")
    assert suite.send("/mirror").backend == V1
    assert mirrored(suite.echoes[V2], "/mirror", 1) == 1
    r = suite.send("/mirror-and-modify-headers",
                   headers={"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1"})
    assert (r.backend, r.upstream_header("X-Header-Add-Append"), r.upstream_header("X-Header-Remove")) == (
        V1, "append-val-1,header-val-2", None)
    assert mirrored(suite.echoes[V2], "/mirror-and-modify-headers", 1) == 1
    (copy,) = suite.echoes[V2].seen("/mirror-and-modify-headers")
    # The mirrored copy is the request as filtered (the suite checks the mirror's logs for it).
    assert (copy["headers"].get("X-Header-Set"), copy["headers"].get("X-Header-Remove")) == (
        ["set-overwrites-values"], None)


# HTTPRouteRequestPercentageMirror: 20 percent and a 25/50 fraction, within the suite's 5-point tolerance.
def test_request_percentage_mirror(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: request-percentage-mirror}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /percent-mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2}, percent: 20}}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /percent-mirror-fraction}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: infra-backend-v2}, fraction: {numerator: 25, denominator: 50}}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /percent-mirror-and-modify-headers}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: """ + HEADER_EDIT + """}
    - {type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2}, percent: 35}}
    backendRefs: [{name: infra-backend-v1}]
""")
    for path, share in [("/percent-mirror", 0.2), ("/percent-mirror-fraction", 0.5),
                        ("/percent-mirror-and-modify-headers", 0.35)]:
        assert Counter(suite.outcomes([(path, {"X-Header-Remove": "remove-val"}, "GET")] * 500)) == {V1: 500}
        got = mirrored(suite.echoes[V2], path, 500) / 500
        assert abs(got - share) <= 0.05, (path, got)
    copies = suite.echoes[V2].seen("/percent-mirror-and-modify-headers")
    assert {(c["headers"].get("X-Header-Set", [""])[0], "X-Header-Remove" in c["headers"]) for c in copies} == {
        ("set-overwrites-values", False)}


# HTTPRouteRequestMultipleMirrors: every mirror of the rule gets a copy of every request (route `mirrors:`).
def test_request_multiple_mirrors(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: request-multiple-mirrors}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /multi-mirror}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v3}}}
    backendRefs: [{name: infra-backend-v1}]
""")
    assert suite.send("/multi-mirror").backend == V1
    assert (mirrored(suite.echoes[V2], "/multi-mirror", 1), mirrored(suite.echoes[V3], "/multi-mirror", 1)) == (1, 1)


# HTTPRouteRequestHeaderModifierBackendWeights: each backend's own filter, seen by that backend only.
def test_backend_request_header_modifier(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: request-header-modifier-backend-weights}
spec:
  rules:
  - backendRefs:
    - name: infra-backend-v1
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v1}]}}]
    - name: infra-backend-v2
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v2}]}}]
""")
    replies = [suite.send(f"/?n={i}") for i in range(20)]
    assert {(r.backend, r.upstream_header("Backend")) for r in replies} == {(V1, V1), (V2, V2)}


# HTTPRouteTimeoutRequest, HTTPRouteTimeoutBackendRequest ("0s" turns the timeout off)
def test_timeouts(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: timeouts}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /disable-request-timeout}}]
    timeouts: {request: 0s}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
    timeouts: {backendRequest: 500ms}
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /disable-backend-timeout}}]
    timeouts: {backendRequest: 0s}
    backendRefs: [{name: infra-backend-v1}]
""")
    check(suite, [("/request-timeout", {}, "GET", V1), ("/request-timeout?delay=1s", {}, "GET", 504),
                  ("/disable-request-timeout?delay=1s", {}, "GET", V1), ("/backend-timeout", {}, "GET", V1),
                  ("/backend-timeout?delay=1s", {}, "GET", 504), ("/disable-backend-timeout?delay=1s", {}, "GET", V1)])


# HTTPRouteRetry (GEP-1731): `attempts` retries after the first try, only for the listed codes.
def test_retry(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: retries}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /retry/code-500-attempts-3}}]
    retry: {codes: [500], attempts: 3}
    backendRefs: [{name: infra-backend-v3}]
  - matches: [{path: {type: PathPrefix, value: /retry/code-all-attempts-2}}]
    retry: {codes: [500, 502, 503, 504], attempts: 2}
    backendRefs: [{name: infra-backend-v3}]
""")
    table = [("/retry/code-500-attempts-3", 500, 2, 200), ("/retry/code-500-attempts-3", 500, 4, 500),
             ("/retry/code-500-attempts-3", 503, 2, 503)]
    table += [("/retry/code-all-attempts-2", code, after, want)
              for code in (500, 502, 503, 504) for after, want in ((1, 200), (3, code))]
    got = []
    for p, c, n, _ in table:
        got.append(suite.send(f"{p}?responseCode={c}&succeedAfter={n}&uuid={uuid.uuid4()}").status)
        # Five 5xx in a row eject an endpoint (turnout's passive health): one answered request between the
        # cases starts each from a healthy endpoint, as the suite's independent probes of its echo pods do.
        assert suite.send(f"{p}?uuid={uuid.uuid4()}").status == 200
    assert list(zip(table, got, strict=True)) == [(t, t[3]) for t in table]


# HTTPRouteNamedRule: rule names become route names (`<route>.<rule>`), and route as before.
def test_named_rules(suite: Conformance) -> None:
    out = suite.apply(HR + """metadata: {name: named-rule}
spec:
  rules:
  - name: named-rule-one
    matches: [{path: {type: PathPrefix, value: /named}}]
    backendRefs: [{name: infra-backend-v1}]
  - matches: [{path: {type: PathPrefix, value: /unnamed}}]
    backendRefs: [{name: infra-backend-v2}]
""")
    assert out["changed"] is True
    status, state = suite.turnout.api("GET", "/api/v1/state")
    assert (status, list(state["routes"])) == (200, ["named-rule.named-rule-one", "named-rule.1"])
    check(suite, [("/named", {}, "GET", V1), ("/unnamed", {}, "GET", V2)])


# What the suite expects a Gateway to refuse (ResolvedRefs false, 500 for the rule) turnout refuses at
# apply, naming the field, and the serving state stays as it was: HTTPRouteInvalidBackendRefUnknownKind,
# HTTPRouteInvalidNonExistentBackendRef, HTTPRouteInvalidCrossNamespaceBackendRef, HTTPRouteOmittedBackendRefs
# (no backendRefs), and filters turnout does not have.
def test_disallowed_inputs_are_refused(suite: Conformance) -> None:
    suite.apply(MATCHING)
    before = suite.turnout.api("GET", "/api/v1/state")[1]["revision"]
    assert suite.refused(HR + """metadata: {name: invalid, namespace: gateway-conformance-infra}
spec:
  rules:
  - backendRefs: [{group: unknownkind.example.com, kind: NonExistent, name: infra-backend-v1}]
  - backendRefs: [{name: nonexistent}]
  - backendRefs: [{name: infra-backend-v1, namespace: gateway-conformance-web-backend}]
  - matches: [{path: {type: Exact, value: /omitted-no-forward}}]
  - matches: [{path: {type: Exact, value: /ext}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Filter, name: f}}]
    backendRefs: [{name: infra-backend-v1}]
""") == [
        ("HTTPRoute invalid: spec.rules[0].backendRefs[0].kind", "backend unknownkind.example.com/NonExistent is not "
         "supported: turnout sends traffic to versions, named as Services (kind Service, group \"\")"),
        ("HTTPRoute invalid: spec.rules[2].backendRefs[0].namespace", "a backend in namespace "
         "'gateway-conformance-web-backend' is outside the route's; HTTPRoute refuses it without a ReferenceGrant, "
         "and turnout has no namespaces"),
        ("HTTPRoute invalid: spec.rules[3].backendRefs", "a rule without backendRefs answers 500 to everything "
         "(HTTPRoute); turnout needs a version: give one with weight 0 for the same answer"),
        ("HTTPRoute invalid: spec.rules[4].filters[0].type", "ExtensionRef filters are not supported; ignoring one "
         "would change what requests get, so the route is refused"),
        ("HTTPRoute invalid: spec.rules[1].backendRefs[0].name", "unknown version 'nonexistent': define it in a "
         "turnout/v1 Version document or a route file in the same stream, or register it first"),
    ]
    assert suite.turnout.api("GET", "/api/v1/state")[1]["revision"] == before
    assert suite.send("/v2").backend == V2


# All weights 0: HTTPRoute answers 500 (turnout's all-zero split does the same).
def test_all_zero_weights_answer_500(suite: Conformance) -> None:
    suite.apply(HR + """metadata: {name: zero}
spec:
  rules:
  - backendRefs: [{name: infra-backend-v1, weight: 0}, {name: infra-backend-v2, weight: 0}]
""")
    check(suite, [("/", {}, "GET", 500)])


def cli(suite: Conformance, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TURNOUT_ADMIN_TOKEN": suite.turnout.token}
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--admin", suite.turnout.admin], input=stdin,
                          capture_output=True, text=True, env=env, timeout=30, check=False)


# `turnout apply` of an HTTPRoute stream prints the translation's warnings; `turnout export --format
# httproute` writes the state back as HTTPRoute documents that apply to the very same state ("no change").
def test_cli_apply_warns_and_export_applies_back(suite: Conformance, tmp_path: Path) -> None:
    f = tmp_path / "canary.yaml"
    f.write_text(example(suite.echoes).replace("spec:\n  hostnames:", "spec:\n  parentRefs: [{name: gw}]\n"
                                               "  hostnames:"))
    applied = cli(suite, "apply", str(f))
    assert (applied.returncode, applied.stderr) == (0, f"{f}: warning: HTTPRoute shop: spec.parentRefs: ignored: "
                                                       "turnout's listeners serve every route (no Gateway to attach "
                                                       "to)\n")
    exported = cli(suite, "export", "--format", "httproute")
    assert exported.returncode == 0, exported.stderr
    again = cli(suite, "apply", "-", stdin=exported.stdout)
    assert (again.returncode, again.stdout.startswith("no change (revision "), again.stderr) == (0, True, ""), again
    one = cli(suite, "export", "shop.main")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(one.stdout)] == ["shop-v1", "shop-v2", "shop.main"]
    assert canary_outcome(suite) == (V2, {V1: 90, V2: 10})
    rev = suite.turnout.api("GET", "/api/v1/state")[1]["revision"]
    earlier = cli(suite, "export", "--revision", str(rev - 1))
    assert (earlier.returncode, earlier.stdout.count("kind: HTTPRoute")) == (0, 1)  # the last test's route
