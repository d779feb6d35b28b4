"""Zones in the model: static endpoints with zones, local `zone`, docker `zones`, route `zone_affinity`;
errors naming the field; round trips through route files, revisions (codec) and a store restart; the
static configuration's `zone` and `docker.engines`."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import changes
from proxy.cli import build_parser
from proxy.commands.serve import settings_from_args
from proxy.config import parse_config
from proxy.errors import ValidationError
from proxy.parse import document_of, parse_document, parse_yaml, state_from_stored, state_to_stored
from proxy.store import SQLiteStore
from proxy.store.codec import Codec
from proxy.supervisor.process import settings_from_json, settings_to_json

ZONED = """
versions:
  v1:
    endpoints:
      - {url: "http://127.0.0.1:9001", zone: eu-1a}
      - "http://127.0.0.1:9002"
      - {url: "http://127.0.0.1:9003", zone: eu-1b}
  v2: {command: "python -m http.server", zone: eu-1c}
  v3: {image: "web@sha256:%s", zones: [eu-1a, eu-1b], replicas: 4}
routes:
  - {name: web, split: {v1: 1}, zone_affinity: false}
  - {name: api, split: {v1: 1}}
""" % ("a" * 64)


def errors_of(doc: object) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(doc)
    return [str(x) for x in e.value.errors]


def test_zoned_endpoints_plain_strings_and_per_kind_zone_fields() -> None:
    s = parse_yaml(ZONED)
    v1 = s.versions["v1"]
    assert v1.endpoints == ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
    assert v1.spec.endpoint_zones == (("http://127.0.0.1:9001", "eu-1a"), ("http://127.0.0.1:9003", "eu-1b"))
    assert v1.zones == v1.spec.endpoint_zones
    assert s.versions["v2"].spec.zones == ("eu-1c",)
    assert s.versions["v3"].spec.zones == ("eu-1a", "eu-1b")
    assert [r.zone_affinity for r in s.routes] == [False, True]


def test_without_zones_the_model_and_its_documents_are_as_before() -> None:
    s = parse_document({"versions": {"v1": {"endpoints": ["http://127.0.0.1:9001"]}},
                        "routes": [{"name": "web", "split": {"v1": 1}}]})
    assert s.versions["v1"].zones == () and s.versions["v1"].spec.endpoint_zones == ()
    assert document_of(s) == {"versions": {"v1": {"endpoints": ["http://127.0.0.1:9001"]}},
                              "routes": [{"name": "web", "match": {"path_prefix": "/"}, "split": {"v1": 1},
                                          "sticky": True}]}


def test_route_file_round_trip_keeps_zones() -> None:
    s = parse_yaml(ZONED)
    doc = document_of(s)
    assert doc["versions"]["v1"]["endpoints"] == [
        {"url": "http://127.0.0.1:9001", "zone": "eu-1a"}, "http://127.0.0.1:9002",
        {"url": "http://127.0.0.1:9003", "zone": "eu-1b"}]
    assert doc["versions"]["v2"]["zone"] == "eu-1c"
    assert doc["versions"]["v3"]["zones"] == ["eu-1a", "eu-1b"]
    assert doc["routes"][0]["zone_affinity"] is False and "zone_affinity" not in doc["routes"][1]
    assert parse_document(doc) == s


def test_errors_name_the_field() -> None:
    v = {"endpoints": [{"url": "http://127.0.0.1:1", "zone": "bad zone"}, {"zone": "a"},
                       {"url": "ftp://x:1", "zone": "a"}, {"url": "http://127.0.0.1:2", "rack": "r1"}]}
    assert errors_of({"versions": {"v1": v}}) == [
        "versions.v1.endpoints[0].zone: expected a zone name (1-63 letters, digits, '.', '_' or '-'), got 'bad zone'",
        "versions.v1.endpoints[1].url: required (an http(s)://host:port URL)",
        "versions.v1.endpoints[2].url: expected an http(s)://host:port URL (no path), got 'ftp://x:1'",
        "versions.v1.endpoints[3].rack: unknown field (expected one of: url, zone)",
    ]
    assert errors_of({"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"], "zone": "a"}}}) == [
        "versions.v1.zone: applies to local (command) versions only; give each endpoint as {url: ..., zone: ...}"]
    assert errors_of({"versions": {"v1": {"command": "x", "zones": ["a"]}}}) == [
        "versions.v1.zones: applies to docker (image) versions only"]
    assert errors_of({"versions": {"v1": {"image": "w@sha256:" + "a" * 64, "zones": ["a", "a", 3]}}}) == [
        "versions.v1.zones[1]: zone 'a' is listed twice",
        "versions.v1.zones[2]: expected a zone name (1-63 letters, digits, '.', '_' or '-'), got int"]
    assert errors_of({"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"]}},
                      "routes": [{"name": "r", "split": {"v1": 1}, "zone_affinity": "no"}]}) == [
        "routes[0].zone_affinity: expected true or false, got a string"]


def test_instance_zones_survive_a_revision_and_a_restart(tmp_path: Path) -> None:
    s = parse_yaml(ZONED)
    s, _ = changes.set_instances(s, "v2", ("http://127.0.0.1:9100",), (("http://127.0.0.1:9100", "eu-1c"),))
    s, _ = changes.set_instances(s, "v3", ("http://127.0.0.1:9200", "http://127.0.0.1:9201"),
                                 (("http://127.0.0.1:9200", "eu-1a"), ("http://127.0.0.1:9201", "eu-1b")))
    assert state_to_stored(s)["versions"]["v3"]["instance_zones"] == {
        "http://127.0.0.1:9200": "eu-1a", "http://127.0.0.1:9201": "eu-1b"}
    assert state_from_stored(state_to_stored(s)) == s
    manifest, blobs = Codec().encode(s)
    assert Codec().decode(manifest, lambda ds: {d: blobs.get(d) for d in ds}) == s
    # set_instances without zones keeps the recorded ones (a provider that does not know them).
    same, summary = changes.set_instances(s, "v3", s.versions["v3"].endpoints)
    assert same is s and summary == ""


async def test_zones_in_a_store_survive_reopening(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    base = parse_yaml(ZONED)
    await store.update(lambda s: changes.apply_document(s, base), actor="t")
    rev = await store.update(lambda s: changes.set_instances(
        s, "v3", ("http://127.0.0.1:9200",), (("http://127.0.0.1:9200", "eu-1b"),)), actor="t")
    await store.close()
    reopened = SQLiteStore(tmp_path / "s.db")
    got = (await reopened.current()).state
    await reopened.close()
    assert got == rev.state
    assert got.versions["v3"].zones == (("http://127.0.0.1:9200", "eu-1b"),)
    assert got.versions["v1"].zones == (("http://127.0.0.1:9001", "eu-1a"), ("http://127.0.0.1:9003", "eu-1b"))


def test_config_zone_and_docker_engines() -> None:
    got = parse_config("zone: eu-1a\ndocker:\n  engines: {eu-1a: unix:///run/a.sock, eu-1b: 'tcp://127.0.0.1:2375'}\n")
    assert got == {"zone": "eu-1a",
                   "docker_engines": (("eu-1a", "unix:///run/a.sock"), ("eu-1b", "tcp://127.0.0.1:2375"))}
    assert parse_config("") == {}
    with pytest.raises(ValidationError) as e:
        parse_config("zone: 'a b'\ndocker: {engines: {eu-1a: /run/a.sock}, hosts: 1}\n")
    assert [str(x) for x in e.value.errors] == [
        "zone: expected a zone name (1-63 letters, digits, '.', '_' or '-'), got 'a b'",
        "docker.hosts: unknown field (expected one of: engines)",
        "docker.engines.eu-1a: expected an engine URL (unix:///path, tcp://host:port), got '/run/a.sock'",
    ]


def test_serve_zone_flag_beats_the_file_and_reaches_workers(tmp_path: Path) -> None:
    config = tmp_path / "turnout.yaml"
    config.write_text("zone: eu-1b\ndocker: {engines: {eu-1a: unix:///run/a.sock}}\n")
    parser = build_parser()
    from_file = settings_from_args(parser.parse_args(["serve", "--config", str(config)]), None)
    assert (from_file.zone, from_file.docker_engines) == ("eu-1b", (("eu-1a", "unix:///run/a.sock"),))
    flag = settings_from_args(parser.parse_args(["serve", "--config", str(config), "--zone", "eu-1a"]), None)
    assert flag.zone == "eu-1a"
    assert settings_from_json(settings_to_json(flag)) == flag
    assert settings_from_args(parser.parse_args(["serve"]), None).zone is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--zone", "a b"])
