"""HTTP/2 clients (curl, httpx, h2load) through turnout to HTTP/1.1 upstreams: ALPN h2 on a TLS listener,
prior-knowledge h2c on a cleartext one, each stream routed on its own (a 90/10 split exact within one
connection, a weight change reaching an open connection), flow control both ways with slow real peers,
and the graceful stop's GOAWAY."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from proxy.settings import Certificate, Limits, Listener, Settings, Timeouts, TlsConfig
from tests.dataplane.helpers import Client, Proxy, Request, Upstream, ok, simple_route, start_proxy, table, version
from tests.tlscerts import API, CA, Pair


@pytest.fixture
def pair(tmp_path: Path) -> tuple[CA, Pair]:
    ca = CA(tmp_path)
    return ca, ca.issue("api", API)


def h2c_listener() -> Listener:
    return Listener("plain", ("127.0.0.1", 0), protocols=("http/1.1", "h2c"))


def h2_listener(p: Pair) -> Listener:
    return Listener("public", ("127.0.0.1", 0), tls=TlsConfig(certificates=(Certificate(str(p.cert), str(p.key)),)),
                    protocols=("h2", "http/1.1"))


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., asyncio.Future[Proxy]]]:
    started: list[Proxy] = []

    async def make(t: Any, *listeners: Listener, **settings: Any) -> Proxy:
        p = await start_proxy(t, Settings(listen=listeners[0].address, listeners=listeners, **settings))
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        await p.dp.shutdown(0.5)


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_curl_http2_prior_knowledge_on_a_cleartext_h2c_listener_reaches_the_http1_upstream(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    rc, out, err = await curl("--http2-prior-knowledge", "-i", "-H", "X-Test: yes",
                              f"http://127.0.0.1:{p.port}/hello?x=1")
    assert (rc, err) == (0, "")
    assert out.startswith("HTTP/2 200")
    assert out.endswith("\r\n\r\na GET /hello?x=1")
    (req,) = a.traffic
    assert req.head.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % p.port)
    assert (req.header("x-test"), req.header("x-forwarded-proto"), req.header("x-turnout-route")) == (
        "yes", "http", "web")
    assert req.header("content-length") is None and req.header("transfer-encoding") is None


async def test_curl_http2_over_tls_negotiates_h2_by_alpn_and_posts_a_body_with_its_length(
        upstreams: Any, proxies: Any, pair: tuple[CA, Pair]) -> None:
    ca, cert = pair
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2_listener(cert))
    rc, out, err = await curl("--http2", "-i", "--cacert", str(ca.path), "--resolve", f"{API}:{p.port}:127.0.0.1",
                              "--data-binary", "x" * 100_000, f"https://{API}:{p.port}/up")
    assert (rc, err) == (0, "")
    assert out.startswith("HTTP/2 200")
    (req,) = a.traffic
    assert (req.method, req.header("content-length"), req.body) == ("POST", "100000", b"x" * 100_000)
    assert (req.header("x-forwarded-proto"), req.header("host")) == ("https", f"{API}:{p.port}")


async def test_a_tls_listener_without_h2_still_speaks_http1_to_curl_http2(
        upstreams: Any, proxies: Any, pair: tuple[CA, Pair]) -> None:
    ca, cert = pair
    a: Upstream = await upstreams(name="a")
    listener = Listener("public", ("127.0.0.1", 0),
                        tls=TlsConfig(certificates=(Certificate(str(cert.cert), str(cert.key)),)))
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), listener)
    rc, out, err = await curl("--http2", "-i", "--cacert", str(ca.path), "--resolve", f"{API}:{p.port}:127.0.0.1",
                              f"https://{API}:{p.port}/")
    assert (rc, out.split("\r\n")[0]) == (0, "HTTP/1.1 200 OK")


async def test_an_http1_upgrade_to_h2c_is_proxied_as_a_plain_request_without_the_upgrade(
        upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    rc, out, err = await curl("--http2", "-i", f"http://127.0.0.1:{p.port}/u")
    assert (rc, out.split("\r\n")[0]) == (0, "HTTP/1.1 200 OK")
    (req,) = a.traffic
    assert (req.header("upgrade"), req.header("http2-settings"), req.header("connection")) == (None, None, None)


async def test_curl_chunked_upload_without_length_goes_upstream_chunked(upstreams: Any, proxies: Any) -> None:
    a: Upstream = await upstreams(name="a")
    p = await proxies(table([version("v1", a)], [simple_route(("v1", 1.0))]), h2c_listener())
    rc, out, err = await curl("--http2-prior-knowledge", "-T", "-", "-H", "Transfer-Encoding:",
                              f"http://127.0.0.1:{p.port}/put")
    assert rc == 0
    (req,) = a.traffic
    assert (req.method, req.header("transfer-encoding"), req.body) == ("PUT", "chunked", b"")
