"""Real gRPC on both sides: grpcio servers as two versions (h2c upstreams), grpcio clients on ONE channel
through turnout's h2c listener. Every call is routed by itself, so a split, a pin, a weight change and a
rollback act per call on a channel that never reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from proxy import changes
from proxy.model import HealthCheck, IdentitySource, Version, VersionSpec
from proxy.settings import Listener, Settings, Timeouts
from proxy.table import RouteTable
from tests.dataplane.grpcpeer import GrpcServer, stream, unary
from tests.dataplane.helpers import Proxy, simple_route, start_proxy, table

TIMEOUTS = Timeouts(header_read=2.0, keepalive_idle=30.0, upstream_connect=1.0, upstream_response=5.0,
                    upstream_idle=5.0, body_read_idle=5.0)


def grpc_version(name: str, url: str, service: str = "") -> Version:
    spec = VersionSpec(kind="static", endpoints=(url,), protocol="h2c",
                       health=HealthCheck(interval=0.2, timeout=0.5, grpc=service))
    return Version(name=name, spec=spec, endpoints=(url,))


@pytest.fixture
def servers() -> Any:
    started: list[GrpcServer] = []

    def make(name: str) -> GrpcServer:
        s = GrpcServer(name).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Any]]:
    started: list[Proxy] = []

    async def make(versions: list[Version], **route: Any) -> Proxy:
        split = route.pop("split")
        listener = Listener("plain", ("127.0.0.1", 0), protocols=("http/1.1", "h2c"))
        p = await start_proxy(table(versions, [simple_route(*split, **route)]),
                              Settings(listen=listener.address, listeners=(listener,), timeouts=TIMEOUTS))
        started.append(p)
        return p

    yield make
    for p in started:
        await p.dp.shutdown(0.5)


async def healthy(p: Proxy, *names: str) -> None:
    """Wait for the first gRPC health check of each version (they start optimistic anyway)."""
    for _ in range(100):
        if all(ep.active_ok for ep in p.dp.endpoints.values() if ep.version in names):
            return
        await asyncio.sleep(0.02)


def channel(p: Proxy) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{p.port}")


async def test_unary_streaming_and_trailing_metadata_through_the_proxy(servers: Any, proxy: Any) -> None:
    v1 = servers("v1")
    p = await proxy([grpc_version("v1", v1.url)], split=[("v1", 1.0)])

    def calls() -> tuple[bytes, list[bytes], Any, Any]:
        with channel(p) as ch:
            one = unary(ch)(b"hi", timeout=5)
            many = list(stream(ch)(b"3", timeout=5))
            _, call = unary(ch, "Trailers").with_call(b"x", timeout=5)
            try:
                unary(ch, "Trailers")(b"fail", timeout=5)
            except grpc.RpcError as e:
                failed = (e.code(), e.details(), dict(e.trailing_metadata() or ()))
            return one, many, dict(call.trailing_metadata() or ()), failed

    one, many, trailers, failed = await asyncio.to_thread(calls)
    assert (one, many) == (b"v1:hi", [b"v1:0", b"v1:1", b"v1:2"])
    assert (trailers["x-served-by"], trailers["x-checksum-bin"]) == ("v1", b"\x00\x01")
    assert failed == (grpc.StatusCode.NOT_FOUND, "no such thing", {"x-served-by": "v1",
                                                                   "x-checksum-bin": b"\x00\x01"})
    # Counted by grpc-status: NOT_FOUND is the caller's business, not an error of v1.
    assert p.stats.grpc == {("web", "v1", "0", ""): 3, ("web", "v1", "5", ""): 1}
    assert p.stats.cells["web"]["v1"].grpc_errors == 0


async def test_a_client_pinned_by_metadata(servers: Any, proxy: Any) -> None:
    v1, v2 = servers("v1"), servers("v2")
    p = await proxy([grpc_version("v1", v1.url), grpc_version("v2", v2.url)], split=[("v1", 1.0)],
                    identity=(IdentitySource("header", "x-client-id"),), pins={"alice": "v2"})

    def calls() -> list[bytes]:
        with channel(p) as ch:
            u = unary(ch)
            return [u(b"a", metadata=(("x-client-id", "alice"),), timeout=5), u(b"b", timeout=5),
                    u(b"c", metadata=(("x-client-id", "bob"),), timeout=5)]

    assert await asyncio.to_thread(calls) == [b"v2:a", b"v1:b", b"v1:c"]


async def test_split_shift_and_rollback_act_per_call_on_one_channel(servers: Any, proxy: Any) -> None:
    v1, v2 = servers("v1"), servers("v2")
    p = await proxy([grpc_version("v1", v1.url), grpc_version("v2", v2.url)],
                    split=[("v1", 90.0), ("v2", 10.0)], sticky=False)
    await healthy(p, "v1", "v2")
    ch = channel(p)
    u = unary(ch)
    try:
        answers = await asyncio.to_thread(lambda: [u(b"", timeout=5) for _ in range(1000)])
        # Exact per-call proportions on one channel (one connection to the proxy).
        assert (answers.count(b"v1:"), answers.count(b"v2:")) == (900, 100)
        assert (v1.calls, v2.calls) == (900, 100)
        before = p.holder.table
        shifted, _ = changes.set_split(before.state, "web", {"v1": 0.0, "v2": 100.0})
        p.set_table(RouteTable(shifted, before.revision + 1))
        # The very next call on the open channel goes by the new table.
        assert await asyncio.to_thread(u, b"next", timeout=5) == b"v2:next"
        rolled, _ = changes.rollback_route(shifted, "web", before.state, before.revision)
        p.set_table(RouteTable(rolled, before.revision + 2))
        after = await asyncio.to_thread(lambda: [u(b"", timeout=5) for _ in range(10)])
        assert (after.count(b"v1:"), after.count(b"v2:")) == (9, 1)
    finally:
        ch.close()


async def test_dead_version_is_unavailable_and_a_fallback_serves(servers: Any, proxy: Any) -> None:
    v1 = servers("v1")
    dead = servers("dead")
    dead_url = dead.url
    dead.stop()
    p = await proxy([grpc_version("v1", v1.url), grpc_version("dead", dead_url)], split=[("dead", 1.0)])

    def call() -> tuple[Any, str]:
        with channel(p) as ch:
            try:
                unary(ch)(b"x", timeout=5)
            except grpc.RpcError as e:
                return e.code(), e.details()
        return None, ""

    (ep,) = [e for e in p.dp.endpoints.values() if e.version == "dead"]
    for _ in range(100):  # its gRPC health check fails: then the proxy answers without trying it
        if not ep.active_ok:
            break
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(call) == (grpc.StatusCode.UNAVAILABLE, "no healthy version")
    assert p.stats.grpc == {("web", "dead", "14", ""): 1}
    assert p.stats.cells["web"]["dead"].grpc_errors == 1

    # Before any check said so, the failed connect itself: UNAVAILABLE too (checks stopped to see it).
    p3 = await proxy([grpc_version("dead", dead_url)], split=[("dead", 1.0)])
    for e in p3.dp.endpoints.values():
        p3.dp.health.forget(e)
        e.checked(True)

    def call3() -> tuple[Any, str]:
        with channel(p3) as ch:
            try:
                unary(ch)(b"x", timeout=5)
            except grpc.RpcError as e:
                return e.code(), e.details()
        return None, ""

    assert await asyncio.to_thread(call3) == (grpc.StatusCode.UNAVAILABLE, "upstream unavailable")

    p2 = await proxy([grpc_version("v1", v1.url), grpc_version("dead", dead_url)], split=[("dead", 1.0)],
                     fallback=("v1",))

    def served() -> bytes:
        with channel(p2) as ch:
            return unary(ch)(b"x", timeout=5)

    assert await asyncio.to_thread(served) == b"v1:x"


async def test_a_client_deadline_ends_the_upstream_call(servers: Any, proxy: Any) -> None:
    v1 = servers("v1")
    p = await proxy([grpc_version("v1", v1.url)], split=[("v1", 1.0)])

    def call() -> tuple[Any, float]:
        t0 = time.monotonic()
        with channel(p) as ch:
            try:
                unary(ch, "Slow")(b"", timeout=0.3)
            except grpc.RpcError as e:
                return e.code(), time.monotonic() - t0
        return None, 0.0

    code, took = await asyncio.to_thread(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 1.5, took
    # The upstream's handler sees its call end well before its 2 s sleep would (upstream_response is 5 s).
    assert await asyncio.to_thread(v1.cancelled.wait, 1.5)


async def test_grpc_health_check_of_a_named_service(servers: Any, proxy: Any) -> None:
    from grpc_health.v1 import health_pb2

    v1 = servers("v1")
    p = await proxy([grpc_version("v1", v1.url, service="demo.Echo")], split=[("v1", 1.0)])
    (ep,) = p.dp.endpoints.values()
    await healthy(p, "v1")
    assert ep.active_ok
    v1.health.set("demo.Echo", health_pb2.HealthCheckResponse.NOT_SERVING)
    for _ in range(100):
        if not ep.active_ok:
            break
        await asyncio.sleep(0.02)
    assert not ep.active_ok
