"""The static configuration file (proxy.config): every field parsed, unknown keys and bad values refused
with their field paths, all errors at once; serve's flags override it."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import build_parser
from proxy.commands.serve import settings_from_args
from proxy.config import parse_config
from proxy.errors import ValidationError
from proxy.settings import Certificate, Limits, Listener, Timeouts, TlsConfig


def errors_of(text: str) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_config(text, "/etc/turnout")
    return [str(x) for x in e.value.errors]


FULL = """
listeners:
  - name: public
    address: 127.0.0.1:8443
    tls:
      certificates:
        - {cert: certs/api.pem, key: certs/api-key.pem}
        - {cert: /abs/admin.pem, key: /abs/admin-key.pem}
      client_ca: certs/clients-ca.pem
      client_cert: required
      min_version: "1.3"
    protocols: [http/1.1]
  - name: plain
    address: "[::1]:8080"
admin: 127.0.0.1:9081
workers: 2
limits: {max_connections: 100, max_header_bytes: 4096}
timeouts: {upstream_response: 5, shutdown_grace: 0}
trusted_proxies: [127.0.0.1/32, "::1"]
access_log: "-"
"""


def test_every_field_of_the_file_is_parsed_and_relative_files_are_from_its_directory() -> None:
    got = parse_config(FULL, "/etc/turnout")
    assert got == {
        "listeners": (
            Listener("public", ("127.0.0.1", 8443), tls=TlsConfig(
                certificates=(Certificate("/etc/turnout/certs/api.pem", "/etc/turnout/certs/api-key.pem"),
                              Certificate("/abs/admin.pem", "/abs/admin-key.pem")),
                client_ca="/etc/turnout/certs/clients-ca.pem", client_cert="required", min_version="1.3")),
            Listener("plain", ("::1", 8080)),
        ),
        "listen": ("127.0.0.1", 8443),
        "admin": ("127.0.0.1", 9081),
        "workers": 2,
        "limits": {"max_connections": 100, "max_header_bytes": 4096},
        "timeouts": {"upstream_response": 5.0, "shutdown_grace": 0.0},
        "trusted_proxies": ("127.0.0.1/32", "::1"),
        "access_log": "-",
    }


def test_an_empty_file_sets_nothing() -> None:
    assert parse_config("", ".") == {}


def test_unknown_keys_are_errors_with_their_field_paths() -> None:
    assert errors_of("""
listener: []
listeners:
  - {address: 127.0.0.1:1, port: 2}
  - address: 127.0.0.1:2
    tls: {certificates: [{cert: a.pem, key: a-key.pem, chain: c.pem}], sni: strict}
limits: {max_conections: 1}
""") == [
        "listener: unknown field (expected one of: access_log, admin, check_interval, docker, grpc_error_codes, "
        "limits, listeners, timeouts, trusted_proxies, workers, zone)",
        "listeners[0].port: unknown field (expected one of: address, name, protocols, tls)",
        "listeners[1].tls.sni: unknown field (expected one of: certificates, client_ca, client_cert, min_version)",
        "listeners[1].tls.certificates[0].chain: unknown field (expected one of: cert, key)",
        "limits.max_conections: unknown field (expected one of: h2_max_concurrent_streams, "
        "h2_max_control_frames, h2_max_resets, high_water, low_water, max_body_bytes, max_connections, "
        "max_header_bytes, max_headers, max_pipelined, max_request_line, max_upstream_connections, "
        "retry_buffer_bytes)",
    ]


def test_bad_values_are_errors_with_their_field_paths() -> None:
    assert errors_of("""
listeners:
  - name: a
    address: nowhere
  - name: a
    address: 127.0.0.1:2
    tls:
      certificates: [{cert: a.pem}]
      client_cert: sometimes
      min_version: "1.1"
    protocols: [h2, h2c, spdy/3]
  - name: c
    address: 127.0.0.1:2
    tls: {certificates: []}
workers: 0
timeouts: {header_read: 0}
limits: {low_water: 10, high_water: 5}
trusted_proxies: [not-an-ip]
""") == [
        "listeners[0].address: expected HOST:PORT, got 'nowhere'",
        "listeners[1].tls.certificates[0].key: required (a PEM file)",
        "listeners[1].tls.client_cert: expected optional or required, got 'sometimes'",
        "listeners[1].tls.client_cert: needs client_ca (the CA that verifies client certificates)",
        "listeners[1].tls.min_version: TLS 1.1 is refused (insecure); expected 1.2 or 1.3",
        "listeners[1].protocols[1]: h2c is cleartext HTTP/2; a tls listener offers h2",
        "listeners[1].protocols[2]: expected one of: http/1.1, h2, h2c, got 'spdy/3'",
        "listeners[1].name: 'a' is also the name of listeners[0]",
        "listeners[2].tls.certificates: expected a non-empty list of {cert: FILE, key: FILE}",
        "listeners[2].address: listeners[1] listens there too",
        "workers: expected a number between 1 and 1024, got 0",
        "limits.low_water: must not exceed high_water (5), got 10",
        "timeouts.header_read: expected a number of seconds > 0, got 0",
        "trusted_proxies[0]: expected an IP address or CIDR, got 'not-an-ip'",
    ]


def test_a_file_that_is_not_yaml_is_one_error() -> None:
    assert len(errors_of("listeners: [")) == 1


def test_flags_override_the_file_field_by_field_and_listen_replaces_its_listeners(tmp_path: Path) -> None:
    config = tmp_path / "turnout.yaml"
    config.write_text("listeners:\n  - {name: a, address: 127.0.0.1:9001}\n  - {name: b, address: 127.0.0.1:9002}\n"
                      "admin: 127.0.0.1:9100\nworkers: 3\nlimits: {max_headers: 10, max_pipelined: 4}\n"
                      "timeouts: {header_read: 2, shutdown_grace: 1}\ntrusted_proxies: [10.0.0.1]\n")
    parser = build_parser()
    got = settings_from_args(parser.parse_args(["serve", "--config", str(config), "--max-headers", "20",
                                                "--timeout-header-read", "3", "--workers", "2"]), None)
    assert [li.name for li in got.listeners] == ["a", "b"]
    assert got.listen == ("127.0.0.1", 9001)
    assert (got.admin, got.workers, got.trusted_proxies) == (("127.0.0.1", 9100), 2, ("10.0.0.1",))
    assert got.limits == Limits(max_headers=20, max_pipelined=4)
    assert got.timeouts == Timeouts(header_read=3.0, shutdown_grace=1.0)
    got = settings_from_args(parser.parse_args(["serve", "--config", str(config), "--listen", "127.0.0.1:9009"]),
                             None)
    assert (got.listeners, got.listen) == ((), ("127.0.0.1", 9009))
    assert got.limits == Limits(max_headers=10, max_pipelined=4)


def test_h2_is_for_tls_listeners_and_h2c_for_cleartext_ones() -> None:
    assert errors_of("""
listeners:
  - {name: a, address: 127.0.0.1:1, protocols: [http/1.1, h2]}
""") == ["listeners[0].protocols[1]: h2 needs tls (cleartext HTTP/2 is h2c)"]
    listeners = parse_config("""
listeners:
  - {name: a, address: 127.0.0.1:1, protocols: [http/1.1, h2c]}
  - {name: b, address: 127.0.0.1:2, protocols: [h2, http/1.1], tls: {certificates: [{cert: c.pem, key: k.pem}]}}
limits: {h2_max_concurrent_streams: 10, h2_max_resets: 5, h2_max_control_frames: 50}
""", "/etc")
    assert [x.protocols for x in listeners["listeners"]] == [("http/1.1", "h2c"), ("h2", "http/1.1")]
    assert listeners["limits"] == {"h2_max_concurrent_streams": 10, "h2_max_resets": 5, "h2_max_control_frames": 50}


def test_the_http2_flag_makes_the_listen_listener_take_h2_over_tls_and_h2c_in_cleartext() -> None:
    parser = build_parser()
    got = settings_from_args(parser.parse_args(["serve", "--listen", "127.0.0.1:9009", "--http2"]), None)
    assert [(li.address, li.tls, li.protocols) for li in got.listeners] == [
        (("127.0.0.1", 9009), None, ("http/1.1", "h2c"))]
    got = settings_from_args(parser.parse_args(["serve", "--listen", "127.0.0.1:9009", "--http2", "--tls-cert",
                                                "c.pem", "--tls-key", "k.pem"]), None)
    assert [li.protocols for li in got.listeners] == [("h2", "http/1.1")]
    got = settings_from_args(parser.parse_args(["serve", "--listen", "127.0.0.1:9009"]), None)
    assert got.listeners == ()
