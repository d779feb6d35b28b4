"""The admin REST API over a real loopback socket."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.changes import set_split
from proxy.errors import StoreUnavailableError
from proxy.store import SQLiteStore
from tests.admin.conftest import ALICE, BOB, EP1, EP2, Admin
from tests.raw import raw_exchange

PROBLEM = "application/problem+json"


def paths(body: dict[str, Any]) -> list[str]:
    return [e["path"] for e in body["errors"]]


# state, ETag, probes

async def test_state_starts_empty_with_etag(admin: Admin) -> None:
    r = await admin.call("GET", "/api/v1/state")
    assert (r.status, r.headers["ETag"]) == (200, '"0"')
    assert r.body == {"revision": 0, "versions": {}, "routes": {}}


async def test_state_after_writes_has_revision_etag_and_stored_shape(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("GET", "/api/v1/state")
    assert r.headers["ETag"] == '"4"'
    assert r.body["revision"] == 4
    assert r.body["routes"] == {"web": {"match": {"path_prefix": "/"}, "identity": [{"header": "x-client-id"}],
                                        "split": {"v1": 100}, "sticky": True, "fallback": ["v1"]}}
    assert r.body["versions"]["v1"]["endpoints"] == [EP1]
    again = await admin.call("GET", "/api/v1/state", headers={"If-None-Match": '"4"'})
    assert (again.status, again.headers["ETag"]) == (304, '"4"')


async def test_probes_need_no_token(admin: Admin) -> None:
    live = await admin.call("GET", "/healthz", token=None)
    assert (live.status, live.body) == (200, {"status": "ok"})
    ready = await admin.call("GET", "/readyz", token=None)
    assert (ready.status, ready.body["status"]) == (200, "ready")


async def test_readyz_is_unready_while_the_table_lags_the_store(admin: Admin) -> None:
    await admin.seed()
    # A commit that bypassed this process's table (another replica, say) and no watcher to deliver it.
    admin.ctx.holder.table = type(admin.ctx.holder.table)(admin.ctx.holder.table.state, 0)
    r = await admin.call("GET", "/readyz", token=None)
    assert (r.status, r.body) == (503, {"status": "unready", "store": "ok", "store_revision": 4,
                                        "table_revision": 0})


# tokens

@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {ALICE}", "Bearer ", f"Bearer {ALICE}x"])
async def test_missing_or_wrong_token_is_401_and_changes_nothing(admin: Admin, auth: str | None) -> None:
    await admin.seed()
    headers = {} if auth is None else {"Authorization": auth}
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 50}, token=None, headers=headers)
    assert (r.status, r.content_type) == (401, PROBLEM)
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="turnout"'
    assert r.body["type"] == "urn:turnout:problem:unauthorized"
    assert await admin.revision() == 4
    read = await admin.call("GET", "/api/v1/state", token=None, headers=headers)
    assert read.status == 401
    unknown = await admin.call("GET", "/api/v1/nothing-here", token=None, headers=headers)
    assert unknown.status == 401


async def test_actor_is_the_token_name(admin: Admin) -> None:
    await admin.seed()
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10}, token=BOB)
    r = await admin.call("GET", "/api/v1/revisions", params={"limit": "2"})
    assert [(x["revision"], x["actor"]) for x in r.body["revisions"]] == [(5, "bob"), (4, "alice")]


# validation

async def test_bad_route_body_lists_every_field_path_and_changes_nothing(admin: Admin) -> None:
    await admin.seed()
    body = {"split": {"v1": 50, "v9": 50}, "match": {"path_prefix": "no-slash"}, "sticky": "yes"}
    r = await admin.call("PUT", "/api/v1/routes/api", body)
    assert (r.status, r.content_type) == (422, PROBLEM)
    assert set(r.body) == {"type", "title", "status", "detail", "errors"}
    assert r.body["status"] == 422
    assert sorted(paths(r.body)) == ["match.path_prefix", "split.v9", "sticky"]
    assert {"path": "split.v9", "message": "unknown version 'v9'"} in r.body["errors"]
    assert await admin.revision() == 4


async def test_unknown_fields_are_refused_by_name(admin: Admin) -> None:
    r = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP1], "endpoint": EP2})
    assert r.status == 422
    assert paths(r.body) == ["endpoint"]
    assert r.body["errors"][0]["message"].startswith("unknown field")
    await admin.seed()
    pin = await admin.call("PUT", "/api/v1/routes/web/pins/acme", {"version": "v2", "until": "friday"})
    assert (pin.status, paths(pin.body)) == (422, ["until"])
    route = await admin.call("PUT", "/api/v1/routes/web", {"split": {"v1": 1}, "spilt": {"v2": 1}})
    assert (route.status, paths(route.body)) == (422, ["spilt"])
    rb = await admin.call("POST", "/api/v1/routes/web/rollback", {"rev": 1})
    assert (rb.status, paths(rb.body)) == (422, ["rev"])
    assert await admin.revision() == 4


@pytest.mark.parametrize(("data", "detail"), [
    ("{", "invalid JSON: line 1, column 2: Expecting property name enclosed in double quotes"),
    ('{"v1": NaN}', "invalid JSON: NaN is not a number JSON allows"),
    ('{"v1": 1, "v1": 2}', "invalid JSON: duplicate key 'v1'"),
    ("", "expected a JSON body"),
])
async def test_malformed_json_is_400(admin: Admin, data: str, detail: str) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", data=data)
    assert (r.status, r.content_type, r.body["detail"]) == (400, PROBLEM, detail)
    assert await admin.revision() == 4


async def test_split_validation_and_merge(admin: Admin) -> None:
    await admin.seed()
    bad = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": -1, "nope": 3})
    assert (bad.status, sorted(paths(bad.body))) == (422, ["nope", "v1"])
    # 1e999 is valid JSON that Python reads as infinity: refused like any out-of-range weight.
    huge = await admin.call("PATCH", "/api/v1/routes/web/split", data='{"v2": 1e999}')
    assert (huge.status, huge.body["errors"]) == (422, [{"path": "v2", "message": "expected a number >= 0, got inf"}])
    ok = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 90, "v2": 10})
    assert (ok.status, ok.body) == (200, {"revision": 5, "changed": True,
                                          "summary": "split web: v1=100 -> v1=90 v2=10"})
    assert ok.headers["ETag"] == '"5"'
    same = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10})
    assert same.body == {"revision": 5, "changed": False, "summary": ""}
    missing = await admin.call("PATCH", "/api/v1/routes/nope/split", {"v1": 1})
    assert (missing.status, missing.body["detail"]) == (404, "no route named 'nope'")


# If-Match

async def test_stale_if_match_is_412_and_changes_nothing(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10}, headers={"If-Match": '"3"'})
    assert (r.status, r.content_type) == (412, PROBLEM)
    assert (r.body["expected_revision"], r.body["current_revision"], r.headers["ETag"]) == (3, 4, '"4"')
    assert await admin.revision() == 4
    ok = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10}, headers={"If-Match": '"4"'})
    assert (ok.status, ok.body["revision"]) == (200, 5)
    bad = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 20}, headers={"If-Match": "latest"})
    assert (bad.status, paths(bad.body)) == (400, ["If-Match"])


# versions

async def test_register_same_spec_is_a_noop_and_a_different_one_409(admin: Admin) -> None:
    first = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP1]})
    assert (first.status, first.body["revision"], first.body["changed"]) == (201, 1, True)
    assert first.body["summary"] == "register version v1 (static)"
    again = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP1]})
    assert (again.status, again.body["revision"], again.body["changed"]) == (200, 1, False)
    other = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP2]})
    assert (other.status, other.content_type) == (409, PROBLEM)
    assert "immutable" in other.body["detail"]
    assert await admin.revision() == 1


async def test_delete_version_is_409_while_a_route_uses_it(admin: Admin) -> None:
    await admin.seed()
    used = await admin.call("DELETE", "/api/v1/versions/v1")
    assert (used.status, used.body["detail"]) == (409, "version 'v1' is still referenced by route(s) web")
    assert await admin.revision() == 4
    free = await admin.call("DELETE", "/api/v1/versions/v3")
    assert (free.status, free.body["summary"]) == (200, "retire version v3")
    gone = await admin.call("GET", "/api/v1/versions/v3")
    assert gone.status == 404


async def test_versions_listing_names_the_routes_using_each(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("GET", "/api/v1/versions")
    assert [(v["name"], v["kind"], v["instances"], v["routes"]) for v in r.body["versions"]] == [
        ("v1", "static", [EP1], ["web"]), ("v2", "static", [EP2], []), ("v3", "static", ["http://127.0.0.1:9003"], [])]
    assert all(v["created"] > 0 for v in r.body["versions"])


# routes and pins

async def test_route_put_get_roundtrip_and_delete(admin: Admin) -> None:
    await admin.seed()
    got = await admin.call("GET", "/api/v1/routes/web")
    assert got.body["name"] == "web"
    same = await admin.call("PUT", "/api/v1/routes/web", got.body)
    assert (same.status, same.body["changed"]) == (200, False)
    wrong_name = await admin.call("PUT", "/api/v1/routes/web", {**got.body, "name": "api"})
    assert (wrong_name.status, paths(wrong_name.body)) == (422, ["name"])
    gone = await admin.call("DELETE", "/api/v1/routes/web")
    assert (gone.status, gone.body["summary"]) == (200, "delete route web")
    assert (await admin.call("DELETE", "/api/v1/routes/web")).status == 404
    bad = await admin.call("PUT", "/api/v1/routes/no spaces", {"split": {"v1": 1}})
    assert (bad.status, paths(bad.body)) == (422, ["name"])
    bad_version = await admin.call("PUT", "/api/v1/versions/no spaces", {"endpoints": [EP1]})
    assert (bad_version.status, bad_version.body["errors"]) == (
        422, [{"path": "name", "message": "a version name is 1-63 letters, digits, '.', '_' or '-'"}])


async def test_pin_and_unpin(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("PUT", "/api/v1/routes/web/pins/acme corp/eu", {"version": "v2"})
    assert (r.status, r.body["summary"]) == (200, "pin web: acme corp/eu -> v2")
    state = await admin.call("GET", "/api/v1/state")
    assert state.body["routes"]["web"]["pins"] == {"acme corp/eu": "v2"}
    assert admin.ctx.holder.table.route("web") is not None
    unknown = await admin.call("PUT", "/api/v1/routes/web/pins/acme", {"version": "v9"})
    assert (unknown.status, unknown.body["errors"]) == (422, [{"path": "version", "message": "unknown version 'v9'"}])
    un = await admin.call("DELETE", "/api/v1/routes/web/pins/acme corp/eu")
    assert (un.status, un.body["summary"]) == (200, "unpin web: acme corp/eu")
    again = await admin.call("DELETE", "/api/v1/routes/web/pins/acme corp/eu")
    assert again.status == 404


# rollback

async def test_rollback_to_before_the_last_change_and_back(admin: Admin) -> None:
    await admin.seed()  # route web created at revision 4
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 90, "v2": 10})  # 5
    await admin.call("PUT", "/api/v1/versions/v4", {"endpoints": ["http://127.0.0.1:9004"]})  # 6: not web
    r = await admin.call("POST", "/api/v1/routes/web/rollback", {}, params={"reason": "v2 errors"})
    assert r.status == 200
    assert (r.body["revision"], r.body["rolled_back_to"]) == (7, 4)
    assert r.body["summary"] == "rollback web to revision 4: v1=100"
    assert r.body["route"]["split"] == {"v1": 100}
    # The rollback is itself the route's latest change, so a second one undoes it.
    back = await admin.call("POST", "/api/v1/routes/web/rollback", data="")
    assert (back.body["revision"], back.body["rolled_back_to"], back.body["route"]["split"]) == (
        8, 6, {"v1": 90, "v2": 10})
    hist = await admin.call("GET", "/api/v1/revisions", params={"route": "web", "limit": "1"})
    assert hist.body["revisions"][0]["reason"] == ""
    seven = await admin.call("GET", "/api/v1/revisions/7")
    assert (seven.body["reason"], seven.body["actor"]) == ("v2 errors", "alice")


async def test_rollback_to_a_given_revision(admin: Admin) -> None:
    await admin.seed()
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 50, "v2": 50})  # 5
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100})  # 6
    r = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": 5})
    assert (r.body["revision"], r.body["route"]["split"]) == (7, {"v1": 50, "v2": 50})
    assert admin.ctx.holder.table.revision == 7
    # At revision 0 the route did not exist: rolling back to it removes the route.
    zero = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": 0})
    assert (zero.body["summary"], "route" in zero.body) == ("rollback web to revision 0 (route did not exist)", False)
    future = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": 99})
    assert (future.status, future.body["detail"]) == (404, "no revision 99")
    neg = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": -1})
    assert (neg.status, paths(neg.body)) == (422, ["revision"])


async def test_rollback_to_a_compacted_revision_is_404_and_kept_ones_restore_pins(admin: Admin) -> None:
    store = admin.ctx.store
    assert isinstance(store, SQLiteStore)
    store.keep = 2
    await admin.seed()
    for client in ("a", "b", "c"):  # 5, 6, 7
        await admin.call("PUT", f"/api/v1/routes/web/pins/{client}", {"version": "v2"})
    assert await store.gc() == (5, 2)  # revisions 1-5; the pins blobs only 5 used (its chunk, its index)
    gone = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": 5})
    assert (gone.status, gone.body["detail"]) == (
        404, "revision 5 was compacted: only the newest revisions' states are kept (its history line remains)")
    assert await admin.revision() == 7
    assert [x["revision"] for x in (await admin.call("GET", "/api/v1/revisions")).body["revisions"]] == \
        [7, 6, 5, 4, 3, 2, 1]
    r = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": 6})
    assert (r.status, r.body["route"]["pins"]) == (200, 2)
    route = await admin.call("GET", "/api/v1/routes/web")
    assert route.body["pins"] == {"a": "v2", "b": "v2"}


async def test_rollback_of_a_route_without_history_is_404(admin: Admin) -> None:
    r = await admin.call("POST", "/api/v1/routes/ghost/rollback", {})
    assert (r.status, r.body["detail"]) == (404, "route 'ghost' has no change in the history to roll back")


# history

async def test_history_filters_by_route_and_limits(admin: Admin) -> None:
    await admin.seed()
    await admin.call("PUT", "/api/v1/routes/api", {"match": {"path_prefix": "/api"}, "split": {"v2": 1}},
                     headers={"X-Turnout-Reason": "new api route"})  # 5
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v3": 5}, params={"reason": "try v3 ✓"})  # 6
    await admin.call("PATCH", "/api/v1/routes/api/split", {"v3": 1})  # 7
    web = await admin.call("GET", "/api/v1/revisions", params={"route": "web"})
    assert [x["revision"] for x in web.body["revisions"]] == [6, 4]
    assert web.body["revisions"][0] == {**web.body["revisions"][0], "actor": "alice", "reason": "try v3 ✓",
                                        "summary": "split web: v1=100 -> v1=100 v3=5", "routes_changed": ["web"]}
    api = await admin.call("GET", "/api/v1/revisions", params={"route": "api"})
    assert [(x["revision"], x["reason"]) for x in api.body["revisions"]] == [(7, ""), (5, "new api route")]
    limited = await admin.call("GET", "/api/v1/revisions", params={"limit": "3"})
    assert [x["revision"] for x in limited.body["revisions"]] == [7, 6, 5]
    bad = await admin.call("GET", "/api/v1/revisions", params={"limit": "0"})
    assert (bad.status, paths(bad.body)) == (400, ["limit"])


async def test_revision_detail_is_the_full_state_then(admin: Admin) -> None:
    await admin.seed()
    await admin.call("DELETE", "/api/v1/routes/web")
    r = await admin.call("GET", "/api/v1/revisions/4")
    assert (r.status, r.headers["ETag"], r.body["revision"]) == (200, '"4"', 4)
    assert list(r.body["routes"]) == ["web"] and sorted(r.body["versions"]) == ["v1", "v2", "v3"]
    assert r.body["summary"] == "create route web: v1=100"
    nope = await admin.call("GET", "/api/v1/revisions/abc")
    assert nope.status == 400


# apply

ROUTE_FILE = f"""
versions:
  v1: {{endpoints: ["{EP1}"]}}
  v2: {{endpoints: ["{EP2}"]}}
routes:
  - name: web
    split: {{v1: 90, v2: 10}}
    pins: {{acme: v2}}
"""


async def test_apply_route_file(admin: Admin) -> None:
    r = await admin.call("POST", "/api/v1/apply", data=ROUTE_FILE, headers={"Content-Type": "application/yaml"})
    assert (r.status, r.body) == (200, {"revision": 1, "changed": True, "summary": "apply file: 1 route(s) +v1,v2"})
    assert admin.ctx.holder.table.revision == 1 and [t.revision for t in admin.tables] == [1]
    again = await admin.call("POST", "/api/v1/apply", data=ROUTE_FILE)
    assert again.body == {"revision": 1, "changed": False, "summary": ""}
    dry = await admin.call("POST", "/api/v1/apply", data=ROUTE_FILE.replace("v1: 90, v2: 10", "v1: 80, v2: 20"),
                           params={"dry_run": "true"})
    assert dry.body == {"revision": 1, "changed": True, "summary": "apply file: 1 route(s)", "dry_run": True}
    assert await admin.revision() == 1


async def test_apply_refuses_a_bad_file_with_paths(admin: Admin) -> None:
    bad = ROUTE_FILE.replace("v2: 10", "v3: 10").replace("pins: {acme: v2}", "pins: {acme: v2}\n    colour: red")
    r = await admin.call("POST", "/api/v1/apply", data=bad)
    assert r.status == 422
    assert sorted(paths(r.body)) == ["routes[0].colour", "routes[0].split.v3"]
    assert await admin.revision() == 0
    syntax = await admin.call("POST", "/api/v1/apply", data="routes: [")
    assert syntax.status == 422 and syntax.body["errors"][0]["message"].startswith("invalid YAML")


async def test_apply_body_limit_is_413(admin: Admin) -> None:
    r = await admin.call("POST", "/api/v1/apply", data=io.BytesIO(b"#" * (16 * 1024 * 1024 + 1)))
    assert (r.status, r.content_type) == (413, PROBLEM)
    assert await admin.revision() == 0


# the write path and error mapping

async def test_a_write_is_installed_by_the_watcher_and_its_listeners_hear_it_once(admin: Admin) -> None:
    await admin.seed()
    assert [t.revision for t in admin.tables] == [1, 2, 3, 4]
    await admin.call("PUT", "/api/v1/routes/web/pins/acme", {"version": "v2"})
    table = admin.ctx.holder.table
    assert table is admin.tables[-1] and table.revision == 5
    route = table.route("web")
    assert route is not None and route.pick("acme") == ("pin", ("v2", "v1"))
    await admin.call("PUT", "/api/v1/routes/web/pins/acme", {"version": "v2"})  # no change: no new table
    assert len(admin.tables) == 5


async def test_store_unavailable_is_503_problem(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailableError("sqlite store: disk I/O error")

    monkeypatch.setattr(admin.ctx.store, "update", down)
    r = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP1]})
    assert (r.status, r.content_type, r.body["detail"]) == (503, PROBLEM, "sqlite store: disk I/O error")
    assert r.headers["Retry-After"] == "1"


async def test_no_mutation_on_get_and_405_for_wrong_methods(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("GET", "/api/v1/apply")
    assert (r.status, r.content_type) == (405, PROBLEM)
    assert "POST" in r.headers["Allow"]
    assert (await admin.call("POST", "/api/v1/state", {})).status == 405
    assert (await admin.call("GET", "/api/v1/routes/web/rollback")).status == 405
    assert await admin.revision() == 4


async def test_concurrent_writer_without_if_match_is_reapplied(admin: Admin) -> None:
    await admin.seed()
    # Another process moved the state on; a write without If-Match applies its intent to the new state.
    await admin.ctx.store.update(lambda s: set_split(s, "web", {"v3": 1}), actor="other")
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 1})
    assert (r.body["revision"], r.body["summary"]) == (6, "split web: v1=100 v3=1 -> v1=100 v3=1 v2=1")


async def test_health_view(admin: Admin) -> None:
    admin.health.update({"v1": {EP1: True}, "v2": {EP2: False, "http://127.0.0.1:9005": True}})
    r = await admin.call("GET", "/api/v1/health")
    assert r.body["versions"] == {
        "v1": {"healthy": 1, "total": 1, "endpoints": {EP1: True}},
        "v2": {"healthy": 1, "total": 2, "endpoints": {EP2: False, "http://127.0.0.1:9005": True}},
    }


async def test_reason_too_long_is_refused(admin: Admin) -> None:
    r = await admin.call("PUT", "/api/v1/versions/v1", {"endpoints": [EP1]}, params={"reason": "x" * 1001})
    assert (r.status, paths(r.body)) == (422, ["reason"])
    assert await admin.revision() == 0


async def test_split_with_a_weight_too_small_to_route_is_422_and_changes_nothing(admin: Admin) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 99.996, "v2": 0.004})
    assert (r.status, r.body["errors"]) == (422, [{"path": "v2", "message": (
        "weight 0.004 is 0.004% of the split, less than the smallest share that routes (1/10000 = 0.01%); "
        "use at least 0.010001, or 0")}])
    assert await admin.revision() == 4
    # The merged split counts: raising v1 can leave a weight the request did not name too small.
    ok = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 90, "v2": 10})
    assert ok.status == 200
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 1_000_000})
    assert (r.status, paths(r.body)) == (422, ["v2"])
    assert await admin.revision() == 5


# Found in review: odd input is a client error that changes nothing.


async def test_version_name_with_trailing_newline_is_refused(admin: Admin) -> None:
    r = await admin.call("PUT", "/api/v1/versions/v1%0A", {"endpoints": [EP1]})
    assert (r.status, r.content_type) == (422, PROBLEM)
    assert admin.ctx.holder.table.versions == {}
    assert await admin.revision() == 0


CRASHES = {
    "if_match_superscript_digit": ("PUT", "/api/v1/versions/v9", {"If-Match": '"\u00b2"'}, 400),
    "if_match_5000_digits": ("PUT", "/api/v1/versions/v9", {"If-Match": '"' + "9" * 5000 + '"'}, 400),
    "limit_superscript_digit": ("GET", "/api/v1/revisions?limit=%C2%B2", {}, 400),
    "before_5000_digits": ("GET", "/api/v1/revisions?before=" + "9" * 5000, {}, 400),
    "revision_superscript_digit": ("GET", "/api/v1/revisions/%C2%B2", {}, 400),
    "revision_beyond_int64": ("GET", "/api/v1/revisions/99999999999999999999999", {}, 400),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
async def test_odd_numbers_in_headers_and_paths_are_client_errors(admin: Admin, name: str) -> None:
    method, path, headers, status = CRASHES[name]
    body = b'{"endpoints": ["http://127.0.0.1:9001"]}' if method == "PUT" else b""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    port = admin.url.rsplit(":", 1)[1]
    raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ALICE}\r\n"
           f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body
    out = await raw_exchange(int(port), raw)
    assert out.startswith(b"HTTP/1.1 %d " % status)
    assert await admin.revision() == 0


@pytest.mark.parametrize(("data", "status"), [
    ("[" * 100_000 + "]" * 100_000, 400),
    ('{"v1": 1e999}', 422),
    ('{"v1": -0.0, "v2": 1e-400}', 422),
    ('{"v1": "100"}', 422),
    ('{"v1": true}', 422),
    ('{"v1": Infinity}', 400),
    ('{"v1": 1, "v1": 1}', 400),
    ('{"\\ud800": 1}', 422),
    ("\ufeff{}", 422),
    ('{"v1": ' + "9" * 5000 + "}", 400),
])
async def test_json_edge_cases_never_change_state_or_crash(admin: Admin, data: str, status: int) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", data=data.encode("utf-8", "surrogatepass"))
    assert (r.status, r.content_type) == (status, PROBLEM)
    assert await admin.revision() == 4


async def test_reads_accept_no_body_driven_mutation(admin: Admin) -> None:
    await admin.seed()
    for path in ("/api/v1/state", "/api/v1/routes/web", "/api/v1/versions/v1", "/api/v1/revisions"):
        r = await admin.call("GET", path, data=json.dumps({"split": {"v2": 100}}))
        assert r.status == 200
    r = await admin.call("GET", "/api/v1/routes/web/rollback")
    assert r.status == 405
    assert await admin.revision() == 4


@pytest.mark.parametrize("value", ['"4', 'W/"4"', "4"])
async def test_if_match_variants_accepted_as_documented(admin: Admin, value: str) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 0}, headers={"If-Match": value})
    assert r.status == 200


# A stale but well-formed revision is a failed precondition (412); anything that is not a revision is a bad
# request (400).
@pytest.mark.parametrize(("value", "status"), [('"3"', 412), ('"4", "5"', 400), ("-4", 400), ("4.0", 400),
                                               ("0x4", 400), ("", 400)])
async def test_if_match_that_is_not_the_current_revision_never_writes(admin: Admin, value: str,
                                                                      status: int) -> None:
    await admin.seed()
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10}, headers={"If-Match": value})
    assert r.status == status
    assert await admin.revision() == 4
