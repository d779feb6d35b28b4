"""Verified identity sources in the route syntax (field paths for every error), key file formats, and the id a
client certificate gives, read from real TLS handshakes against a test-local server."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.errors import ValidationError
from proxy.identities import KeyFileError, cert_id, parse_api_keys
from proxy.model import ApiKeySource, IdentitySource, JwtSource
from proxy.parse import parse_document, route_to_dict, state_from_stored, state_to_stored
from tests.keys import Issued, api_key_line, ec_signer, ed_signer, handshake, issue, make_ca, rsa_signer, write_jwks


def doc(identity: list[Any], **route: Any) -> dict[str, Any]:
    return {"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"]}},
            "routes": [{"name": "web", "split": {"v1": 1}, "identity": identity, **route}]}


def errors_of(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(d)
    return [str(x) for x in e.value.errors]


@pytest.fixture
def jwks(tmp_path: Path) -> Path:
    return write_jwks(tmp_path / "jwks.json", rsa_signer(), ec_signer(), ed_signer())


def test_verified_sources_parse_into_the_model_and_round_trip(tmp_path: Path, jwks: Path) -> None:
    keys = tmp_path / "api-keys.txt"
    keys.write_text("# client key-digest\n" + api_key_line("acme", "k-acme"))
    state = parse_document(doc([
        {"client_cert": "san_dns"},
        {"jwt": {"keys": str(jwks), "claim": "org.id", "issuer": "https://id", "audience": "turnout"}},
        {"api_key": {"header": "X-Api-Key", "keys": str(keys)}},
        {"header": "X-Client-Id"},
    ], pins_require_verified=True, require_identity=True))
    r = state.routes[0]
    assert r.identity == (
        IdentitySource("client_cert", "san_dns"),
        IdentitySource("jwt", "authorization", jwt=JwtSource(
            header="authorization", claim=("org", "id"), keys=str(jwks), algorithms=("RS256", "ES256", "EdDSA"),
            issuer="https://id", audience="turnout")),
        IdentitySource("api_key", "x-api-key", api_key=ApiKeySource("x-api-key", str(keys))),
        IdentitySource("header", "x-client-id"),
    )
    assert (r.pins_require_verified, r.require_identity) == (True, True)
    assert state_from_stored(state_to_stored(state)).routes[0] == r
    assert parse_document(doc(route_to_dict(r)["identity"], pins_require_verified=True,
                              require_identity=True)).routes[0] == r


def test_every_error_names_its_field(tmp_path: Path, jwks: Path) -> None:
    bad_jwks = tmp_path / "bad.json"
    bad_jwks.write_text('{"keys": [{"kty": "RSA", "n": "zz"}]}')
    not_json = tmp_path / "notjson.json"
    not_json.write_text("keys:")
    table = tmp_path / "keys.txt"
    table.write_text(api_key_line("acme", "a") + "beta not-a-digest\n")
    assert errors_of(doc([
        {"client_cert": "serial"},
        {"jwt": {"keys": str(jwks), "algorithms": ["RS256", "XS999"]}},
        {"jwt": {"keys": str(jwks), "algorithms": ["none"]}},
        {"jwt": {"keys": str(jwks), "algorithms": ["HS256"]}},
        {"jwt": {"keys": str(tmp_path / "missing.json")}},
        {"jwt": {"keys": str(bad_jwks)}},
        {"jwt": {"keys": str(not_json)}},
        {"jwt": {"keys": str(jwks), "secret": str(jwks)}},
        {"api_key": {"keys": str(table)}},
        {"api_key": {"header": "X-Api-Key"}},
        {"jwt": {"keys": str(jwks), "colour": "red"}},
    ])) == [
        "routes[0].identity[0].client_cert: expected one of san_dns, san_uri, subject_cn, fingerprint_sha256, "
        "got 'serial'",
        "routes[0].identity[1].jwt.algorithms[1]: unknown algorithm 'XS999' (expected one of: RS256, RS384, RS512, "
        "PS256, PS384, PS512, ES256, ES384, EdDSA)",
        "routes[0].identity[2].jwt.algorithms[0]: algorithm 'none': unsigned tokens are never accepted",
        "routes[0].identity[3].jwt.algorithms[0]: algorithm 'HS256': needs secret, not keys",
        f"routes[0].identity[4].jwt.keys: file not found: {tmp_path / 'missing.json'}",
        f"routes[0].identity[5].jwt.keys: {bad_jwks}: keys[0]: unusable key (Not a public or private key)",
        f"routes[0].identity[6].jwt.keys: {not_json}: not a JWKS document (invalid JSON: Expecting value: "
        "line 1 column 1 (char 0))",
        "routes[0].identity[7].jwt: expected keys (a JWKS file) or secret (a file with an HMAC secret), exactly one",
        f'routes[0].identity[8].api_key.keys: {table}: line 2: expected "client-id sha256-hex-of-key"',
        "routes[0].identity[9].api_key.keys: expected a file of lines \"client-id sha256-hex-of-key\", got nothing",
        "routes[0].identity[10].jwt.colour: unknown field (expected one of: algorithms, audience, claim, cookie, "
        "header, issuer, keys, secret)",
    ]


def test_verified_options_need_a_verified_source() -> None:
    assert errors_of(doc([{"header": "X-Client-Id"}], pins_require_verified=True, require_identity=True)) == [
        "routes[0].pins_require_verified: needs a verified identity source (client_cert, jwt or api_key)",
        "routes[0].require_identity: needs a verified identity source (client_cert, jwt or api_key)",
    ]


def test_a_stored_revision_loads_although_its_key_file_is_gone(tmp_path: Path, jwks: Path) -> None:
    state = parse_document(doc([{"jwt": {"keys": str(jwks)}}]))
    stored = state_to_stored(state)
    jwks.unlink()
    assert state_from_stored(stored).routes[0].identity == state.routes[0].identity


def test_hs256_needs_a_long_secret(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort")
    assert errors_of(doc([{"jwt": {"secret": str(short)}}])) == [
        f"routes[0].identity[0].jwt.secret: {short}: an HMAC secret needs at least 32 bytes"]


def test_api_key_table_refuses_a_key_given_to_two_clients() -> None:
    with pytest.raises(KeyFileError, match="line 2: this key already belongs to 'acme'"):
        parse_api_keys((api_key_line("acme", "k") + api_key_line("beta", "k")).encode())


# -- client certificates from real handshakes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return {
        "ca": ca,
        "server": issue(ca, d, "server", "localhost", dns=("localhost",), client=False),
        "acme": issue(ca, d, "acme", "acme", dns=("acme.clients.test",), uris=("spiffe://test/acme",)),
        "bare": issue(ca, d, "bare", "bare-client"),
    }


async def test_each_certificate_field_from_a_verified_handshake(pki: dict[str, Issued]) -> None:
    peer = await handshake(pki, "acme")
    der = pki["acme"].cert.public_bytes(serialization.Encoding.DER)
    assert [cert_id(f, peer) for f in ("san_dns", "san_uri", "subject_cn", "fingerprint_sha256")] == [
        "acme.clients.test", "spiffe://test/acme", "acme", hashlib.sha256(der).hexdigest()]


async def test_a_certificate_without_the_field_gives_no_id(pki: dict[str, Issued]) -> None:
    peer = await handshake(pki, "bare")
    assert (cert_id("san_dns", peer), cert_id("subject_cn", peer)) == (None, "bare-client")


async def test_no_certificate_or_an_unverified_one_gives_no_id(pki: dict[str, Issued]) -> None:
    none = await handshake(pki, None)
    unverified = await handshake(pki, "acme", verify=False)
    assert [cert_id("subject_cn", none), cert_id("subject_cn", unverified), cert_id("fingerprint_sha256", None)] \
        == [None, None, None]
