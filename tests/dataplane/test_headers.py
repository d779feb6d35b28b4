"""Header rules: Host validation, hop-by-hop removal, trusted forwarding headers, upgrades (proxy.dataplane.headers)."""

from __future__ import annotations

import pytest

from tests.dataplane.helpers import (
    POST,
    Client,
    ok,
    simple_route,
    start_proxy,
    table,
    version,
)


async def test_host_with_userinfo_or_garbage_is_refused(slow_body_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = slow_body_proxy
    c = await Client.open(p.port)
    try:
        r = await c.request(b"GET / HTTP/1.1\r\nHost: app:@evil.example\r\n\r\n")
        assert r.status == 400
        assert a.nothing_received
    finally:
        c.close()


async def test_connection_header_cannot_remove_host(slow_body_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = slow_body_proxy
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="Connection: host\r\n")
        assert r.status == 200
        assert a.traffic[0].header("host") == "app"
    finally:
        c.close()


async def test_underscore_spellings_of_trusted_headers_are_not_forwarded(slow_body_proxy) -> None:  # type: ignore[no-untyped-def]
    p, a = slow_body_proxy
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="X_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil\r\n"
                                   "X_Turnout_Version: evil\r\nX_Turnout_Route: evil\r\nX-Kept: yes\r\n")
        assert r.status == 200
        names = {n.lower() for n, _ in a.traffic[0].headers}
        assert names.isdisjoint({"x_forwarded_for", "x_forwarded_host", "x_turnout_version", "x_turnout_route"})
        assert a.traffic[0].header("x-kept") == "yes"
    finally:
        c.close()


async def test_upgrade_other_than_websocket_is_not_forwarded(upstreams) -> None:  # type: ignore[no-untyped-def]
    async def h(req, reader, writer):  # type: ignore[no-untyped-def]
        if req.header("upgrade") == "h2c":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            await writer.drain()
            data = await reader.read(1000)
            writer.write(b"TUNNEL:" + data)
            await writer.drain()
            return None
        return ok()

    a = await upstreams(h)
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    c = await Client.open(p.port)
    try:
        r = await c.get("/", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
        assert r.status == 200
        assert a.traffic[0].header("upgrade") is None
    finally:
        c.close()
        await p.dp.shutdown(0.5)


@pytest.mark.parametrize("named", ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Turnout-Version",
                                   "X-Turnout-Route", "Content-Length", "Transfer-Encoding"])
async def test_connection_cannot_remove_headers_the_proxy_adds(fast_proxy, named: str) -> None:  # type: ignore[no-untyped-def]
    p, a = fast_proxy
    c = await Client.open(p.port)
    try:
        r = await c.request(POST + b"Connection: keep-alive, %b\r\nContent-Length: 2\r\n\r\nhi" % named.encode())
        assert r.status == 200
        (req,) = a.traffic
        assert (req.header("x-forwarded-for"), req.header("x-forwarded-proto")) == ("127.0.0.1", "http")
        assert (req.header("x-forwarded-host"), req.header("x-turnout-route")) == ("app", "web")
        assert (req.header("x-turnout-version"), req.header("content-length"), req.body) == ("v1", "2", b"hi")
    finally:
        c.close()
