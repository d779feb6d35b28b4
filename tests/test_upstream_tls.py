"""A version's tls block: field-path errors, verification on unless the file says so twice, round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ValidationError
from proxy.model import UpstreamTLS
from proxy.parse import document_of, parse_document, state_from_stored, state_to_stored
from tests.upstream_certs import Certs, make_certs

EP = "https://127.0.0.1:8443"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def doc(tls: object, endpoints: list[str] | None = None) -> dict[str, Any]:
    return {"versions": {"v2": {"endpoints": endpoints or [EP], "tls": tls}},
            "routes": [{"name": "web", "split": {"v2": 1}}]}


def errors(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(d)
    return [str(x) for x in e.value.errors]


def test_a_full_block_parses_into_the_version_spec(certs: Certs) -> None:
    state = parse_document(doc({"ca": certs.ca, "server_name": "api.internal", "verify": True,
                                "client_cert": certs.client.cert, "client_key": certs.client.key}))
    assert state.versions["v2"].spec.tls == UpstreamTLS(ca=certs.ca, server_name="api.internal", verify=True,
                                                        client_cert=certs.client.cert, client_key=certs.client.key)


def test_https_endpoints_without_a_block_parse_with_no_tls_spec() -> None:
    state = parse_document(doc(None))
    assert state.versions["v2"].endpoints == (EP,)
    assert state.versions["v2"].spec.tls is None


def test_a_missing_ca_file_names_the_field(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    assert errors(doc({"ca": missing})) == [f"versions.v2.tls.ca: file not found: {missing}"]


def test_a_ca_file_that_is_no_certificate_names_the_field(certs: Certs) -> None:
    (err,) = errors(doc({"ca": certs.not_pem}))
    assert err.startswith(f"versions.v2.tls.ca: cannot load CA certificates from {certs.not_pem}")


def test_verify_false_without_the_explicit_flag_is_refused() -> None:
    assert errors(doc({"verify": False})) == [
        "versions.v2.tls.verify: false turns certificate verification off: also set insecure_skip_verify: true "
        "to mean it"]


def test_the_flag_without_verify_false_is_refused() -> None:
    assert errors(doc({"insecure_skip_verify": True})) == [
        "versions.v2.tls.insecure_skip_verify: only goes with verify: false"]


def test_verify_false_with_the_flag_parses_unverified() -> None:
    state = parse_document(doc({"verify": False, "insecure_skip_verify": True}))
    assert state.versions["v2"].spec.tls == UpstreamTLS(verify=False)


def test_a_client_cert_needs_its_key(certs: Certs) -> None:
    assert errors(doc({"client_cert": certs.client.cert})) == [
        "versions.v2.tls.client_key: client_cert and client_key go together"]


def test_a_key_that_does_not_match_the_client_cert_names_the_key(certs: Certs) -> None:
    (err,) = errors(doc({"client_cert": certs.client.cert, "client_key": certs.server.key}))
    assert err.startswith(f"versions.v2.tls.client_key: cannot load {certs.client.cert} with key {certs.server.key}")


def test_unknown_fields_in_the_block_are_refused() -> None:
    assert errors(doc({"verify_peer": True})) == [
        "versions.v2.tls.verify_peer: unknown field (expected one of: ca, client_cert, client_key, "
        "insecure_skip_verify, server_name, verify)"]


def test_a_block_on_http_endpoints_is_refused(certs: Certs) -> None:
    assert errors(doc({"ca": certs.ca}, ["http://127.0.0.1:8080"])) == [
        "versions.v2.tls: applies to https:// endpoints; this version's are http://"]


def test_one_version_does_not_mix_http_and_https_endpoints() -> None:
    assert errors(doc(None, [EP, "http://127.0.0.1:8080"])) == [
        "versions.v2.endpoints: mixes http:// and https:// endpoints; one version speaks one of them"]


def test_the_block_round_trips_through_the_route_file_and_the_store(certs: Certs) -> None:
    state = parse_document(doc({"ca": certs.ca, "server_name": "api.internal", "client_cert": certs.client.cert,
                                "client_key": certs.client.key}))
    assert parse_document(document_of(state)) == state
    assert state_from_stored(state_to_stored(state)).versions["v2"].spec == state.versions["v2"].spec


def test_the_unverified_block_round_trips_with_both_keys() -> None:
    state = parse_document(doc({"verify": False, "insecure_skip_verify": True}))
    assert document_of(state)["versions"]["v2"]["tls"] == {"verify": False, "insecure_skip_verify": True}


def test_a_stored_revision_whose_files_are_gone_still_loads(tmp_path: Path) -> None:
    stored = {"versions": {"v2": {"kind": "static", "endpoints": [EP], "tls": {"ca": str(tmp_path / "gone.pem")}}},
              "routes": {"web": {"split": {"v2": 1}}}}
    assert state_from_stored(stored).versions["v2"].spec.tls == UpstreamTLS(ca=str(tmp_path / "gone.pem"))


def test_a_changed_tls_block_is_a_changed_spec(certs: Certs) -> None:
    current = parse_document(doc({"ca": certs.ca}))
    (err,) = errors_with_current(doc({"ca": certs.wrong_ca}), current)
    assert err.startswith("versions.v2: version 'v2' exists with a different spec")


def errors_with_current(d: dict[str, Any], current: Any) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(d, current=current)
    return [str(x) for x in e.value.errors]
