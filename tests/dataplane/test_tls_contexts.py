"""HTTPS upstreams against real TLS servers started here: a private CA, keep-alive reuse, a failing verification
gives 502 (counted as `tls`) and nothing reaches the upstream, SNI/server_name, mTLS to the upstream, health
checks and mirrors with the version's TLS settings, and one context per spec across tables."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from proxy.model import HealthCheck, Mirror, UpstreamTLS, Version, VersionSpec
from proxy.parse import parse_yaml
from proxy.table import RouteTable
from tests.dataplane.helpers import Client, Proxy, Upstream, simple_route, start_proxy, table
from tests.upstream_certs import Certs, Pair, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def server_context(pair: Pair, client_ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class TLSUpstream(Upstream):
    """The helpers' recording upstream, behind TLS: it records the SNI name and the client certificate's CN."""

    ctx: ssl.SSLContext | None = None
    sni: list[str | None] = field(default_factory=list)
    client_cns: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> TLSUpstream:
        assert self.ctx is not None
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)  # type: ignore[func-returns-value]
        self.server = await asyncio.start_server(self._serve_tls, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def present(self, pair: Pair) -> None:
        """From the next handshake on, serve this certificate (an upstream whose certificate was replaced)."""
        assert self.ctx is not None
        self.ctx.load_cert_chain(pair.cert, pair.key)

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        cn = None
        if peer:
            cn = next((v for rdn in peer["subject"] for k, v in rdn if k == "commonName"), None)
        self.client_cns.append(cn)
        await self._serve(reader, writer)


@pytest.fixture
async def tls_upstreams() -> AsyncIterator[Callable[..., asyncio.Future[TLSUpstream]]]:
    started: list[TLSUpstream] = []

    async def make(ctx: ssl.SSLContext, name: str = "up") -> TLSUpstream:
        up = await TLSUpstream(name=name, ctx=ctx).start()
        started.append(up)
        return up

    yield make  # type: ignore[misc]
    for up in started:
        await up.stop()


def https_version(name: str, up: Upstream, tls: UpstreamTLS | None, interval: float = 60.0) -> Version:
    spec = VersionSpec(kind="static", endpoints=(up.url,), tls=tls,
                       health=HealthCheck(path="/healthz", interval=interval, timeout=0.5))
    return Version(name=name, spec=spec, endpoints=(up.url,))


async def proxy_for(*versions: Version) -> Proxy:
    return await start_proxy(table(list(versions), [simple_route((versions[0].name, 1.0))]))


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling state of the object under test
            await asyncio.sleep(0.01)


async def checked(up: Upstream) -> None:
    """The first active check reached the upstream and its answer was recorded."""
    await until(lambda: any(r.target == "/healthz" for r in up.requests))
    await asyncio.sleep(0.05)


async def test_https_upstream_with_a_private_ca_serves_and_reuses_one_connection(certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca)))
    c = await Client.open(p.port)
    try:
        first = await c.get("/a")
        second = await c.get("/b")
        assert (first.status, first.body) == (200, b"up GET /a")
        assert (second.status, second.body) == (200, b"up GET /b")
        assert len({r.conn for r in up.traffic}) == 1
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_a_route_file_with_an_https_version_serves_end_to_end(certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    state = parse_yaml(f"""
versions:
  v1:
    endpoints: ["{up.url}"]
    tls: {{ca: "{certs.ca}", server_name: api.internal}}
routes:
  - {{name: web, split: {{v1: 1}}}}
""")
    p = await start_proxy(RouteTable(state, 1))
    c = await Client.open(p.port)
    try:
        r = await c.get("/x")
        assert (r.status, r.body) == (200, b"up GET /x")
        assert up.sni[-1] == "api.internal"
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_a_certificate_from_another_ca_gives_502_counted_as_tls_and_nothing_reaches_it(  # type: ignore[no-untyped-def]
        certs: Certs, tls_upstreams) -> None:
    up = await tls_upstreams(server_context(certs.server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca)))
    await checked(up)
    up.present(certs.wrong_server)
    c = await Client.open(p.port)
    try:
        r = await c.get("/secret")
        assert r.status == 502
        assert p.stats.upstream_errors == {("v1", "tls"): 1}
        assert up.traffic == []
        assert up.partial == []
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_a_certificate_for_another_name_than_server_name_gives_502(certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca, server_name="api.internal")))
    await checked(up)
    up.present(certs.other_name)
    c = await Client.open(p.port)
    try:
        r = await c.get("/secret")
        assert r.status == 502
        assert p.stats.upstream_errors == {("v1", "tls"): 1}
        assert up.traffic == []
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_a_failing_verification_moves_on_to_the_fallback_version(certs: Certs, tls_upstreams, upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    plain = await upstreams(name="b")
    v1 = https_version("v1", up, UpstreamTLS(ca=certs.ca))
    v2 = Version("v2", VersionSpec(kind="static", endpoints=(plain.url,)), (plain.url,))
    p = await start_proxy(table([v1, v2], [simple_route(("v1", 1.0), fallback=("v2",))]))
    await checked(up)
    up.present(certs.wrong_server)
    c = await Client.open(p.port)
    try:
        r = await c.get("/x")
        assert (r.status, r.body) == (200, b"b GET /x")
        assert up.traffic == []
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_verify_false_with_the_flag_accepts_any_certificate(certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.wrong_server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(verify=False)))
    c = await Client.open(p.port)
    try:
        r = await c.get("/x")
        assert (r.status, r.body) == (200, b"up GET /x")
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_the_client_certificate_is_presented_to_an_upstream_that_requires_one(  # type: ignore[no-untyped-def]
        certs: Certs, tls_upstreams) -> None:
    up = await tls_upstreams(server_context(certs.server, client_ca=certs.ca))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca, client_cert=certs.client.cert,
                                                            client_key=certs.client.key)))
    c = await Client.open(p.port)
    try:
        r = await c.get("/x")
        assert (r.status, r.body) == (200, b"up GET /x")
        conn = up.traffic[0].conn
        assert up.client_cns[conn - 1] == "turnout-proxy"
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_health_checks_speak_tls_with_the_versions_ca(certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca, server_name="api.internal")))
    try:
        await checked(up)
        assert p.dp.health_view() == {"v1": {up.url: True}}
        assert up.sni[0] == "api.internal"
    finally:
        await p.dp.shutdown(0.5)


async def test_a_health_check_that_fails_verification_marks_the_endpoint_unhealthy(  # type: ignore[no-untyped-def]
        certs: Certs, tls_upstreams) -> None:
    up = await tls_upstreams(server_context(certs.wrong_server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=certs.ca)))
    try:
        await until(lambda: not p.dp.health_view()["v1"][up.url])
        assert p.dp.health_view() == {"v1": {up.url: False}}
        assert up.requests == []
    finally:
        await p.dp.shutdown(0.5)


async def test_a_mirror_to_an_https_version_goes_over_tls(certs: Certs, tls_upstreams, upstreams) -> None:  # type: ignore[no-untyped-def]
    up = await tls_upstreams(server_context(certs.server))
    plain = await upstreams(name="a")
    v1 = Version("v1", VersionSpec(kind="static", endpoints=(plain.url,)), (plain.url,))
    v2 = https_version("v2", up, UpstreamTLS(ca=certs.ca))
    p = await start_proxy(table([v1, v2], [simple_route(("v1", 1.0), mirrors=(Mirror("v2", 100.0),))]))
    c = await Client.open(p.port)
    try:
        r = await c.get("/copy")
        assert r.status == 200
        await until(lambda: bool(up.traffic))
        assert up.traffic[0].target == "/copy"
    finally:
        c.close()
        await p.dp.shutdown(0.5)


async def test_one_context_per_spec_survives_a_table_rebuild_and_a_changed_spec_gets_a_new_one(  # type: ignore[no-untyped-def]
        certs: Certs, tls_upstreams) -> None:
    up = await tls_upstreams(server_context(certs.server))
    v1 = https_version("v1", up, UpstreamTLS(ca=certs.ca))
    p = await proxy_for(v1)
    try:
        (ep,) = p.dp.backends["v1"].endpoints
        p.set_table(table([v1], [simple_route(("v1", 1.0))], revision=2))
        (same,) = p.dp.backends["v1"].endpoints
        assert same is ep
        assert same.ssl is ep.ssl
        changed = https_version("v1", up, UpstreamTLS(ca=certs.ca, server_name="api.internal"))
        p.set_table(table([changed], [simple_route(("v1", 1.0))], revision=3))
        (fresh,) = p.dp.backends["v1"].endpoints
        assert fresh.server_hostname == "api.internal"
        assert fresh.ssl is not ep.ssl
        assert ep.removed is True
    finally:
        await p.dp.shutdown(0.5)


async def test_a_version_whose_tls_files_are_gone_never_speaks_cleartext(tmp_path, certs: Certs, tls_upstreams) -> None:  # type: ignore[no-untyped-def]
    # A stored revision loads without its files being checked again: its endpoints get no context.
    up = await tls_upstreams(server_context(certs.server))
    p = await proxy_for(https_version("v1", up, UpstreamTLS(ca=str(tmp_path / "gone.pem"))))
    c = await Client.open(p.port)
    try:
        await until(lambda: not p.dp.health_view()["v1"][up.url])
        r = await c.get("/x")
        assert r.status == 503
        assert up.accepts == 0
    finally:
        c.close()
        await p.dp.shutdown(0.5)
