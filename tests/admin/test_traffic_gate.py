"""The check gate on every path that can give a version traffic: split, pin, PUT route (split, fallback,
mirror), apply and rollback. A refused change answers 409 with the check's verdict and leaves the state as it
was; the only revision written is the verdict itself."""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.admin.conftest import EP1, EP2, Admin

EP4 = "http://127.0.0.1:9004"
# A stand-in for an image scanner that finds something.
FAILING = [sys.executable, "-c", "print('CVE-2026-0001 critical'); raise SystemExit(3)"]
PASSING = [sys.executable, "-c", "print('no findings')"]
REFUSED_END = "s): CVE-2026-0001 critical (version gets no traffic until its check passes)"


async def seed_v4(admin: Admin, check: list[str] = FAILING) -> None:
    await admin.seed()
    r = await admin.call("PUT", "/api/v1/versions/v4", {"endpoints": [EP4], "check": check})
    assert r.status == 201, r.body


async def stored(admin: Admin) -> dict[str, Any]:
    body = dict((await admin.call("GET", "/api/v1/state")).body)
    del body["revision"]
    return body


async def assert_refused(admin: Admin, method: str, path: str, body: Any = None, *, data: str | None = None,
                         params: dict[str, str] | None = None) -> None:
    before, rev = await stored(admin), await admin.revision()
    r = await admin.call(method, path, body, data=data, params=params)
    assert r.status == 409, r.body
    assert r.body["detail"].startswith("check v4: FAILED (exit 3, "), r.body
    assert r.body["detail"].endswith(REFUSED_END)
    assert await stored(admin) == before
    # Nothing but the verdict was written: one revision, which changes no state.
    assert await admin.revision() == rev + 1
    last = (await admin.call("GET", "/api/v1/revisions", params={"limit": "1"})).body["revisions"][0]
    assert (last["summary"][:26], last["actor"], last["reason"]) == (
        "check v4: FAILED (exit 3, ", "alice", "CVE-2026-0001 critical")


async def test_split_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PATCH", "/api/v1/routes/web/split", {"v4": 50})


async def test_pin_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PUT", "/api/v1/routes/web/pins/bob", {"version": "v4"})


async def test_put_route_weight_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PUT", "/api/v1/routes/web", {"split": {"v1": 50, "v4": 50}})


async def test_put_route_fallback_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PUT", "/api/v1/routes/web", {"split": {"v1": 100}, "fallback": ["v1", "v4"]})


async def test_put_route_mirror_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PUT", "/api/v1/routes/web",
                         {"split": {"v1": 100}, "mirror": {"version": "v4", "percent": 10}})


async def test_new_route_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    await assert_refused(admin, "PUT", "/api/v1/routes/api", {"split": {"v4": 1}})


async def test_apply_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    text = f"""\
versions:
  v1: {{endpoints: ["{EP1}"]}}
  v2: {{endpoints: ["{EP2}"]}}
  v4: {{endpoints: ["{EP4}"], check: {json.dumps(FAILING)}}}
routes:
  - name: web
    split: {{v1: 50, v4: 50}}
"""
    await assert_refused(admin, "POST", "/api/v1/apply", data=text)


async def test_rollback_to_a_revision_that_used_it_is_gated(admin: Admin) -> None:
    await seed_v4(admin)
    forced = await admin.call("PATCH", "/api/v1/routes/web/split", {"v4": 50}, params={"force": "true"})
    assert (forced.status, forced.body["summary"]) == (200, "split web: v1=100 -> v1=100 v4=50")
    gone = await admin.call("PATCH", "/api/v1/routes/web/split", {"v4": 0})
    assert gone.status == 200
    await assert_refused(admin, "POST", "/api/v1/routes/web/rollback", {"revision": forced.body["revision"]})
    # Forcing is the operator's way through, as for a split.
    r = await admin.call("POST", "/api/v1/routes/web/rollback", {"revision": forced.body["revision"]},
                         params={"force": "true"})
    assert (r.status, r.body["route"]["split"]) == (200, {"v1": 100, "v4": 50})


async def test_taking_traffic_away_and_unrelated_changes_are_not_gated(admin: Admin) -> None:
    await seed_v4(admin)
    forced = await admin.call("PUT", "/api/v1/routes/web/pins/bob", {"version": "v4"}, params={"force": "true"})
    assert (forced.status, forced.body["summary"]) == (200, "pin web: bob -> v4")
    rev = await admin.revision()
    # v4 already receives bob's traffic on web: another split change there runs no check.
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10})
    assert (r.status, r.body["revision"]) == (200, rev + 1)
    un = await admin.call("DELETE", "/api/v1/routes/web/pins/bob")
    assert (un.status, un.body["revision"]) == (200, rev + 2)


async def test_a_passing_check_runs_once_and_keeps_the_if_match(admin: Admin) -> None:
    await seed_v4(admin, PASSING)
    rev = await admin.revision()
    r = await admin.call("PUT", "/api/v1/routes/web/pins/bob", {"version": "v4"}, headers={"If-Match": f'"{rev}"'})
    # The verdict is revision rev+1 (it changes no state), so the operator's If-Match still holds.
    assert (r.status, r.body["revision"], r.body["summary"]) == (200, rev + 2, "pin web: bob -> v4")
    hist = (await admin.call("GET", "/api/v1/revisions", params={"limit": "2"})).body["revisions"]
    assert hist[1]["summary"].startswith("check v4: passed (exit 0, ")
    r2 = await admin.call("PUT", "/api/v1/routes/web/pins/carol", {"version": "v4"})
    assert (r2.status, r2.body["revision"]) == (200, rev + 3)


async def test_rollback_after_a_refusal_undoes_the_last_real_change(admin: Admin) -> None:
    await seed_v4(admin)
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10})
    assert r.status == 200
    await assert_refused(admin, "PUT", "/api/v1/routes/web/pins/bob", {"version": "v4"})
    # The verdict is in web's history but changed nothing: the rollback skips it.
    back = await admin.call("POST", "/api/v1/routes/web/rollback", {})
    assert (back.status, back.body["rolled_back_to"], back.body["summary"]) == (
        200, r.body["revision"] - 1, f"rollback web to revision {r.body['revision'] - 1}: v1=100")
