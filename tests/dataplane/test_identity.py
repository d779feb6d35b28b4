"""Verified identity through the real data plane: real tokens signed with keys made here, a JWKS file and an
API key table on disk, real upstreams recording what reached them, raw HTTP clients."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from proxy.dataplane.identity import Identity
from proxy.identities import PeerCert
from proxy.parse import parse_document
from proxy.table import RouteTable
from proxy.telemetry.metrics import aggregate, render
from proxy.telemetry.stats import Stats
from tests.dataplane.helpers import Client, Proxy, Response, Upstream, start_proxy
from tests.keys import (
    AUDIENCE,
    ISSUER,
    Signer,
    api_key_line,
    ec_signer,
    ed_signer,
    handshake,
    issue,
    make_ca,
    rsa_signer,
    unsigned_token,
    write_jwks,
)


@dataclass
class World:
    proxy: Proxy
    shared: Upstream
    other: Upstream
    dedicated: Upstream
    signers: list[Signer]
    jwks: Path
    tmp: Path

    async def get(self, host: str, extra: str = "") -> Response:
        c = await Client.open(self.proxy.port)
        try:
            return await c.get("/", host=host, extra=extra)
        finally:
            c.close()

    def served_by(self, r: Response) -> str:
        return r.body.decode().split(" ")[0]

    def metrics(self) -> list[str]:
        text = render(aggregate(self.proxy.stats, None), self.proxy.holder.table, {}).decode()
        return [line for line in text.splitlines() if line.startswith("turnout_identity_rejected_total{")]


HEALTH = {"path": "/healthz", "interval": 60}


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}\r\n"


SECRET = "s3cret-" * 6


def routes_doc(shared: Upstream, other: Upstream, dedicated: Upstream, jwks: Path, keys: Path) -> object:
    jwt_source = {"jwt": {"keys": str(jwks), "issuer": ISSUER, "audience": AUDIENCE}}
    api_source = {"api_key": {"header": "X-Api-Key", "keys": str(keys)}}
    return {
        "versions": {n: {"endpoints": [u.url], "health": HEALTH}
                     for n, u in (("shared", shared), ("other", other), ("dedicated", dedicated))},
        "routes": [
            # Verified sources first, then the old unverified header; pins for any id.
            {"name": "web", "match": {"host": "app"}, "split": {"shared": 1}, "pins": {"acme": "dedicated"},
             "identity": [jwt_source, api_source, {"header": "X-Client-Id"}]},
            {"name": "strict", "match": {"host": "strict"}, "split": {"shared": 1, "other": 1},
             "pins": {"acme": "dedicated"}, "identity": [jwt_source, api_source, {"header": "X-Client-Id"}],
             "pins_require_verified": True, "assignment_cookie": "tv"},
            {"name": "locked", "match": {"host": "locked"}, "split": {"shared": 1}, "pins": {"acme": "dedicated"},
             "identity": [jwt_source, {"header": "X-Client-Id"}], "require_identity": True},
            {"name": "keyonly", "match": {"host": "keyonly"}, "split": {"shared": 1},
             "identity": [api_source], "require_identity": True},
            {"name": "hs", "match": {"host": "hs"}, "split": {"shared": 1}, "pins": {"acme": "dedicated"},
             "identity": [{"jwt": {"cookie": "session", "secret": str(keys.parent / "secret"), "claim": "org.id"}},
                          {"header": "X-Client-Id"}]},
        ],
    }


@pytest.fixture
async def world(upstreams, tmp_path: Path) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    shared = await upstreams(name="shared")
    other = await upstreams(name="other")
    dedicated = await upstreams(name="dedicated")
    signers = [rsa_signer(), ec_signer(), ed_signer()]
    jwks = write_jwks(tmp_path / "jwks.json", *signers)
    keys = tmp_path / "api-keys.txt"
    keys.write_text(api_key_line("acme", "key-of-acme") + api_key_line("beta", "key-of-beta"))
    (tmp_path / "secret").write_text(SECRET + "\n")
    state = parse_document(routes_doc(shared, other, dedicated, jwks, keys))
    p = await start_proxy(RouteTable(state, 1))
    yield World(p, shared, other, dedicated, signers, jwks, tmp_path)
    await p.dp.shutdown(0.5)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_valid_token_reaches_its_clients_pin_and_tells_the_upstream(world: World, alg: str) -> None:
    (signer,) = [s for s in world.signers if s.alg == alg]
    r = await world.get("app", bearer(signer.token("acme")))
    (req,) = world.dedicated.traffic
    assert (r.status, world.served_by(r), req.header("x-turnout-client"), req.header("x-turnout-identity-source")) \
        == (200, "dedicated", "acme", "jwt")


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "expired"), ("wrong_signature", "signature"), ("wrong_audience", "audience"),
    ("wrong_issuer", "issuer"), ("alg_none", "algorithm"), ("unknown_kid", "unknown_kid"),
    ("garbage", "malformed"),
])
async def test_an_invalid_token_makes_the_request_anonymous_and_is_counted(world: World, case: str,
                                                                           reason: str) -> None:
    good = world.signers[0]
    token = {
        "expired": lambda: good.token("acme", exp=-60),
        # Same kid, another key: the signature cannot match the published key.
        "wrong_signature": lambda: Signer("RS256", good.kid, rsa_signer().key).token("acme"),
        "wrong_audience": lambda: good.token("acme", aud="someone-else"),
        "wrong_issuer": lambda: good.token("acme", iss="https://evil.test"),
        "alg_none": lambda: unsigned_token("acme", kid=good.kid),
        "unknown_kid": lambda: Signer("RS256", "rotated-away", rsa_signer().key).token("acme"),
        "garbage": lambda: "not.a.token",
    }[case]()
    # The forged header names the pinned client: a bad token must not fall through to it.
    responses = [await world.get("app", bearer(token) + "X-Client-Id: acme\r\n") for _ in range(3)]
    assert [world.served_by(r) for r in responses] == ["shared"] * 3
    assert [(q.header("x-turnout-client"), q.header("x-turnout-identity-source")) for q in world.shared.traffic] \
        == [(None, None)] * 3
    assert world.metrics() == [f'turnout_identity_rejected_total{{reason="{reason}",route="web",source="jwt"}} 3.0']


async def test_hs256_with_a_secret_file_and_the_token_in_a_cookie(world: World) -> None:
    exp = int(time.time()) + 60
    good = jwt.encode({"org": {"id": "acme"}, "exp": exp}, SECRET, algorithm="HS256")
    forged = jwt.encode({"org": {"id": "acme"}, "exp": exp}, "another-secret-" * 3, algorithm="HS256")
    ok = await world.get("hs", f"Cookie: theme=dark; session={good}\r\n")
    bad = await world.get("hs", f"Cookie: session={forged}\r\nX-Client-Id: acme\r\n")
    assert [world.served_by(r) for r in (ok, bad)] == ["dedicated", "shared"]
    assert world.dedicated.traffic[0].header("x-turnout-client") == "acme"
    assert world.metrics() == ['turnout_identity_rejected_total{reason="signature",route="hs",source="jwt"} 1.0']


async def test_api_key_table(world: World) -> None:
    acme = await world.get("app", "X-Api-Key: key-of-acme\r\n")
    beta = await world.get("app", "X-Api-Key: key-of-beta\r\n")
    wrong = await world.get("app", "X-Api-Key: key-of-nobody\r\nX-Client-Id: acme\r\n")
    assert [world.served_by(r) for r in (acme, beta, wrong)] == ["dedicated", "shared", "shared"]
    assert [(q.header("x-turnout-client"), q.header("x-turnout-identity-source"))
            for q in world.dedicated.traffic + world.shared.traffic] == [
        ("acme", "api_key"), ("beta", "api_key"), (None, None)]
    assert world.metrics() == ['turnout_identity_rejected_total{reason="unknown_key",route="web",source="api_key"} 1.0']


async def test_without_pins_require_verified_an_unverified_header_still_pins(world: World) -> None:
    r = await world.get("app", "X-Client-Id: acme\r\n")
    (req,) = world.dedicated.traffic
    assert (world.served_by(r), req.header("x-turnout-client")) == ("dedicated", None)


async def test_a_forged_header_does_not_reach_the_pin_when_pins_require_verified(world: World) -> None:
    forged = [await world.get("strict", "X-Client-Id: acme\r\nCookie: tv=dedicated\r\n") for _ in range(4)]
    sticky_version = world.proxy.holder.table.route("strict").pick_unpinned("acme")[1][0]  # type: ignore[union-attr]
    verified = await world.get("strict", bearer(world.signers[1].token("acme")))
    assert [world.served_by(r) for r in forged] == [sticky_version] * 4
    # No assignment is recorded for an unverified id either; the verified one gets its pin and an assignment.
    assert [r.header("set-cookie") for r in forged] == [None] * 4
    assert (world.served_by(verified), verified.header("set-cookie")) == \
        ("dedicated", "tv=dedicated; Path=/; HttpOnly; SameSite=Lax")


async def test_require_identity_answers_401_and_nothing_reaches_an_upstream(world: World) -> None:
    anonymous = await world.get("locked")
    forged = await world.get("locked", "X-Client-Id: acme\r\n")
    expired = await world.get("locked", bearer(world.signers[0].token("acme", exp=-5)))
    no_key = await world.get("keyonly")
    assert [(r.status, r.header("www-authenticate")) for r in (anonymous, forged, expired, no_key)] == [
        (401, "Bearer"), (401, "Bearer"), (401, "Bearer"), (401, None)]
    assert [u.nothing_received for u in (world.shared, world.other, world.dedicated)] == [True, True, True]
    ok = await world.get("locked", bearer(world.signers[2].token("acme")))
    assert (ok.status, world.served_by(ok)) == (200, "dedicated")


async def test_client_sent_identity_headers_are_always_removed(world: World) -> None:
    spoof = ("X-Turnout-Client: acme\r\nX-Turnout-Identity-Source: jwt\r\nx_turnout_client: acme\r\n"
             "X_Turnout_Identity_Source: jwt\r\n")
    await world.get("app", spoof + "X-Api-Key: key-of-beta\r\n")
    await world.get("app", spoof)
    assert [(q.count("x-turnout-client"), q.count("x_turnout_client"), q.count("x-turnout-identity-source"),
             q.count("x_turnout_identity_source"), q.header("x-turnout-client")) for q in world.shared.traffic] == [
        (1, 0, 1, 0, "beta"), (0, 0, 0, 0, None)]


async def test_a_verdict_is_cached_until_the_token_expires(world: World) -> None:
    token = world.signers[0].token("acme", exp=1.5)
    first = await world.get("app", bearer(token))
    second = await world.get("app", bearer(token))
    cached = len(world.proxy.dp.identity.tokens)
    await asyncio.sleep(max(0.0, int(time.time() + 1.5) + 1.05 - time.time()))
    later = await world.get("app", bearer(token))
    assert ([world.served_by(r) for r in (first, second, later)], cached) == (["dedicated", "dedicated", "shared"], 1)
    assert world.metrics() == ['turnout_identity_rejected_total{reason="expired",route="web",source="jwt"} 1.0']


async def test_a_rotated_jwks_file_is_read_again(world: World) -> None:
    old = world.signers[0]
    new = rsa_signer("rsa-2")
    before = await world.get("app", bearer(new.token("acme")))
    write_jwks(world.jwks, new)
    await asyncio.sleep(2.1)  # KEY_CHECK_INTERVAL
    after = [await world.get("app", bearer(s.token("acme"))) for s in (new, old)]
    assert [world.served_by(r) for r in (before, *after)] == ["shared", "dedicated", "shared"]
    assert world.metrics() == ['turnout_identity_rejected_total{reason="unknown_kid",route="web",source="jwt"} 2.0']


async def test_a_broken_jwks_file_leaves_the_last_good_keys_serving(world: World) -> None:
    await world.get("app", bearer(world.signers[0].token("acme")))
    world.jwks.write_text("{broken")
    await asyncio.sleep(2.1)
    r = await world.get("app", bearer(world.signers[0].token("acme")))
    assert world.served_by(r) == "dedicated"


async def test_a_cleartext_connection_has_no_peer_certificate(upstreams) -> None:  # type: ignore[no-untyped-def]
    a = await upstreams(name="a")
    state = parse_document({"versions": {"v1": {"endpoints": [a.url], "health": HEALTH}}, "routes": [
        {"name": "web", "split": {"v1": 1}, "identity": [{"client_cert": "san_dns"}, {"header": "X-Client-Id"}]}]})
    p = await start_proxy(RouteTable(state, 1))
    try:
        c = await Client.open(p.port)
        await c.get("/", extra="X-Client-Id: beta\r\n")
        (conn,) = p.dp.conns
        assert (conn.peer_cert, a.traffic[0].header("x-turnout-client")) == (None, None)
        c.close()
    finally:
        await p.dp.shutdown(0.5)


# -- client certificates: the source over what the TLS listener will hand over (ClientSide.peer_cert)


async def test_a_client_certificate_is_a_verified_id_that_reaches_the_pin(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pki = {"ca": ca, "server": issue(ca, tmp_path, "server", "localhost", dns=("localhost",), client=False),
           "acme": issue(ca, tmp_path, "acme", "acme", dns=("acme",))}
    peer = await handshake(pki, "acme")
    without = await handshake(pki, None)
    state = parse_document({"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"]},
                                         "ded": {"endpoints": ["http://127.0.0.1:2"]}}, "routes": [
        {"name": "web", "split": {"v1": 1}, "pins": {"acme": "ded"}, "pins_require_verified": True,
         "identity": [{"client_cert": "san_dns"}, {"header": "X-Client-Id"}]}]})
    route = RouteTable(state, 1).route("web")
    assert route is not None
    ident = Identity(Stats())
    got = [ident.resolve(route, {"x-client-id": "acme"}, None, p, 0.0) for p in (peer, without, None)]
    assert got == [("client_cert", "acme"), ("", "acme"), ("", "acme")]
    picks = [route.pick_unpinned(cid)[1][0] if not src else route.pick(cid)[1][0] for src, cid in got]
    assert picks == ["ded", "v1", "v1"]


def test_a_verified_certificate_without_the_field_is_anonymous_and_counted() -> None:
    state = parse_document({"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"]}}, "routes": [
        {"name": "web", "split": {"v1": 1}, "identity": [{"client_cert": "san_uri"}, {"header": "X-Client-Id"}]}]})
    compiled = RouteTable(state, 1).route("web")
    assert compiled is not None
    stats = Stats()
    peer = PeerCert({"subject": ((("commonName", "acme"),),), "subjectAltName": (("DNS", "acme"),)}, b"der")
    assert Identity(stats).resolve(compiled, {"x-client-id": "acme"}, None, peer, 0.0) == ("", None)
    assert stats.identity_rejects == {("web", "client_cert", "missing_field"): 1}


async def test_a_table_swap_keeps_key_files_and_verdicts(world: World) -> None:
    token = world.signers[0].token("beta")
    await world.get("app", bearer(token))
    before = (len(world.proxy.dp.identity.sources), len(world.proxy.dp.identity.tokens))
    state = world.proxy.holder.table.state
    web = state.route("web")
    assert web is not None
    pinned = dataclasses.replace(web, pins={**web.pins, "beta": "dedicated"})
    routes = tuple(pinned if r.name == "web" else r for r in state.routes)
    world.proxy.set_table(RouteTable(dataclasses.replace(state, routes=routes), 2))
    r = await world.get("app", bearer(token))
    after = (len(world.proxy.dp.identity.sources), len(world.proxy.dp.identity.tokens))
    assert (world.served_by(r), before, after) == ("dedicated", (3, 1), (3, 1))
