"""The admin API the status page's rollout and drain views use: promote, the revision that ended a rollout,
and a drain's old-session history, idle time and quiet period left (through the real admin app)."""

from __future__ import annotations

from proxy.control.canary import CanaryController
from proxy.telemetry.metrics import aggregate
from tests.observability.conftest import EP, Admin, traffic


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def test_promote_skips_the_remaining_steps_and_the_listing_names_the_ending_revision(admin: Admin) -> None:
    await admin.seed()  # revisions 1-6; `api` is v1=100
    admin.health["v2"][EP["v2"]] = True
    r = await admin.call("POST", "/api/v1/canary/api", {"to": "v2", "steps": [1, 5, 25], "interval": 60})
    assert (r.status, r.body["percent"]) == (201, 1.0), r.body
    listed = (await admin.call("GET", "/api/v1/canary")).body["rollouts"]
    assert [(x["status"], x["ended_by"]) for x in listed] == [("running", None)]

    r = await admin.call("POST", "/api/v1/canary/api/promote")
    assert (r.status, r.body["status"], r.body["percent"]) == (200, "promoted", 100.0), r.body
    assert r.body["message"] == ("canary api: promoted v2 to 100% by ops at step 1/3; v1 kept registered (weight 0) "
                                 "for fallback")
    assert (await admin.call("GET", "/api/v1/routes/api")).body["split"] == {"v1": 0, "v2": 100}
    newest = (await admin.call("GET", "/api/v1/revisions?limit=1")).body["revisions"][0]
    assert (newest["revision"], newest["actor"]) == (8, "canary")
    listed = (await admin.call("GET", "/api/v1/canary")).body["rollouts"]
    assert [(x["status"], x["ended_by"]) for x in listed] == [("promoted", 8)]

    again = await admin.call("POST", "/api/v1/canary/api/promote")
    assert (again.status, again.body["detail"]) == (409, "the rollout on 'api' is promoted, not running or paused")
    missing = await admin.call("POST", "/api/v1/canary/web/promote")
    assert (missing.status, missing.body["detail"]) == (404, "no rollout on route 'web'")


async def test_aborted_rollout_names_the_revision_that_rolled_it_back(admin: Admin) -> None:
    await admin.seed()
    admin.health["v2"][EP["v2"]] = True
    assert (await admin.call("POST", "/api/v1/canary/api", {"to": "v2", "interval": 60})).status == 201  # rev 7
    assert (await admin.call("POST", "/api/v1/canary/api/abort")).status == 200  # rev 8
    listed = (await admin.call("GET", "/api/v1/canary")).body["rollouts"]
    assert [(x["status"], x["ended_by"]) for x in listed] == [("aborted", 8)]


async def test_drain_listing_has_the_old_session_history_idle_time_and_quiet_left(admin: Admin) -> None:
    await admin.seed()
    admin.health["v2"][EP["v2"]] = True
    r = await admin.call("PUT", "/api/v1/routes/web", {"split": {"v1": 90, "v2": 10}, "fallback": ["v1"],
                                                       "identity": [{"header": "X-Client-Id"}],
                                                       "assignment_cookie": "tv"})
    assert r.status == 200, r.body
    clock = Clock()
    ctx = admin.ctx
    ctx.canary = CanaryController(ctx.store, ctx.stats, ctx.health, lambda: aggregate(ctx.stats, None), clock=clock)
    r = await admin.call("POST", "/api/v1/drains/web", {"from": "v1", "to": "v2", "quiet": 60})
    assert r.status == 201, r.body
    await ctx.canary.tick()  # t=0
    for _ in range(3):  # old sessions: 2 requests per 10 s
        clock.t += 10
        traffic(ctx.stats, "web", "v1", 2)
        await ctx.canary.tick()
    clock.t += 15  # quiet since the last one
    await ctx.canary.tick()
    (d,) = (await admin.call("GET", "/api/v1/drains")).body["drains"]
    assert (d["status"], d["old_requests"], d["idle"], d["quiet_left"]) == ("draining", 6, 15.0, 45.0)
    t0 = 1_000_000.0
    assert d["history"] == [[t0, 0], [t0 + 10, 2], [t0 + 20, 4], [t0 + 30, 6], [t0 + 45, 6]]
