"""proxy/parse_match.py: a route's matches, filters, timeouts and retry in the native syntax; every error names
its field path; regexes go through re2 (refused patterns and patterns over 1,024 characters are errors); the
fields survive the store (a restart) and serialise back to the same state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ValidationError
from proxy.model import Filters, HeaderEdit, Match, PathEdit, Redirect, Retry, Rewrite, Timeouts
from proxy.parse import document_of, parse_document, state_from_stored, state_to_stored

VERSIONS = {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}}


def doc(**route: Any) -> dict[str, Any]:
    return {"versions": VERSIONS, "routes": [{"name": "web", "split": {"v1": 1}, **route}]}


def errors_of(d: object) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(d)
    return [str(x) for x in e.value.errors]


FULL = doc(
    matches=[
        {"host": "shop.example.com", "path": {"type": "Exact", "value": "/cart"}, "method": "GET",
         "headers": [{"name": "X-Env", "value": "canary"},
                     {"name": "X-Build", "value": "^v[0-9]+$", "type": "RegularExpression"}],
         "query": [{"name": "debug", "value": "1"}]},
        {"path_prefix": "/x", "headers": {"X-Env": "canary"}, "query": {"a": "b"}},
    ],
    filters={"request_headers": {"set": {"X-A": "1"}, "add": {"X-B": "2"}, "remove": ["X-C"]},
             "response_headers": {"set": {"X-D": "1"}, "remove": ["Server"]},
             "rewrite": {"hostname": "api.internal", "path": {"type": "ReplaceFullPath", "value": "/v2"}}},
    version_filters={"v2": {"request_headers": {"set": {"X-Canary": "1"}},
                            "response_headers": {"remove": ["X-Debug"]}}},
    timeouts={"request": 10, "backend_request": 2},
    retry={"attempts": 2, "codes": [502, 503, 504], "backoff": 0.1},
    split={"v1": 90, "v2": 10},
)


def test_every_field_of_spec_part_a_parses_into_the_model() -> None:
    r = parse_document(FULL).routes[0]
    assert r.matches == (
        Match("shop.example.com", "/cart", (("x-env", "canary"),), "Exact", "GET", (("x-build", "^v[0-9]+$"),),
              (("debug", "1"),)),
        Match(None, "/x", (("x-env", "canary"),), query=(("a", "b"),)),
    )
    assert r.filters == Filters(HeaderEdit((("X-A", "1"),), (("X-B", "2"),), ("X-C",)),
                                HeaderEdit((("X-D", "1"),), (), ("Server",)),
                                Rewrite("api.internal", PathEdit("ReplaceFullPath", "/v2")))
    assert r.version_filters == (("v2", Filters(HeaderEdit((("X-Canary", "1"),)), HeaderEdit(remove=("X-Debug",)))),)
    assert (r.timeouts, r.retry) == (Timeouts(10.0, 2.0), Retry(2, (502, 503, 504), 0.1))


def test_the_fields_round_trip_through_the_route_file_and_the_stored_form() -> None:
    state = parse_document(FULL)
    assert parse_document(document_of(state)) == state
    assert state_from_stored(json.loads(json.dumps(state_to_stored(state)))) == state


def test_a_redirect_needs_no_split_and_round_trips() -> None:
    d = {"versions": VERSIONS, "routes": [{"name": "old", "match": {"path_prefix": "/old"}, "filters": {"redirect": {
        "scheme": "https", "hostname": "h.example", "port": 8443,
        "path": {"type": "ReplacePrefixMatch", "value": "/new"}, "status": 301}}}]}
    state = parse_document(d)
    assert state.routes[0].filters == Filters(redirect=Redirect("https", "h.example", 8443,
                                                                PathEdit("ReplacePrefixMatch", "/new"), 301))
    assert state.routes[0].split == ()
    assert state_from_stored(json.loads(json.dumps(state_to_stored(state)))) == state


def test_errors_name_the_field_path() -> None:
    assert errors_of(doc(matches=[{"path_prefix": "/"}, {"path": {"type": "Foo", "value": "/"}}])) == [
        "routes[0].matches[1].path.type: expected one of Exact, PathPrefix, RegularExpression, got 'Foo'"]
    assert errors_of(doc(matches=[{"method": "FETCH"}])) == [
        "routes[0].matches[0].method: expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, "
        "got 'FETCH'"]
    assert errors_of(doc(matches=[{"headers": [{"name": "X-A", "value": "1", "type": "Prefix"}]}])) == [
        "routes[0].matches[0].headers[0].type: expected one of Exact, RegularExpression, got 'Prefix'"]
    assert errors_of(doc(matches=[{"query": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]}])) == [
        "routes[0].matches[0].query[1].name: duplicate name 'a' (each name is matched once)"]
    assert errors_of(doc(match={"path_prefix": "/"}, matches=[{"path_prefix": "/"}])) == [
        "routes[0].matches: give either match (one) or matches (a list), not both"]
    assert errors_of(doc(matches=[])) == ["routes[0].matches: expected a non-empty list of matches, got a list"]
    assert errors_of(doc(matches=[{"path": {"type": "Exact", "value": "cart"}}])) == [
        "routes[0].matches[0].path.value: expected a path starting with / (no query), got 'cart'"]


def test_regexes_re2_refuses_and_overlong_ones_are_errors() -> None:
    assert errors_of(doc(matches=[{"path": {"type": "RegularExpression", "value": "(a)\\1"}}])) == [
        "routes[0].matches[0].path.value: not a regular expression re2 accepts (invalid escape sequence: \\1): "
        "'(a)\\\\1'"]
    assert errors_of(doc(matches=[{"headers": [{"name": "X", "value": "(?=x)", "type": "RegularExpression"}]}])) == [
        "routes[0].matches[0].headers[0].value: not a regular expression re2 accepts (invalid perl operator: (?=): "
        "'(?=x)'"]
    long = "a" * 1025
    assert errors_of(doc(matches=[{"query": [{"name": "q", "value": long, "type": "RegularExpression"}]}])) == [
        "routes[0].matches[0].query[0].value: a regular expression is at most 1024 characters, got 1025"]
    assert parse_document(doc(matches=[{"path": {"type": "RegularExpression", "value": "/" + "a" * 1023}}]))


def test_filter_errors() -> None:
    assert errors_of(doc(filters={"request_headers": {"set": {"Content-Length": "1"}}})) == [
        "routes[0].filters.request_headers.set.Content-Length: the proxy manages Content-Length itself; a filter "
        "may not change it"]
    assert errors_of(doc(filters={"request_headers": {"add": {"X-A": "1\r\nX-Evil: 1"}}})) == [
        "routes[0].filters.request_headers.add.X-A: a header value may not hold CR, LF or NUL"]
    assert errors_of(doc(filters={"request_headers": {"set": {"X-A": "1"}, "remove": ["x-a"]}})) == [
        "routes[0].filters.request_headers.remove[0]: header 'x-a' is already named in this modifier"]
    assert errors_of(doc(filters={"redirect": {"status": 304}})) == [
        "routes[0].filters.redirect.status: expected one of 301, 302, 303, 307, 308, got 304"]
    assert errors_of(doc(filters={"redirect": {"scheme": "ftp", "port": 0}})) == [
        "routes[0].filters.redirect.scheme: expected one of http, https, got 'ftp'",
        "routes[0].filters.redirect.port: expected a number >= 1 and <= 65535, got 0"]
    assert errors_of(doc(filters={"redirect": {}, "rewrite": {"hostname": "x"}})) == [
        "routes[0].filters.redirect: a route either redirects or rewrites (and forwards), not both"]
    assert errors_of(doc(matches=[{"path": {"type": "Exact", "value": "/a"}}],
                         filters={"rewrite": {"path": {"type": "ReplacePrefixMatch", "value": "/b"}}})) == [
        "routes[0].filters.rewrite.path.type: ReplacePrefixMatch needs every match of the route to be a PathPrefix "
        "path"]
    assert errors_of(doc(filters={"rewrite": {"path": {"type": "Replace", "value": "/b"}}})) == [
        "routes[0].filters.rewrite.path.type: expected one of ReplaceFullPath, ReplacePrefixMatch, got 'Replace'"]
    assert errors_of(doc(version_filters={"v3": {}, "v2": {"rewrite": {}}})) == [
        "routes[0].version_filters.v3: unknown version 'v3'",
        "routes[0].version_filters.v2.rewrite: unknown field (expected one of: request_headers, response_headers)"]


def test_timeout_and_retry_errors() -> None:
    assert errors_of(doc(timeouts={"request": 1, "backend_request": 2})) == [
        "routes[0].timeouts.backend_request: must not exceed request (1), got 2"]
    assert errors_of(doc(timeouts={"request": 0})) == [
        "routes[0].timeouts.request: expected a number > 0 and <= 86400, got 0"]
    assert errors_of(doc(retry={"attempts": 2, "codes": [404], "backoff": -1})) == [
        "routes[0].retry.codes[0]: expected a number >= 500 and <= 599, got 404",
        "routes[0].retry.backoff: expected a number >= 0 and <= 60, got -1"]


async def test_the_fields_survive_a_store_restart(tmp_path: Path) -> None:
    from proxy import changes
    from proxy.store import SQLiteStore

    state = parse_document(FULL)
    store = SQLiteStore(tmp_path / "s.db")
    rev = await store.update(lambda s: changes.apply_document(s, state), actor="t", reason="gateway fields")
    await store.close()
    reopened = SQLiteStore(tmp_path / "s.db")
    try:
        current = await reopened.current()
        assert current.number == rev.number
        assert current.state.routes == state.routes
    finally:
        await reopened.close()
