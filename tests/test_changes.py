"""State transitions: each refuses bad requests and leaves the state untouched."""

from __future__ import annotations

import copy

import pytest

from proxy import changes
from proxy.errors import ConflictError, NotFoundError, ValidationError
from proxy.model import Version, VersionSpec
from proxy.parse import parse_document

STATE = parse_document({
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]},
                 "old": {"endpoints": ["http://127.0.0.1:9100"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}, "fallback": ["v1"]}],
})


def test_set_split_merges_keeping_bucket_order() -> None:
    new, summary = changes.set_split(STATE, "web", {"v2": 20, "v1": 80})
    assert new.route("web").split == (("v1", 80.0), ("v2", 20.0))  # type: ignore[union-attr]
    assert summary == "split web: v1=90 v2=10 -> v1=80 v2=20"
    assert changes.set_split(STATE, "web", {"v1": 90})[1] == ""  # no-op


def test_refused_changes_leave_state_untouched() -> None:
    # A deep copy, not another name for STATE: a transition that mutated it in place would change both.
    before = copy.deepcopy(STATE)
    assert before is not STATE
    with pytest.raises(ValidationError):
        changes.set_split(STATE, "web", {"v3": 10})
    with pytest.raises(ValidationError):
        changes.set_split(STATE, "web", {"v1": 0, "v2": 0})
    with pytest.raises(NotFoundError):
        changes.set_split(STATE, "nope", {"v1": 1})
    with pytest.raises(ConflictError):
        changes.delete_version(STATE, "v1")
    assert STATE == before


def test_versions_are_immutable() -> None:
    same = Version("v1", STATE.versions["v1"].spec, STATE.versions["v1"].endpoints)
    assert changes.put_version(STATE, same) == (STATE, "")
    with pytest.raises(ConflictError):
        changes.put_version(STATE, Version("v1", VersionSpec("static", ("http://127.0.0.1:1",)), ()))
    new, summary = changes.delete_version(STATE, "old")
    assert "old" not in new.versions and summary == "retire version old"


def test_pin_unpin() -> None:
    s, summary = changes.pin(STATE, "web", "acme", "v2")
    assert s.route("web").pins == {"acme": "v2"} and summary == "pin web: acme -> v2"  # type: ignore[union-attr]
    s2, _ = changes.unpin(s, "web", "acme")
    assert s2.route("web").pins == {}  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        changes.unpin(STATE, "web", "acme")


def test_rollback_route_restores_earlier_route() -> None:
    changed, _ = changes.set_split(STATE, "web", {"v2": 100, "v1": 0})
    back, summary = changes.rollback_route(changed, "web", STATE, 3)
    assert back == STATE
    assert summary == "rollback web to revision 3: v1=90 v2=10"
    assert changes.route_changes(STATE, changed) == {"web"}
