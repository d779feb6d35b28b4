"""TLS listeners with real handshakes (Python ssl, openssl s_client): SNI, reload, TLS 1.1 refused, 421 on an
SNI/Host mismatch, X-Forwarded-Proto, handshake failures counted and never reaching an upstream, client
certificates exposed on the connection, a TLS listener beside a cleartext one."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.tls import RELOAD_INTERVAL
from proxy.parse import parse_document
from proxy.settings import Certificate, Limits, Listener, Settings, Timeouts, TlsConfig
from proxy.table import RouteTable
from proxy.telemetry.metrics import aggregate, render
from tests.dataplane.helpers import Client, Proxy, Upstream, read_response, simple_route, start_proxy, table, version
from tests.tlscerts import ADMIN, API, CA, Pair, serial_of, serial_of_der


@dataclass
class Certs:
    ca: CA
    api: Pair
    admin: Pair
    client: Pair
    expired: Pair


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = CA(tmp_path)
    return Certs(ca, ca.issue("api", API), ca.issue("admin", ADMIN), ca.issue("acme", client=True,
                                                                                 common_name="acme"),
                 ca.issue("old", API, expired=True))


def tls_listener(c: Certs, *pairs: Pair, name: str = "public", **tls: Any) -> Listener:
    certificates = tuple(Certificate(str(p.cert), str(p.key)) for p in (pairs or (c.api, c.admin)))
    return Listener(name, ("127.0.0.1", 0), tls=TlsConfig(certificates=certificates, **tls))


def client_ctx(c: Certs, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(c.ca.path))
    ctx.check_hostname = kw.pop("check_hostname", True)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def tls_open(port: int, ctx: ssl.SSLContext, sni: str | None) -> Client:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    return Client(r, w)


def served_serial(client: Client) -> int:
    der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return serial_of_der(der)


async def s_client(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    return out.decode()


@pytest.fixture
async def up(upstreams: Callable[..., asyncio.Future[Upstream]]) -> Upstream:
    return await upstreams(name="a")


@pytest.fixture
async def proxy_of(up: Upstream) -> AsyncIterator[Callable[..., asyncio.Future[Proxy]]]:
    started: list[Proxy] = []

    async def make(*listeners: Listener, **settings: Any) -> Proxy:
        p = await start_proxy(table([version("v1", up)], [simple_route(("v1", 1.0))]),
                              Settings(listen=listeners[0].address, listeners=listeners, **settings))
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        await p.dp.shutdown(0.5)


async def test_sni_picks_the_certificate_of_the_server_name_and_the_first_is_the_default(
        certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs))
    api_serial, admin_serial = serial_of(certs.api.cert.read_bytes()), serial_of(certs.admin.cert.read_bytes())
    ctx = client_ctx(certs)
    for sni, serial in ((API, api_serial), (ADMIN, admin_serial)):
        c = await tls_open(p.port, ctx, sni)
        assert served_serial(c) == serial
        assert (await c.get(host=sni)).status == 200
        c.close()
    c = await tls_open(p.port, client_ctx(certs, check_hostname=False), None)  # no SNI: the default
    assert served_serial(c) == api_serial
    c.close()


async def test_openssl_s_client_with_servername_gets_that_names_certificate(certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs))
    text = await s_client(p.port, "-servername", ADMIN, "-CAfile", str(certs.ca.path), "-verify_return_error")
    assert f"subject=CN = {ADMIN}" in text
    assert "Verify return code: 0 (ok)" in text


async def test_requests_over_tls_say_x_forwarded_proto_https_and_a_client_sent_copy_is_dropped(
        certs: Certs, proxy_of: Any, up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs))
    c = await tls_open(p.port, client_ctx(certs), API)
    assert (await c.get(host=API, extra="X-Forwarded-Proto: http\r\n")).status == 200
    c.close()
    assert [r.header("x-forwarded-proto") for r in up.traffic] == ["https"]


async def test_a_trusted_peer_without_x_forwarded_proto_gets_https_and_its_own_copy_is_kept(
        certs: Certs, proxy_of: Any, up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs), trusted_proxies=("127.0.0.1",))
    c = await tls_open(p.port, client_ctx(certs), API)
    # A chain from the trusted peer without its own X-Forwarded-Proto: the hop it came over is TLS.
    assert (await c.get(host=API, extra="X-Forwarded-For: 10.0.0.1\r\n")).status == 200
    assert (await c.get(host=API, extra="X-Forwarded-Proto: wss\r\n")).status == 200
    c.close()
    assert [r.header("x-forwarded-proto") for r in up.traffic] == ["https", "wss"]


async def test_a_host_of_another_certificates_domain_than_the_sni_gets_421_and_reaches_no_upstream(
        certs: Certs, proxy_of: Any, up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs))
    c = await tls_open(p.port, client_ctx(certs), API)
    r = await c.get(host=f"{ADMIN}:443")
    assert r.status == 421
    assert up.nothing_received
    c.close()
    c = await tls_open(p.port, client_ctx(certs), API)
    assert (await c.get(host="other.example.test")).status == 200  # no certificate of this listener names it
    c.close()
    assert p.stats.rejected == {"misdirected": 1}


async def test_tls_1_1_is_refused_counted_and_reaches_no_upstream(certs: Certs, proxy_of: Any, up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs))
    # SECLEVEL=0 lets the client offer TLS 1.1 at all; the refusal must come from the proxy.
    out = await s_client(p.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-servername", API)
    assert "Cipher is (NONE)" in out
    await asyncio.sleep(0.05)
    assert p.stats.tls_handshake_errors == {("public", "protocol_version"): 1}
    assert up.nothing_received
    metrics = render(aggregate(p.stats, None), p.holder.table, p.dp.health_view()).decode()
    assert 'turnout_tls_handshake_errors_total{listener="public",reason="protocol_version"} 1.0' in metrics


async def test_cleartext_http_to_a_tls_listener_is_a_counted_handshake_error(certs: Certs, proxy_of: Any,
                                                                             up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs))
    c = await Client.open(p.port)
    await c.send(f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    assert await c.closed()
    c.close()
    await asyncio.sleep(0.05)
    assert p.stats.tls_handshake_errors == {("public", "not_tls"): 1}
    assert up.nothing_received


async def test_a_slow_handshake_counts_against_header_read(certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs), timeouts=Timeouts(header_read=0.3))
    c = await Client.open(p.port)  # TCP only: the handshake never starts
    assert await c.closed(timeout=3)
    c.close()
    assert p.stats.tls_handshake_errors == {("public", "timeout"): 1}


async def test_a_replaced_certificate_is_served_within_the_reload_interval_while_an_open_connection_keeps_working(
        certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs, certs.api))
    ctx = client_ctx(certs)
    old = await tls_open(p.port, ctx, API)
    assert (await old.get(host=API)).status == 200
    fresh = certs.ca.issue("api-new", API)
    os.replace(fresh.key, certs.api.key)  # a new inode each, as certbot and kubernetes secrets do
    os.replace(fresh.cert, certs.api.cert)
    want = serial_of(certs.api.cert.read_bytes())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELOAD_INTERVAL + 2
    while True:
        c = await tls_open(p.port, ctx, API)
        got = served_serial(c)
        c.close()
        if got == want or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert got == want
    assert (await old.get(host=API)).status == 200  # the keep-alive connection from before still serves
    old.close()


async def test_a_broken_new_pair_is_refused_with_one_log_line_and_the_old_one_keeps_serving(
        certs: Certs, proxy_of: Any, capsys: pytest.CaptureFixture[str]) -> None:
    p = await proxy_of(tls_listener(certs, certs.api))
    before = serial_of(certs.api.cert.read_bytes())
    other = certs.ca.issue("unrelated", API)
    os.replace(other.key, certs.api.key)  # a key that does not match the certificate
    await asyncio.sleep(RELOAD_INTERVAL * 2 + 0.5)
    p.dp.reload_certificates()  # as SIGHUP does: the same refused files are not reported again
    c = await tls_open(p.port, client_ctx(certs), API)
    assert served_serial(c) == before
    c.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "refused" in ln]
    assert len(lines) == 1
    assert lines[0].startswith("turnout: listener public: new certificate refused, the old one keeps serving: "
                               "listeners[0].tls.certificates[0].key: not the private key of")


async def test_a_tls_listener_and_a_cleartext_one_serve_in_the_same_process(certs: Certs, proxy_of: Any,
                                                                            up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs), Listener("plain", ("127.0.0.1", 0)))
    tls_port, plain_port = p.dp.ports
    c = await tls_open(tls_port, client_ctx(certs), API)
    assert (await c.get(host=API)).status == 200
    c.close()
    c = await Client.open(plain_port)
    assert (await c.get(host=API)).status == 200
    c.close()
    assert [r.header("x-forwarded-proto") for r in up.traffic] == ["https", "http"]


async def test_a_verified_client_certificate_is_on_the_connection_and_none_without_one(certs: Certs,
                                                                                    proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs, client_ca=str(certs.ca.path), client_cert="optional"))
    ctx = client_ctx(certs)
    ctx.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    c = await tls_open(p.port, ctx, API)
    assert (await c.get(host=API)).status == 200
    conn = cast(ClientConnection, next(iter(p.dp.conns)))
    assert conn.peer_cert is not None
    assert conn.peer_cert.cert["subject"] == ((("commonName", "acme"),),)
    assert conn.tls is not None
    assert conn.tls.peer_der is not None
    assert serial_of_der(conn.tls.peer_der) == serial_of(certs.client.cert.read_bytes())
    c.close()
    await asyncio.sleep(0.05)
    c = await tls_open(p.port, client_ctx(certs), API)
    assert (await c.get(host=API)).status == 200
    conn = cast(ClientConnection, next(iter(p.dp.conns)))
    assert conn.peer_cert is None
    c.close()


async def test_a_required_client_certificate_refuses_a_client_without_one(certs: Certs, proxy_of: Any,
                                                                          up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs, client_ca=str(certs.ca.path), client_cert="required"))
    c = await tls_open(p.port, client_ctx(certs), API)
    # TLS 1.3: the client learns of the refusal at its first read.
    c.writer.write(f"GET / HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(read_response(c.reader), 5)
    c.close()
    await asyncio.sleep(0.05)
    assert p.stats.tls_handshake_errors == {("public", "client_certificate"): 1}
    assert up.nothing_received


async def test_an_expired_certificate_is_said_at_start_and_a_client_refusing_it_is_counted(
        certs: Certs, proxy_of: Any, up: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    p = await proxy_of(tls_listener(certs, certs.expired))
    assert [ln for ln in capsys.readouterr().err.splitlines() if "expired" in ln] == [
        f"turnout: listener public: certificate {certs.expired.cert} expired on "
        f"{end_date(certs.expired.cert)} UTC"]
    out = await s_client(p.port, "-servername", API, "-CAfile", str(certs.ca.path), "-verify_return_error")
    assert "certificate has expired" in out
    await asyncio.sleep(0.05)
    assert p.stats.tls_handshake_errors == {("public", "client_alert"): 1}  # s_client says why it gave up
    assert up.nothing_received


def end_date(cert: Path) -> str:
    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc:%Y-%m-%d %H:%M}"


async def test_reload_certificates_as_sighup_does_serves_the_new_pair_at_once(certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs, certs.api))
    fresh = certs.ca.issue("api-new", API)
    os.replace(fresh.key, certs.api.key)
    os.replace(fresh.cert, certs.api.cert)
    p.dp.reload_certificates()
    c = await tls_open(p.port, client_ctx(certs), API)
    assert served_serial(c) == serial_of(certs.api.cert.read_bytes())
    c.close()


async def test_mtls_client_acme_reaches_its_pin_and_a_forged_header_without_a_certificate_does_not(
        certs: Certs, upstreams: Callable[..., asyncio.Future[Upstream]]) -> None:
    """The whole chain over real handshakes: the listener verifies the client certificate against client_ca,
    the client_cert source reads its CN, the pin sends acme to its dedicated version; the same client id in
    a header, without a certificate, stays on the shared version (pins_require_verified)."""
    shared, dedicated = await upstreams(name="shared"), await upstreams(name="dedicated")
    state = parse_document({
        "versions": {"shared": {"endpoints": [shared.url]}, "acme": {"endpoints": [dedicated.url]}},
        "routes": [{"name": "api", "split": {"shared": 1}, "pins": {"acme": "acme"},
                    "identity": [{"client_cert": "subject_cn"}, {"header": "X-Client-Id"}],
                    "pins_require_verified": True}]})
    listener = tls_listener(certs, client_ca=str(certs.ca.path), client_cert="optional")
    p = await start_proxy(RouteTable(state, 1), Settings(listen=listener.address, listeners=(listener,)))
    try:
        with_cert = client_ctx(certs)
        with_cert.load_cert_chain(str(certs.client.cert), str(certs.client.key))
        c = await tls_open(p.port, with_cert, API)
        assert (await c.get(host=API)).status == 200
        c.close()
        forged = await tls_open(p.port, client_ctx(certs), API)
        await forged.send(f"GET / HTTP/1.1\r\nHost: {API}\r\nX-Client-Id: acme\r\n\r\n".encode())
        assert (await read_response(forged.reader)).status == 200
        forged.close()
        # Proxied requests only (they carry X-Forwarded-Proto; active health checks do not).
        proxied = {u.name: [(r.header("x-turnout-client"), r.header("x-forwarded-proto")) for r in u.requests
                            if r.header("x-forwarded-proto")] for u in (shared, dedicated)}
        assert proxied == {"shared": [(None, "https")], "dedicated": [("acme", "https")]}
    finally:
        await p.dp.shutdown(0.5)


async def test_connections_still_in_their_handshake_count_against_max_connections(certs: Certs, proxy_of: Any,
                                                                                   up: Upstream) -> None:
    p = await proxy_of(tls_listener(certs), limits=Limits(max_connections=2))
    # Two clients that connect and never start their handshake hold both places.
    idle = [await asyncio.open_connection("127.0.0.1", p.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert p.dp.handshaking == 2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_open(p.port, client_ctx(certs), API)
    assert p.stats.rejected == {"too_many_connections": 1}
    assert up.nothing_received
    for _, w in idle:
        w.close()
    await asyncio.sleep(0.2)
    assert p.dp.handshaking == 0  # a handshake that ends by the client leaving frees its place
    c = await tls_open(p.port, client_ctx(certs), API)
    assert (await c.get(host=API)).status == 200
    c.close()


async def test_connections_closed_before_any_handshake_leave_no_place_taken(certs: Certs, proxy_of: Any) -> None:
    p = await proxy_of(tls_listener(certs))
    for _ in range(20):
        _, w = await asyncio.open_connection("127.0.0.1", p.port)
        w.transport.abort()
    await asyncio.sleep(0.3)
    assert p.dp.handshaking == 0
    assert p.stats.tls_handshake_errors == {("public", "closed"): 20}
