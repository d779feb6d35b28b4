"""Request-side hardening (#11): request lines and paths that nginx refuses. Every refusal reaches no upstream."""

from __future__ import annotations

import asyncio

import pytest

from proxy.settings import Limits
from tests.dataplane.helpers import Client, Proxy, simple_route, start_proxy, table, version

LIMITS = Limits()
FRAMING = LIMITS.max_header_bytes + LIMITS.max_request_line  # the documented bound on framing in a row
CHUNKED = b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
async def env(upstreams):  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    yield p, a
    await p.dp.shutdown(0.5)


async def answer(p: Proxy, raw: bytes) -> tuple[int, bool]:
    """The status the proxy answers `raw` (sent in one write) with, and whether it then closed."""
    c = await Client.open(p.port)
    try:
        r = await c.request(raw)
        if r.header("connection") != "close":
            return r.status, False
        return r.status, await c.closed()
    finally:
        c.close()


# -- item 4: request lines and paths nginx refuses

LINES = {
    "http_2_0": (b"GET /x HTTP/2.0\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_3_0": (b"GET /x HTTP/3.0\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_0_9_line": (b"GET /x HTTP/0.9\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_0_9_simple": (b"GET /x\r\n\r\n", 505, "bad_request"),
    "http_1_2": (b"GET /x HTTP/1.2\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_9_7": (b"GET /x HTTP/9.7\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_1_x": (b"GET /x HTTP/1.x\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_invalid": (b"GET /x/%zz/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_one_digit": (b"GET /x/%4g HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_truncated": (b"GET /x/%4 HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_trailing": (b"GET /x/% HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul": (b"GET /x/%00/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul_before_query": (b"GET /x%00?a=1 HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_invalid_absolute_form": (b"GET http://app/x/%zz/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul_http10": (b"GET /x/%00/ HTTP/1.0\r\n\r\n", 400, "bad_request"),
}


@pytest.mark.parametrize("name", sorted(LINES))
async def test_refused_request_line(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw, status, reason = LINES[name]
    assert await answer(p, raw) == (status, True)
    assert p.stats.rejected == {reason: 1}
    await asyncio.sleep(0.02)
    assert a.nothing_received


ACCEPTED = {
    "http_1_1": (b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n", "/x"),
    "http_1_0": (b"GET /x HTTP/1.0\r\n\r\n", "/x"),
    "http_1_0_host": (b"GET /x HTTP/1.0\r\nHost: app\r\n\r\n", "/x"),
    "pct_valid": (b"GET /x/%2F%41%e9/ HTTP/1.1\r\nHost: app\r\n\r\n", "/x/%2F%41%e9/"),
    "pct_in_query_not_checked": (b"GET /x?q=100%&z=%00 HTTP/1.1\r\nHost: app\r\n\r\n", "/x?q=100%&z=%00"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_accepted_request_line(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw, target = ACCEPTED[name]
    status, _ = await answer(p, raw)
    assert status == 200
    assert [r.target for r in a.traffic] == [target]
    assert p.stats.rejected == {}
