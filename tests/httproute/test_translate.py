"""HTTPRoute -> native route-file translation (proxy.httproute): the exact dicts a stream becomes, the
warnings it reports and the errors it refuses with, each by field path."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.errors import ValidationError
from proxy.httproute import is_resource_stream, translate_stream
from proxy.httproute_rules import duration_seconds
from proxy.routefile import load_route_file

VERSIONS = """\
apiVersion: turnout/v1
kind: Version
metadata: {name: v1}
spec: {endpoints: ["http://127.0.0.1:9001"]}
---
apiVersion: turnout/v1
kind: Version
metadata: {name: v2}
spec: {endpoints: ["http://127.0.0.1:9002"]}
---
"""


def route(spec: str, name: str = "shop", annotations: str = "") -> str:
    meta = f"metadata:\n  name: {name}\n" + (f"  annotations:\n{textwrap.indent(annotations, '    ')}"
                                             if annotations else "")
    return (VERSIONS + "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n" + meta + "spec:\n"
            + textwrap.indent(textwrap.dedent(spec), "  "))


def translate(text: str, known: tuple[str, ...] = ()) -> Any:
    return translate_stream(list(yaml.safe_load_all(text)), known)


def routes_of(text: str) -> list[dict[str, Any]]:
    return list(translate(text).document["routes"])


def errors_of(text: str, known: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ValidationError) as e:
        translate(text, known)
    return [str(err) for err in e.value.errors]


def warnings_of(text: str) -> list[str]:
    return [str(w) for w in translate(text).warnings]


def test_versions_and_a_default_rule() -> None:
    t = translate(route("""
        rules:
        - backendRefs: [{name: v1}]
    """))
    assert t.document == {
        "versions": {"v1": {"endpoints": ["http://127.0.0.1:9001"]}, "v2": {"endpoints": ["http://127.0.0.1:9002"]}},
        "routes": [{"name": "shop", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "split": {"v1": 1}}],
    }
    assert t.warnings == []
    assert t.origins == ["HTTPRoute shop: spec.rules[0]"]


def test_route_names_per_rule() -> None:
    rs = routes_of(route("""
        rules:
        - name: main
          backendRefs: [{name: v1}]
        - backendRefs: [{name: v2}]
    """))
    assert [r["name"] for r in rs] == ["shop.main", "shop.1"]
    assert [r["name"] for r in routes_of(route("""
        rules:
        - name: only
          backendRefs: [{name: v1}]
    """))] == ["shop.only"]


def test_hostnames_times_matches_is_a_cross_product() -> None:
    (r,) = routes_of(route("""
        hostnames: [shop.example.com, "*.example.net"]
        rules:
        - matches:
          - path: {type: Exact, value: /cart}
          - headers: [{name: X-Env, value: canary}]
          backendRefs: [{name: v1}]
    """))
    assert r["matches"] == [
        {"host": "shop.example.com", "path": {"type": "Exact", "value": "/cart"}},
        {"host": "*.example.net", "path": {"type": "Exact", "value": "/cart"}},
        {"host": "shop.example.com", "path": {"type": "PathPrefix", "value": "/"},
         "headers": [{"name": "X-Env", "value": "canary"}]},
        {"host": "*.example.net", "path": {"type": "PathPrefix", "value": "/"},
         "headers": [{"name": "X-Env", "value": "canary"}]},
    ]


def test_match_fields() -> None:
    (r,) = routes_of(route("""
        rules:
        - matches:
          - path: {type: RegularExpression, value: "^/v[0-9]+/.*"}
            method: POST
            headers:
            - {name: X-Build, value: "^b[0-9]+$", type: RegularExpression}
            - {name: x-build, value: ignored}
            queryParams:
            - {name: debug, value: "1"}
            - {name: Debug, value: "2"}
          backendRefs: [{name: v1}]
    """))
    assert r["matches"] == [{
        "path": {"type": "RegularExpression", "value": "^/v[0-9]+/.*"},
        "headers": [{"name": "X-Build", "value": "^b[0-9]+$", "type": "RegularExpression"}],
        "query": [{"name": "debug", "value": "1"}, {"name": "Debug", "value": "2"}],
        "method": "POST",
    }]


def test_a_repeated_header_match_name_counts_once_and_says_so() -> None:
    w = warnings_of(route("""
        rules:
        - matches:
          - headers: [{name: X-A, value: "1"}, {name: x-a, value: "2"}]
          backendRefs: [{name: v1}]
    """))
    assert w == ["HTTPRoute shop: spec.rules[0].matches[0].headers[1]: ignored: 'x-a' is matched by an earlier "
                 "entry (only the first one counts)"]


def test_weights_default_zero_and_bounds() -> None:
    (r,) = routes_of(route("""
        rules:
        - backendRefs: [{name: v1, weight: 90}, {name: v2}]
    """))
    assert r["split"] == {"v1": 90, "v2": 1}
    (r,) = routes_of(route("""
        rules:
        - backendRefs: [{name: v1, weight: 0}, {name: v2, weight: 0}]
    """))
    assert r["split"] == {"v1": 0, "v2": 0}
    assert errors_of(route("""
        rules:
        - backendRefs: [{name: v1, weight: 1000001}, {name: v2, weight: -1}]
    """)) == ["HTTPRoute shop: spec.rules[0].backendRefs[0].weight: expected an integer between 0 and 1000000, "
              "got 1000001",
              "HTTPRoute shop: spec.rules[0].backendRefs[1].weight: expected an integer between 0 and 1000000, "
              "got -1"]


def test_filters() -> None:
    (r,) = routes_of(route("""
        rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          filters:
          - type: RequestHeaderModifier
            requestHeaderModifier:
              set: [{name: X-A, value: "1"}]
              add: [{name: X-B, value: "2"}]
              remove: [X-C]
          - type: ResponseHeaderModifier
            responseHeaderModifier: {remove: [Server]}
          - type: URLRewrite
            urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
          backendRefs:
          - name: v1
          - name: v2
            filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: X-Canary, value: "1"}]}
    """))
    assert r["filters"] == {
        "request_headers": {"set": {"X-A": "1"}, "add": {"X-B": "2"}, "remove": ["X-C"]},
        "response_headers": {"remove": ["Server"]},
        "rewrite": {"hostname": "api.internal", "path": {"type": "ReplacePrefixMatch", "value": "/v2"}},
    }
    assert r["version_filters"] == {"v2": {"request_headers": {"set": {"X-Canary": "1"}}}}


def test_redirect_needs_no_backend_and_defaults_to_302() -> None:
    (r,) = routes_of(route("""
        rules:
        - filters:
          - type: RequestRedirect
            requestRedirect: {scheme: https, hostname: h.example, port: 8443,
                              path: {type: ReplaceFullPath, replaceFullPath: /new}}
    """))
    assert r == {"name": "shop", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "filters": {"redirect": {"scheme": "https", "hostname": "h.example", "port": 8443,
                                          "path": {"type": "ReplaceFullPath", "value": "/new"}, "status": 302}}}
    assert warnings_of(route("""
        rules:
        - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].backendRefs: ignored: the rule's RequestRedirect answers every "
              "request itself"]


def test_mirrors_percent_fraction_and_several() -> None:
    (r,) = routes_of(route("""
        rules:
        - filters:
          - type: RequestMirror
            requestMirror: {backendRef: {name: v2}, fraction: {numerator: 125, denominator: 1000}}
          backendRefs: [{name: v1}]
    """))
    assert r["mirror"] == {"version": "v2", "percent": 12.5}
    (r,) = routes_of(route("""
        rules:
        - filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: v2}, percent: 20}}
          - {type: RequestMirror, requestMirror: {backendRef: {name: v1}}}
          backendRefs: [{name: v1}]
    """))
    assert r["mirrors"] == [{"version": "v2", "percent": 20}, {"version": "v1", "percent": 100}]
    assert errors_of(route("""
        rules:
        - filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: v2}, percent: 20, fraction: {numerator: 1}}}
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].filters[0].requestMirror: give percent or fraction, not both"]


def test_timeouts_retry_and_durations() -> None:
    (r,) = routes_of(route("""
        rules:
        - timeouts: {request: 10s, backendRequest: 500ms}
          retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
          backendRefs: [{name: v1}]
    """))
    assert r["timeouts"] == {"request": 10.0, "backend_request": 0.5}
    assert r["retry"] == {"attempts": 2, "codes": [502, 503], "backoff": 0.1}
    assert duration_seconds("1h30m") == 5400.0
    assert duration_seconds("2s500ms") == 2.5
    assert errors_of(route("""
        rules:
        - timeouts: {request: 1s, backendRequest: 2s}
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request "
              "(HTTPRoute)"]
    assert errors_of(route("""
        rules:
        - timeouts: {request: 10}
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].timeouts.request: expected a Gateway API duration like 10s, 500ms or "
              "1h30m, got 10"]


def test_session_persistence() -> None:
    (r,) = routes_of(route("""
        rules:
        - sessionPersistence: {sessionName: shop-session, type: Cookie}
          backendRefs: [{name: v1}]
    """))
    assert r["assignment_cookie"] == "shop-session"
    (r,) = routes_of(route("""
        rules:
        - sessionPersistence: {}
          backendRefs: [{name: v1}]
    """))
    assert r["assignment_cookie"] == "turnout-session"
    text = route("""
        rules:
        - sessionPersistence: {sessionName: X-Session, type: Header, absoluteTimeout: 1h}
          backendRefs: [{name: v1}]
    """)
    (r,) = routes_of(text)
    assert (r["identity"], r["sticky"]) == ([{"header": "X-Session"}], True)
    assert warnings_of(text) == [
        "HTTPRoute shop: spec.rules[0].sessionPersistence.absoluteTimeout: not enforced: without "
        "cookieConfig.lifetimeType Permanent (a Max-Age) the assignment lasts as long as the client keeps its session "
        "cookie",
        "HTTPRoute shop: spec.rules[0].sessionPersistence.type: Header: sessions stick by the header's value "
        "(sticky buckets): they hold while the weights stay, not at weight 0 as GEP-1619 asks; type Cookie does",
    ]


def test_a_permanent_session_cookie_gets_its_max_age() -> None:
    (r,) = routes_of(route("""
        rules:
        - sessionPersistence: {sessionName: s, absoluteTimeout: 1h30m, idleTimeout: 10m,
                               cookieConfig: {lifetimeType: Permanent}}
          backendRefs: [{name: v1}]
    """))
    assert (r["assignment_cookie"], r["assignment_cookie_max_age"]) == ("s", 5400)
    assert errors_of(route("""
        rules:
        - sessionPersistence: {cookieConfig: {lifetimeType: Permanent}}
          backendRefs: [{name: v1}]
        - sessionPersistence: {absoluteTimeout: 1500ms, cookieConfig: {lifetimeType: Permanent}}
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].sessionPersistence.absoluteTimeout: a Permanent cookie needs "
              "absoluteTimeout (its Max-Age)",
              "HTTPRoute shop: spec.rules[1].sessionPersistence.absoluteTimeout: a cookie's Max-Age is whole seconds "
              "(at least 1s)"]
    state = load_route_file(route("""
        rules:
        - sessionPersistence: {sessionName: s, absoluteTimeout: 1h, cookieConfig: {lifetimeType: Permanent}}
          backendRefs: [{name: v1}]
    """))
    assert (state.routes[0].assignment_cookie, state.routes[0].assignment_cookie_max_age) == ("s", 3600)
    with pytest.raises(ValidationError) as e:
        load_route_file("versions: {v1: {endpoints: ['http://127.0.0.1:9001']}}\n"
                        "routes: [{name: w, split: {v1: 1}, assignment_cookie_max_age: 0}]\n")
    assert [str(x) for x in e.value.errors] == [
        "routes[0].assignment_cookie_max_age: expected a number between 1 and 3.456e+07, got 0",
        "routes[0].assignment_cookie_max_age: needs assignment_cookie (the cookie it is the lifetime of)"]


def test_annotations() -> None:
    (r,) = routes_of(route("""
        rules:
        - backendRefs: [{name: v1, weight: 90}, {name: v2, weight: 10}]
    """, annotations="""\
turnout/pins: "acme=v2, bigbank=v1"
turnout/fallback: "v1,v2"
turnout/identity: "header:X-Client-Id,cookie:client_id"
turnout/sticky: "true"
turnout/expose-version: "true"
turnout/assignment-cookie: tv
kubectl.kubernetes.io/last-applied-configuration: "{}"
"""))
    assert r == {"name": "shop", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "split": {"v1": 90, "v2": 10}, "pins": {"acme": "v2", "bigbank": "v1"}, "fallback": ["v1", "v2"],
                 "identity": [{"header": "X-Client-Id"}, {"cookie": "client_id"}], "sticky": True,
                 "expose_version": True, "assignment_cookie": "tv"}
    (r,) = routes_of(route("""
        rules:
        - backendRefs: [{name: v1}]
    """, annotations="""\
turnout/pins: '{"a,b": "v1"}'
turnout/identity: '[{"api_key": {"header": "X-Key", "keys": "/k"}}]'
turnout/require-identity: "false"
"""))
    assert (r["pins"], r["identity"], r["require_identity"]) == (
        {"a,b": "v1"}, [{"api_key": {"header": "X-Key", "keys": "/k"}}], False)


def test_unknown_turnout_annotation_and_bad_values_are_errors() -> None:
    assert errors_of(route("""
        rules:
        - backendRefs: [{name: v1}]
    """, annotations="""\
turnout/pin: "a=v1"
turnout/sticky: "yes"
turnout/pins: "acme=v9"
""")) == [
        'HTTPRoute shop: metadata.annotations["turnout/pin"]: unknown turnout annotation (expected one of: '
        "turnout/assignment-cookie, turnout/expose-version, turnout/fallback, turnout/identity, turnout/pins, "
        "turnout/pins-require-verified, turnout/require-identity, turnout/sticky)",
        'HTTPRoute shop: metadata.annotations["turnout/sticky"]: expected "true" or "false", got \'yes\'',
        "HTTPRoute shop: metadata.annotations[\"turnout/pins\"]: unknown version 'v9': define it in a turnout/v1 "
        "Version document or a route file in the same stream, or register it first",
    ]


def test_ignored_fields_are_warnings_naming_the_path() -> None:
    text = VERSIONS + """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec: {}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: shop, namespace: infra}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: v1, port: 8080, namespace: infra}]
"""
    assert warnings_of(text) == [
        "Gateway gw: apiVersion 'gateway.networking.k8s.io/v1' kind 'Gateway': ignored (turnout reads HTTPRoute "
        "and turnout/v1 Version documents)",
        "HTTPRoute shop: metadata.namespace: ignored: turnout has one namespace (route names are unique across the "
        "stream)",
        "HTTPRoute shop: spec.parentRefs: ignored: turnout's listeners serve every route (no Gateway to attach to)",
        "HTTPRoute shop: spec.rules[0].backendRefs[0].port: ignored: a version's endpoints carry their ports",
    ]


def test_what_would_change_routing_is_refused() -> None:
    assert errors_of(route("""
        rules:
        - filters:
          - {type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}
          - {type: CORS, cors: {}}
          backendRefs:
          - {name: v1, kind: Bucket, group: storage.example}
          - {name: v2, namespace: other}
          - {name: v3}
    """)) == [
        "HTTPRoute shop: spec.rules[0].filters[0].type: ExtensionRef filters are not supported; ignoring one would "
        "change what requests get, so the route is refused",
        "HTTPRoute shop: spec.rules[0].filters[1].type: CORS filters are not supported; ignoring one would change "
        "what requests get, so the route is refused",
        "HTTPRoute shop: spec.rules[0].backendRefs[0].kind: backend storage.example/Bucket is not supported: "
        "turnout sends traffic to versions, named as Services (kind Service, group \"\")",
        "HTTPRoute shop: spec.rules[0].backendRefs[1].namespace: a backend in namespace 'other' is outside the "
        "route's; HTTPRoute refuses it without a ReferenceGrant, and turnout has no namespaces",
        "HTTPRoute shop: spec.rules[0].backendRefs[2].name: unknown version 'v3': define it in a turnout/v1 Version "
        "document or a route file in the same stream, or register it first",
    ]


def test_invalid_inputs_the_api_server_refuses() -> None:
    assert errors_of(route("""
        hostnames: ["Shop.Example.com", "10.0.0.1"]
        rules:
        - matches:
          - path: {type: Exact, value: "/a//b"}
          - path: {type: PathPrefix, value: "no-slash"}
          - method: FETCH
          filters:
          - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}
          - {type: RequestRedirect, requestRedirect: {statusCode: 304}}
          backendRefs: [{name: v1}]
        - backendRefs: []
    """)) == [
        "HTTPRoute shop: spec.hostnames[0]: expected a hostname (exact or *.domain, lower case, not an IP), got "
        "'Shop.Example.com'",
        "HTTPRoute shop: spec.hostnames[1]: expected a hostname (exact or *.domain, lower case, not an IP), got "
        "'10.0.0.1'",
        "HTTPRoute shop: spec.rules[0].matches[0].path.value: path '/a//b' is refused by the Gateway API's "
        "validation (no //, /./, /../, %2f, #, a trailing /. or /.., and only URL path characters)",
        "HTTPRoute shop: spec.rules[0].matches[1].path.value: expected an absolute path starting with / (at most "
        "1024 characters), got 'no-slash'",
        "HTTPRoute shop: spec.rules[0].matches[2].method: expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, "
        "OPTIONS, TRACE, PATCH, got 'FETCH'",
        "HTTPRoute shop: spec.rules[0].filters[1].requestRedirect.statusCode: expected one of 301, 302, 303, 307, "
        "308, got 304",
        "HTTPRoute shop: spec.rules[1].backendRefs: a rule without backendRefs answers 500 to everything "
        "(HTTPRoute); turnout needs a version: give one with weight 0 for the same answer",
    ]


def test_redirect_and_rewrite_exclude_each_other() -> None:
    assert errors_of(route("""
        rules:
        - filters:
          - {type: URLRewrite, urlRewrite: {hostname: a.example}}
          - {type: RequestRedirect, requestRedirect: {statusCode: 301}}
          - {type: URLRewrite, urlRewrite: {hostname: b.example}}
    """)) == [
        "HTTPRoute shop: spec.rules[0].filters[2].type: a second URLRewrite filter (HTTPRoute allows one per rule)",
        "HTTPRoute shop: spec.rules[0].filters: RequestRedirect and URLRewrite cannot both be given (HTTPRoute)",
    ]


def test_replace_prefix_match_needs_prefix_matches() -> None:
    assert errors_of(route("""
        rules:
        - matches: [{path: {type: Exact, value: /a}}]
          filters:
          - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}
          backendRefs: [{name: v1}]
    """)) == ["HTTPRoute shop: spec.rules[0].filters[0].urlRewrite.path.type: ReplacePrefixMatch needs every match of "
              "the rule to be a PathPrefix match"]


def test_versions_may_be_registered_already_or_in_a_route_file_document() -> None:
    text = """\
versions:
  v1: {endpoints: ["http://127.0.0.1:9001"]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  rules:
  - backendRefs: [{name: v1, weight: 9}, {name: old, weight: 1}]
"""
    t = translate(text, known=("old",))
    assert t.borrowed == {"old"}
    assert t.document["versions"] == {"v1": {"endpoints": ["http://127.0.0.1:9001"]}}


def test_stream_detection_and_unsupported_documents() -> None:
    assert not is_resource_stream([{"versions": {}, "routes": []}])
    assert not is_resource_stream([None])
    assert is_resource_stream([{"versions": {}}, {"routes": []}])
    assert is_resource_stream([{"apiVersion": "turnout/v1", "kind": "Version"}])
    assert errors_of("""\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: HTTPRoute
metadata: {name: old}
---
apiVersion: turnout/v1
kind: Route
metadata: {name: r}
""") == [
        "HTTPRoute old: apiVersion: 'gateway.networking.k8s.io/v1alpha2' kind 'HTTPRoute' is not supported (expected "
        "gateway.networking.k8s.io/v1 or gateway.networking.k8s.io/v1beta1 HTTPRoute, or turnout/v1 Version)",
        "Route r: apiVersion: 'turnout/v1' kind 'Route' is not supported (expected gateway.networking.k8s.io/v1 or "
        "gateway.networking.k8s.io/v1beta1 HTTPRoute, or turnout/v1 Version)",
    ]


def test_a_version_defined_twice_differently_is_an_error() -> None:
    assert errors_of(VERSIONS + """\
apiVersion: turnout/v1
kind: Version
metadata: {name: v1}
spec: {endpoints: ["http://127.0.0.1:9999"]}
""") == ["Version v1: spec: version 'v1' is defined differently at Version v1: spec"]


def test_native_errors_are_reported_at_the_document_they_came_from() -> None:
    with pytest.raises(ValidationError) as e:
        load_route_file("""\
apiVersion: turnout/v1
kind: Version
metadata: {name: v1}
spec: {endpoints: ["ftp://127.0.0.1:9001"]}
---
versions:
  v2: {endpoints: ["http://127.0.0.1:9002"]}
routes:
  - {name: web, split: {v2: 1}, sticky: maybe}
""")
    assert [str(err) for err in e.value.errors] == [
        "Version v1: spec.endpoints[0]: expected an http(s)://host:port URL (no path), got 'ftp://127.0.0.1:9001'",
        "documents[1].routes[0].sticky: expected true or false, got a string",
    ]


def test_a_single_native_document_reads_as_before() -> None:
    state = load_route_file("versions:\n  v1: {endpoints: ['http://127.0.0.1:9001']}\nroutes:\n"
                            "  - {name: web, split: {v1: 1}}\n")
    assert [r.name for r in state.routes] == ["web"]


def test_the_readme_canary_reads_the_same_in_both_syntaxes() -> None:
    # The README's two canary blocks (native, then HTTPRoute) must stay the same state.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    native_text = next(b for b in blocks if "routes:" in b and "split: {v1: 95, v2: 5}" in b)
    httproute_text = next(b for b in blocks if "kind: HTTPRoute" in b)
    native = load_route_file(native_text)
    httproute = load_route_file(httproute_text)
    assert httproute == native
