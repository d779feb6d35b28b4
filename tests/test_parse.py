"""Validation names every field path; route files round-trip; immutability of version specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import ValidationError
from proxy.model import State
from proxy.parse import (
    document_of,
    parse_document,
    parse_route_body,
    parse_version_body,
    parse_yaml,
    state_from_stored,
    state_to_stored,
)

EP1 = "http://127.0.0.1:9001"

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}, "pins": {"acme": "v2"}, "fallback": ["v1"]}],
}


def errors_of(doc: object) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(doc)
    return [str(x) for x in e.value.errors]


def with_route(**kw: object) -> dict[str, object]:
    route = {**GOOD["routes"][0], **kw}  # type: ignore[index]
    return {"versions": GOOD["versions"], "routes": [route]}


@pytest.mark.parametrize("name", ["demo.yaml", "canary.yaml", "dedicated-client.yaml"])
def test_shipped_route_files_are_valid(name: str) -> None:
    state = parse_yaml((ROOT / "routes" / name).read_text())
    assert state.routes


def test_unknown_version_in_split_names_the_path() -> None:
    assert errors_of(with_route(split={"v1": 90, "v3": 10})) == ["routes[0].split.v3: unknown version 'v3'"]


def test_pins_and_fallbacks_must_name_existing_versions() -> None:
    assert errors_of(with_route(pins={"acme": "nope"}, fallback=["v1", "gone"])) == [
        "routes[0].pins.acme: unknown version 'nope'",
        "routes[0].fallback[1]: unknown version 'gone'",
    ]


def test_weights_non_negative() -> None:
    assert errors_of(with_route(split={"v1": -1, "v2": 10})) == ["routes[0].split.v1: expected a number >= 0, got -1"]
    # Round 4 (issue 14): an all-zero split is accepted, as HTTPRoute accepts all-zero backendRefs weights;
    # such a route answers 500 unless a pin or assignment names a version (tests/dataplane/test_filters.py).
    state = parse_document(with_route(split={"v1": 0, "v2": 0}))
    assert state.routes[0].split == (("v1", 0.0), ("v2", 0.0))
    assert errors_of(with_route(split={"v1": "ten"})) == ["routes[0].split.v1: expected a number, got a string"]


def test_fallback_loops_and_duplicate_routes_refused() -> None:
    assert errors_of(with_route(fallback=["v1", "v2", "v1"])) == [
        "routes[0].fallback[2]: version 'v1' is already in the chain (a fallback chain may not loop)"]
    doc = {"versions": GOOD["versions"], "routes": [GOOD["routes"][0], GOOD["routes"][0]]}  # type: ignore[index]
    assert errors_of(doc) == ["routes[1].name: duplicate route name 'web'"]


def test_unknown_fields_refused_everywhere() -> None:
    assert errors_of(with_route(weights={"v1": 1})) == [
        "routes[0].weights: unknown field (expected one of: assignment_cookie, assignment_cookie_max_age, "
        "expose_version, fallback, filters, grpc_method_label, identity, match, matches, mirror, mirrors, name, pins, "
        "pins_require_verified, require_identity, retry, split, sticky, timeouts, version_filters, zone_affinity)"]
    errs = errors_of({"versions": {"v1": {"endpoints": ["http://127.0.0.1:1"], "replica": 2}}, "routes": []})
    assert errs[0].startswith("versions.v1.replica: unknown field")
    assert errors_of({"version": {}})[0].startswith("version: unknown field")


def test_every_error_reported_at_once() -> None:
    doc = {"versions": {"v1": {"endpoints": ["ftp://x"]}, "bad name": {"endpoints": ["http://127.0.0.1:1"]}},
           "routes": [{"name": "r", "split": {"v9": 1}, "match": {"path_prefix": "api"}, "identity": [{"ip": "x"}]}]}
    errs = errors_of(doc)
    assert "versions.v1.endpoints[0]: expected an http(s)://host:port URL (no path), got 'ftp://x'" in errs
    assert "versions['bad name']: a version name is 1-63 letters, digits, '.', '_' or '-'" in errs
    assert "routes[0].split.v9: unknown version 'v9'" in errs
    assert "routes[0].match.path_prefix: expected a path starting with / (no query), got 'api'" in errs
    assert any(e.startswith("routes[0].identity[0].ip: unknown field") for e in errs)


def test_image_must_be_pinned_by_digest_unless_allow_tag() -> None:
    errs = errors_of({"versions": {"v1": {"image": "shop:latest"}}, "routes": []})
    assert errs[0].startswith("versions.v1.image: expected an image pinned by digest")
    digest = "shop@sha256:" + "a" * 64
    assert parse_document({"versions": {"v1": {"image": digest}, "v2": {"image": "shop:2", "allow_tag": True}}})


def test_invalid_yaml_reports_position() -> None:
    with pytest.raises(ValidationError) as e:
        parse_yaml("versions: {v1: [\n")
    assert str(e.value).startswith("invalid YAML: line 2")


def test_changed_spec_for_existing_version_refused() -> None:
    current = parse_document(GOOD, now=100.0)
    changed = {**GOOD, "versions": {**GOOD["versions"], "v1": {"endpoints": ["http://127.0.0.1:9999"]}}}
    with pytest.raises(ValidationError) as e:
        parse_document(changed, current=current)
    assert str(e.value.errors[0]).startswith("versions.v1: version 'v1' exists with a different spec")
    same = parse_document(GOOD, now=200.0, current=current)
    assert same.versions["v1"].created == 100.0  # creation time kept for an unchanged version


def test_round_trips() -> None:
    state = parse_yaml((ROOT / "routes" / "canary.yaml").read_text(), now=5.0)
    assert state_from_stored(state_to_stored(state)) == state
    assert parse_document(document_of(state), now=5.0) == state


def test_a_weight_too_small_to_route_is_refused_with_the_smallest_share_that_routes() -> None:
    assert errors_of(with_route(split={"v1": 99.996, "v2": 0.004})) == [
        "routes[0].split.v2: weight 0.004 is 0.004% of the split, less than the smallest share that "
        "routes (1/10000 = 0.01%); use at least 0.010001, or 0"]
    # Exactly the smallest share is accepted (and gets exactly 1 of 10000 requests: tests/test_select.py).
    assert parse_document(with_route(split={"v1": 99.99, "v2": 0.01})).routes[0].split == (("v1", 99.99), ("v2", 0.01))
    assert parse_document(with_route(split={"v1": 9999, "v2": 1})).routes[0].split[1] == ("v2", 1.0)


def test_a_weight_that_rounding_leaves_without_a_bucket_is_refused() -> None:
    versions = {**GOOD["versions"], "v3": {"endpoints": ["http://127.0.0.1:9103"]}}  # type: ignore[dict-item]
    doc = {"versions": versions, "routes": [{"name": "web", "split": {"v1": 0.035, "v2": 0.01, "v3": 99.955}}]}
    assert errors_of(doc) == [
        "routes[0].split.v2: weight 0.01 gets none of the 10000 buckets (the versions before it end on half a "
        "bucket, which rounding gives to them), so no traffic; use at least 0.010001, or 0"]


def test_stored_revisions_with_a_too_small_weight_still_load() -> None:
    state = parse_document(GOOD)
    stored = state_to_stored(state)
    stored["routes"]["web"]["split"] = {"v1": 99.996, "v2": 0.004}
    assert state_from_stored(stored).routes[0].split == (("v1", 99.996), ("v2", 0.004))


@pytest.mark.parametrize(("field", "body"), [
    ("name", {"split": {"v1": 1}}),
    ("match.host", {"match": {"host": "app.example\n"}, "split": {"v1": 1}}),
    ("match.path_prefix", {"match": {"path_prefix": "/api\n"}, "split": {"v1": 1}}),
    ("assignment_cookie", {"split": {"v1": 1}, "assignment_cookie": "tv\n"}),
    ("identity", {"split": {"v1": 1}, "identity": [{"header": "X-Client-Id\n"}]}),
])
def test_route_fields_with_trailing_newline_are_refused(field: str, body: dict[str, object]) -> None:
    state = State(versions={"v1": parse_version_body({"endpoints": [EP1]}, "v1", 0.0)})
    name = "web\n" if field == "name" else "web"
    with pytest.raises(ValidationError):
        parse_route_body(body, name, state)
