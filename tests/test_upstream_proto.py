"""A version's `protocol:` and `health: {grpc: ...}`: parsed with field-path errors, shown back in the route-file
form, and refused where they disagree with the endpoints."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import ValidationError
from proxy.parse import document_of, parse_document, state_from_stored, state_to_stored


def errors_of(versions: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document({"versions": versions, "routes": []})
    return [f"{fe.path}: {fe.message}" for fe in e.value.errors]


def test_protocols_parse_and_show_back() -> None:
    state = parse_document({"versions": {
        "a": {"endpoints": ["http://127.0.0.1:1"]},
        "b": {"endpoints": ["http://127.0.0.1:2"], "protocol": "h2c", "health": {"grpc": True}},
        "c": {"endpoints": ["https://127.0.0.1:3"], "protocol": "h2", "health": {"grpc": "pkg.Service"}},
    }, "routes": []})
    assert [(v.spec.protocol, v.spec.health.grpc) for v in state.versions.values()] == [
        ("http1", None), ("h2c", ""), ("h2", "pkg.Service")]
    doc = document_of(state)["versions"]
    assert doc["a"] == {"endpoints": ["http://127.0.0.1:1"]}
    assert doc["b"] == {"endpoints": ["http://127.0.0.1:2"], "protocol": "h2c",
                        "health": {"path": "/", "interval": 2.0, "timeout": 1.0, "grpc": True}}
    assert (doc["c"]["protocol"], doc["c"]["health"]["grpc"]) == ("h2", "pkg.Service")
    # Stored revisions keep them (a rollback restores the protocol too).
    assert state_from_stored(state_to_stored(state)).versions == state.versions


def test_protocol_errors_name_the_field() -> None:
    assert errors_of({"a": {"endpoints": ["http://127.0.0.1:1"], "protocol": "http2"}}) == [
        "versions.a.protocol: expected one of http1, h2c, h2, got 'http2'"]
    assert errors_of({"a": {"endpoints": ["http://127.0.0.1:1"], "protocol": "h2"}}) == [
        "versions.a.protocol: h2 is HTTP/2 over TLS and needs https:// endpoints (use h2c for cleartext HTTP/2)"]
    assert errors_of({"a": {"endpoints": ["https://127.0.0.1:1"], "protocol": "h2c"}}) == [
        "versions.a.protocol: h2c is cleartext HTTP/2 and needs http:// endpoints (use h2 for https://)"]
    assert errors_of({"a": {"command": "serve", "protocol": "h2"}}) == [
        "versions.a.protocol: h2 needs static https:// endpoints (use h2c for local and docker versions)"]
    assert errors_of({"a": {"endpoints": ["http://127.0.0.1:1"], "health": {"grpc": True}}}) == [
        "versions.a.health.grpc: gRPC speaks HTTP/2: set the version's protocol to h2c or h2"]
    assert errors_of({"a": {"endpoints": ["http://127.0.0.1:1"], "protocol": "h2c", "health": {"grpc": "a b"}}}) == [
        "versions.a.health.grpc: expected true, false or a gRPC service name (package.Service), got 'a b'"]
