"""Matches, filters, timeouts and retry of the native route syntax, end to end (issue 14, SPEC-R4 part A).

Each test parses a route file (proxy.parse), serves it through a real proxy to real local upstreams that
answer with what they received (JSON: method, target, headers, upstream name), and asks with httpx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.parse import parse_document
from proxy.table import RouteTable
from tests.dataplane.helpers import Proxy, Request, Upstream, start_proxy


def echo(name: str) -> Any:
    async def handler(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        body = json.dumps({"up": name, "method": req.method, "target": req.target,
                           "headers": [[n.lower(), v] for n, v in req.headers]}).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: echo\r\nX-Debug: on\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return handler


class Setup:
    def __init__(self, proxy: Proxy, ups: dict[str, Upstream]) -> None:
        self.proxy = proxy
        self.ups = ups

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


@pytest.fixture
async def serve(upstreams) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    """serve(routes, handlers=None) -> Setup: versions v1, v2 (echo upstreams a, b) and the given routes."""
    proxies: list[Proxy] = []

    async def make(routes: list[dict[str, Any]], handlers: dict[str, Any] | None = None) -> Setup:
        handlers = handlers or {}
        a = await upstreams(handler=handlers.get("v1", echo("a")), name="a")
        b = await upstreams(handler=handlers.get("v2", echo("b")), name="b")
        doc = {"versions": {"v1": {"endpoints": [a.url], "health": {"path": "/healthz", "interval": 60}},
                            "v2": {"endpoints": [b.url], "health": {"path": "/healthz", "interval": 60}}},
               "routes": routes}
        p = await start_proxy(RouteTable(parse_document(doc), 1))
        proxies.append(p)
        return Setup(p, {"v1": a, "v2": b})

    yield make
    for p in proxies:
        await p.dp.shutdown(0.5)


def upstream_headers(r: httpx.Response, name: str) -> list[str]:
    return [v for n, v in r.json()["headers"] if n == name]


async def test_exact_path_beats_a_longer_prefix_and_regex_paths_match_whole(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([
        {"name": "prefix", "match": {"path_prefix": "/cart/items"}, "split": {"v1": 1}},
        {"name": "exact", "matches": [{"path": {"type": "Exact", "value": "/cart"}}], "split": {"v2": 1}},
        {"name": "regex", "matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+/x"}}],
         "split": {"v2": 1}},
    ])
    async with httpx.AsyncClient(base_url=s.base) as c:
        got = [(p, (await c.get(p)).status_code) for p in ("/cart", "/cart/", "/cart/items/1", "/v12/x", "/v12/xy")]
        ups = [(await c.get(p)).json()["up"] for p in ("/cart", "/cart/items/1", "/v12/x")]
    assert got == [("/cart", 200), ("/cart/", 404), ("/cart/items/1", 200), ("/v12/x", 200), ("/v12/xy", 404)]
    assert ups == ["b", "a", "b"]


async def test_method_header_and_query_matches_are_anded_and_matches_ored(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([
        {"name": "any", "split": {"v1": 1}},
        {"name": "canary", "matches": [
            {"method": "POST", "headers": [{"name": "X-Env", "value": "canary"},
                                           {"name": "X-Build", "value": "^v[0-9]+$", "type": "RegularExpression"}]},
            {"query": [{"name": "debug", "value": "1"}]},
        ], "split": {"v2": 1}},
    ])
    async with httpx.AsyncClient(base_url=s.base) as c:
        cases = [
            (await c.post("/", headers={"X-Env": "canary", "X-Build": "v7"})).json()["up"],
            (await c.get("/", headers={"X-Env": "canary", "X-Build": "v7"})).json()["up"],  # method differs
            (await c.post("/", headers={"X-Env": "canary", "X-Build": "v7x"})).json()["up"],  # regex is whole
            (await c.get("/?debug=1")).json()["up"],
            (await c.get("/?debug=2")).json()["up"],
        ]
    assert cases == ["b", "a", "a", "b", "a"]


async def test_request_header_modifiers_and_rewrite_reach_the_upstream(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{
        "name": "api", "match": {"path_prefix": "/api"}, "split": {"v1": 1},
        "filters": {"request_headers": {"set": {"X-A": "1"}, "add": {"X-B": "2"}, "remove": ["X-C"]},
                    "rewrite": {"hostname": "api.internal", "path": {"type": "ReplacePrefixMatch", "value": "/v2"}}},
    }])
    async with httpx.AsyncClient(base_url=s.base) as c:
        r = await c.get("/api/users?id=7", headers={"X-A": "old", "X-B": "first", "X-C": "gone", "Host": "shop"})
    assert r.status_code == 200
    assert r.json()["target"] == "/v2/users?id=7"
    assert (upstream_headers(r, "host"), upstream_headers(r, "x-a"), upstream_headers(r, "x-b"),
            upstream_headers(r, "x-c"), upstream_headers(r, "x-forwarded-host")) == (
        ["api.internal"], ["1"], ["first", "2"], [], ["shop"])


async def test_full_path_rewrite_keeps_the_query(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{"name": "r", "split": {"v1": 1},
                      "filters": {"rewrite": {"path": {"type": "ReplaceFullPath", "value": "/one"}}}}])
    async with httpx.AsyncClient(base_url=s.base) as c:
        r = await c.get("/any/thing?x=1")
    assert r.json()["target"] == "/one?x=1"


async def test_response_header_modifiers_and_per_version_filters(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{
        "name": "web", "split": {"v1": 0, "v2": 1},
        "filters": {"response_headers": {"set": {"X-D": "1"}, "remove": ["Server"]}},
        "version_filters": {"v2": {"request_headers": {"set": {"X-Canary": "1"}},
                                   "response_headers": {"remove": ["X-Debug"]}}},
    }])
    async with httpx.AsyncClient(base_url=s.base) as c:
        r = await c.get("/")
    assert r.json()["up"] == "b"
    assert upstream_headers(r, "x-canary") == ["1"]
    assert (r.headers.get("x-d"), r.headers.get("server"), r.headers.get("x-debug")) == ("1", None, None)


async def test_redirect_is_answered_locally_with_the_location_the_spec_builds(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([
        {"name": "old", "match": {"path_prefix": "/old"},
         "filters": {"redirect": {"scheme": "https", "hostname": "h.example", "port": 8443,
                                  "path": {"type": "ReplacePrefixMatch", "value": "/new"}, "status": 301}}},
        {"name": "host-only", "match": {"path_prefix": "/moved"},
         "filters": {"redirect": {"hostname": "other.example"}}},
        {"name": "to-https", "match": {"path_prefix": "/secure"}, "filters": {"redirect": {"scheme": "https"}}},
    ])
    async with httpx.AsyncClient(base_url=s.base) as c:
        r1 = await c.get("/old/page?q=1")
        r2 = await c.get("/moved/x", headers={"Host": "shop.example"})
        r3 = await c.get("/secure/x", headers={"Host": "shop.example"})
    port = s.proxy.port
    assert (r1.status_code, r1.headers["location"]) == (301, "https://h.example:8443/new/page?q=1")
    assert (r2.status_code, r2.headers["location"]) == (302, f"http://other.example:{port}/moved/x")
    assert (r3.status_code, r3.headers["location"]) == (302, "https://shop.example/secure/x")
    assert s.ups["v1"].traffic == [] and s.ups["v2"].traffic == []


async def test_all_zero_split_answers_500_without_contacting_a_version(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{"name": "web", "split": {"v1": 0, "v2": 0}}])
    async with httpx.AsyncClient(base_url=s.base) as c:
        r = await c.get("/")
    assert r.status_code == 500
    assert s.ups["v1"].traffic == [] and s.ups["v2"].traffic == []


async def test_backend_request_timeout_answers_504(serve) -> None:  # type: ignore[no-untyped-def]
    async def slow(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        await asyncio.sleep(1.5)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    s = await serve([{"name": "web", "split": {"v1": 1}, "timeouts": {"backend_request": 0.3}}], {"v1": slow})
    # The deadline sweeper runs at a tenth of the route's timeout, not of the proxy's shortest (10 s by default):
    # 0.3 s must not fire anywhere up to 1.3 s.
    assert s.proxy.dp.tick == pytest.approx(0.03)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=s.base) as c:
        t0 = loop.time()
        r = await c.get("/")
        took = loop.time() - t0
    assert r.status_code == 504
    assert 0.25 < took < 1.2


async def test_request_timeout_bounds_the_whole_exchange(serve) -> None:  # type: ignore[no-untyped-def]
    async def slow_body(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(1.5)
        return b"cd"

    s = await serve([{"name": "web", "split": {"v1": 1}, "timeouts": {"request": 0.4}}], {"v1": slow_body})
    async with httpx.AsyncClient(base_url=s.base) as c:
        # The response started in time and did not end in time: it is cut off, never taken as complete.
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get("/")


async def test_retry_codes_replay_idempotent_requests_only(serve) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    async def flaky(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        calls.append(req.method)
        if len(calls) in (1, 3):
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    s = await serve([{"name": "web", "split": {"v1": 1},
                      "retry": {"attempts": 2, "codes": [503], "backoff": 0.05}}], {"v1": flaky})
    async with httpx.AsyncClient(base_url=s.base) as c:
        get = await c.get("/")
        post = await c.post("/", content=b"x")
    assert (get.status_code, get.text) == (200, "ok")
    # A POST that reached the upstream is never replayed: its 503 is the answer.
    assert (post.status_code, post.text) == (503, "busy")
    assert calls == ["GET", "GET", "POST"]
    assert s.proxy.stats.retries == {"web": 1}


async def test_all_zero_split_still_serves_a_pinned_client(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{"name": "web", "identity": [{"header": "X-Client-Id"}], "split": {"v1": 0, "v2": 0},
                      "pins": {"acme": "v2"}}])
    async with httpx.AsyncClient(base_url=s.base) as c:
        pinned = await c.get("/", headers={"X-Client-Id": "acme"})
        other = await c.get("/", headers={"X-Client-Id": "globex"})
    assert (pinned.status_code, pinned.json()["up"], other.status_code) == (200, "b", 500)


async def test_version_filters_apply_to_their_version_only(serve) -> None:  # type: ignore[no-untyped-def]
    s = await serve([{"name": "web", "sticky": False, "split": {"v1": 1, "v2": 1},
                      "version_filters": {"v2": {"request_headers": {"set": {"X-Canary": "1"}}}}}])
    async with httpx.AsyncClient(base_url=s.base) as c:
        answers = [await c.get("/") for _ in range(2)]
    got = sorted((r.json()["up"], tuple(upstream_headers(r, "x-canary"))) for r in answers)
    assert got == [("a", ()), ("b", ("1",))]
