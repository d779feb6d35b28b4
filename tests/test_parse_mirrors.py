"""`mirrors:` in route files (several mirrors per route), `mirror:` still valid as a one-item list, their
errors by field path, and both forms through the store's JSON and back."""

from __future__ import annotations

import pytest

from proxy.errors import ValidationError
from proxy.model import Mirror
from proxy.parse import parse_document, route_to_dict, state_from_stored, state_to_stored

VERSIONS = {n: {"endpoints": [f"http://127.0.0.1:{9100 + i}"]} for i, n in enumerate(("v1", "v2", "v3", "v4"))}


def doc(**kw: object) -> dict[str, object]:
    return {"versions": VERSIONS, "routes": [{"name": "web", "split": {"v1": 100}, **kw}]}


def errors_of(d: object) -> list[str]:
    with pytest.raises(ValidationError) as e:
        parse_document(d)
    return [str(x) for x in e.value.errors]


def test_several_mirrors_and_the_one_mirror_form() -> None:
    many = parse_document(doc(mirrors=[{"version": "v3", "percent": 12.5}, {"version": "v4", "percent": 12.5}]))
    [r] = many.routes
    assert r.mirrors == (Mirror("v3", 12.5), Mirror("v4", 12.5))
    assert r.referenced_versions() == {"v1", "v3", "v4"}
    assert route_to_dict(r)["mirrors"] == [{"version": "v3", "percent": 12.5}, {"version": "v4", "percent": 12.5}]
    one = parse_document(doc(mirror={"version": "v3", "percent": 10}))
    assert one.routes[0].mirrors == (Mirror("v3", 10.0),)
    assert one.routes[0].mirror == Mirror("v3", 10.0)
    # One mirror keeps being written as `mirror:`, so files and answers that had one look as before.
    assert route_to_dict(one.routes[0])["mirror"] == {"version": "v3", "percent": 10.0}
    assert "mirrors" not in route_to_dict(one.routes[0])
    assert parse_document(doc(mirrors=[{"version": "v3"}])).routes[0].mirrors == (Mirror("v3", 100.0),)
    for state in (many, one):
        assert state_from_stored(state_to_stored(state)) == state


def test_mirror_errors_name_the_field() -> None:
    assert errors_of(doc(mirror={"version": "v3"}, mirrors=[{"version": "v4"}])) == [
        "routes[0].mirrors: give either mirror (one) or mirrors (a list), not both"]
    assert errors_of(doc(mirrors={"version": "v3"})) == [
        "routes[0].mirrors: expected a list of {version, percent}, got a mapping"]
    assert errors_of(doc(mirrors=[{"version": "v3", "percent": 101}, {"version": "v9"}, {"version": "v4"},
                                  {"version": "v4", "percent": 1}, {"version": "v2", "share": 1}])) == [
        "routes[0].mirrors[0].percent: expected a number between 0 and 100, got 101",
        "routes[0].mirrors[1].version: unknown version 'v9'",
        "routes[0].mirrors[3].version: version 'v4' is already a mirror of this route",
        "routes[0].mirrors[4].share: unknown field (expected one of: percent, version)",
    ]
