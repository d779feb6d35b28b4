"""The canary controller over a real SQLite store, with requests recorded into Stats as the data plane does
and a clock the test moves: every decision happens at an exact, known tick."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.control.canary import CanaryConfig, Thresholds, load_rollout
from proxy.errors import ConflictError
from proxy.store.sqlite import SQLiteStore
from tests.control.conftest import World

CFG = CanaryConfig("web", "v2", (1.0, 5.0, 25.0, 50.0, 100.0), interval=10.0,
                   limits=Thresholds(max_error_rate=0.01, max_p99_ratio=1.5, min_requests=20))


async def canary_history(w: World) -> list[tuple[str, str]]:
    """(summary, reason) of the canary's revisions, oldest first."""
    infos = await w.store.history(route="web", limit=100)
    return [(i.summary, i.reason) for i in reversed(infos) if i.actor == "canary"]


async def healthy_round(w: World, ctl: object) -> None:
    w.feed("v2", 20, duration=0.004)
    w.feed("v1", 200, duration=0.004)
    w.clock.advance(10.0)
    await ctl.tick()  # type: ignore[attr-defined]


async def test_healthy_canary_is_promoted_through_every_step(world: World) -> None:
    ctl = world.controller()
    r = await ctl.start_rollout(CFG, actor="alice")
    assert (r.status, r.step) == ("running", 0)
    assert await world.split() == {"v1": 99.0, "v2": 1.0}
    for expected in ({"v1": 95.0, "v2": 5.0}, {"v1": 75.0, "v2": 25.0}, {"v1": 50.0, "v2": 50.0},
                     {"v1": 0.0, "v2": 100.0}):
        await healthy_round(world, ctl)
        assert await world.split() == expected
    r2 = await load_rollout(world.store, "web")
    assert r2 is not None
    assert r2.status == "promoted"
    assert [s for s, _ in await canary_history(world)] == [
        "split web: v1=100 -> v1=99 v2=1",
        "split web: v1=99 v2=1 -> v1=95 v2=5",
        "split web: v1=95 v2=5 -> v1=75 v2=25",
        "split web: v1=75 v2=25 -> v1=50 v2=50",
        "split web: v1=50 v2=50 -> v1=0 v2=100",
    ]
    reasons = [reason for _, reason in await canary_history(world)]
    assert reasons[0] == "canary web: v2 to 1% (step 1/5); rollout started by alice"
    assert reasons[1].startswith("canary web: v2 to 5% (step 2/5); analysis passed at 1%: error rate 0.0000 "
                                 "(0/20) <= 0.01; p99 ")
    assert reasons[4].startswith("canary web: promoted v2 to 100% after 5 step(s); error rate 0.0000 (0/20)")
    assert reasons[4].endswith("v1 kept registered (weight 0) for fallback")
    # The old version stays registered, in the split at weight 0, so a rollback is one split change away.
    assert "v1" in (await world.store.current()).state.versions
    assert world.stats.canary_steps == {"web": 5}
    assert world.stats.canary_results == {("web", "pass"): 4}
    # Finished: further ticks change nothing.
    before = (await world.store.current()).number
    await healthy_round(world, ctl)
    assert (await world.store.current()).number == before


async def test_failing_canary_is_rolled_back_within_one_interval(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 95.0, "v2": 5.0}
    # v2 starts failing: 6 of its 30 requests in this interval are 5xx.
    world.feed("v2", 24)
    world.feed("v2", 6, status=503)
    world.feed("v1", 300)
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 100.0, "v2": 0.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "rolled_back"
    summary, reason = (await canary_history(world))[-1]
    assert summary == "split web: v1=95 v2=5 -> v1=100 v2=0"
    assert reason == ("canary web: rolled back v2 to 0%; analysis failed at 5%: error rate 0.2000 (6/30) > max 0.01")
    assert r.analysis is not None and r.analysis.error_rate == 0.2
    assert world.stats.canary_steps == {"web": 0}
    assert world.stats.canary_results == {("web", "pass"): 1, ("web", "fail"): 1}


async def test_slow_canary_is_rolled_back_on_the_p99_ratio(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    world.feed("v2", 100, duration=0.3)  # (0.25, 0.5]
    world.feed("v1", 200, duration=0.004)  # (0.0025, 0.005]
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 100.0, "v2": 0.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.analysis is not None
    assert r.analysis.verdict == "fail"
    assert r.analysis.canary.p99 == pytest.approx(0.4975)
    assert r.analysis.baseline.p99 == pytest.approx(0.004975)
    assert r.message == ("canary web: rolled back v2 to 0%; analysis failed at 1%: p99 497.5ms = 100.00x baseline "
                         "5.0ms > max 1.5x (error rate 0.0000 (0/100) <= 0.01)")


async def test_too_few_requests_wait_without_stepping(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    rev = (await world.store.current()).number
    world.feed("v2", 19)
    world.feed("v1", 2000)
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 99.0, "v2": 1.0}
    assert (await world.store.current()).number == rev
    r = await load_rollout(world.store, "web")
    assert r is not None
    assert (r.status, r.step, r.message) == ("running", 0, "waiting: 19 of 20 requests needed (0/19 errors)")
    # The window keeps growing since the last step: one more request makes it enough at the next interval.
    world.feed("v2", 1)
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 95.0, "v2": 5.0}


async def test_no_analysis_before_the_interval_is_over(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    world.feed("v2", 500)
    world.clock.advance(9.9)
    await ctl.tick()
    assert await world.split() == {"v1": 99.0, "v2": 1.0}


async def test_restart_mid_rollout_resumes_at_the_same_step(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await healthy_round(world, ctl)
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 75.0, "v2": 25.0}
    # The proxy restarts: a new store connection, fresh counters, a new controller.
    await world.store.close()
    world.store = SQLiteStore(world.path)
    world.stats = type(world.stats)()
    world.ctx = dataclasses.replace(world.ctx, store=world.store, stats=world.stats)
    ctl2 = world.controller()
    await ctl2.tick()  # opens a new analysis window at the current step
    r = await load_rollout(world.store, "web")
    assert r is not None and (r.status, r.step) == ("running", 2)
    assert world.stats.canary_steps == {"web": 3}  # the gauge is back in the new process
    assert await world.split() == {"v1": 75.0, "v2": 25.0}
    await healthy_round(world, ctl2)
    assert await world.split() == {"v1": 50.0, "v2": 50.0}
    await healthy_round(world, ctl2)
    assert await world.split() == {"v1": 0.0, "v2": 100.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "promoted"


async def test_pause_resume_abort(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    r = await ctl.pause("web", actor="bob")
    assert (r.status, r.message) == ("paused", "paused by bob")
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 99.0, "v2": 1.0}
    with pytest.raises(ConflictError, match="is paused, not running"):
        await ctl.pause("web", actor="bob")
    await ctl.resume("web", actor="bob")
    await ctl.tick()  # a fresh window starts at resume
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 95.0, "v2": 5.0}
    r = await ctl.abort("web", actor="carol")
    assert r.status == "aborted"
    assert await world.split() == {"v1": 100.0, "v2": 0.0}
    assert (await canary_history(world))[-1] == (
        "split web: v1=95 v2=5 -> v1=100 v2=0", "canary web: rolled back v2 to 0%; aborted by carol")
    with pytest.raises(ConflictError, match="is aborted"):
        await ctl.abort("web", actor="carol")


async def test_a_second_rollout_on_the_same_route_is_refused(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    with pytest.raises(ConflictError, match="already has a running rollout of 'v2'"):
        await ctl.start_rollout(CFG, actor="bob")


async def test_outside_split_change_pauses_the_rollout(world: World) -> None:
    from proxy import changes

    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await world.store.update(lambda s: changes.set_split(s, "web", {"v2": 50.0}), actor="bob", reason="manual")
    await healthy_round(world, ctl)
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "paused"
    assert r.message.startswith("the route's split was changed outside the rollout; paused")
    assert await world.split() == {"v1": 99.0, "v2": 50.0}


async def test_rollout_never_steps_onto_an_unhealthy_canary(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    world.health["v2"] = {"http://127.0.0.1:9002": False}
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 99.0, "v2": 1.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.message == ("analysis passed but not stepping: version 'v2' has no healthy endpoint "
                                           "(0 of 1 healthy)")
    world.health["v2"] = {"http://127.0.0.1:9002": True}
    await healthy_round(world, ctl)
    assert await world.split() == {"v1": 95.0, "v2": 5.0}


async def test_start_refuses_an_unhealthy_canary_unless_forced(world: World) -> None:
    ctl = world.controller()
    world.health["v2"] = {"http://127.0.0.1:9002": False}
    with pytest.raises(ConflictError) as e:
        await ctl.start_rollout(CFG, actor="alice")
    assert e.value.status_hint == 409
    assert str(e.value) == "version 'v2' has no healthy endpoint (0 of 1 healthy) (use force to override)"
    assert await world.split() == {"v1": 100.0}
    r = await ctl.start_rollout(CFG, actor="alice", force=True)
    assert r.status == "running"


async def test_controller_loop_runs_by_itself(world: World) -> None:
    """start()/stop() with a real (short) interval: the loop promotes without anyone calling tick()."""
    import asyncio
    import time

    ctl = type(world.controller())(world.store, world.stats, world.ctx.health, world.snapshot, tick=0.02)
    cfg = dataclasses.replace(CFG, steps=(50.0, 100.0), interval=0.1, limits=Thresholds(0.01, 1.5, 5))
    await ctl.start()
    try:
        await ctl.start_rollout(cfg, actor="alice")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            world.feed("v2", 5)
            world.feed("v1", 5)
            r = await load_rollout(world.store, "web")
            if r is not None and r.status == "promoted":
                break
            await asyncio.sleep(0.05)
    finally:
        await ctl.stop()
    assert await world.split() == {"v1": 0.0, "v2": 100.0}


async def test_a_follower_replica_does_not_drive_rollouts(world: World) -> None:
    from proxy.control.canary import Leader

    class Follower(Leader):
        def is_leader(self) -> bool:
            return False

    leader_ctl = world.controller()
    await leader_ctl.start_rollout(CFG, actor="alice")  # commands work on any replica
    follower = type(leader_ctl)(world.store, world.stats, world.ctx.health, world.snapshot, clock=world.clock,
                                leader=Follower())
    rev = (await world.store.current()).number
    world.feed("v2", 100)
    world.clock.advance(10.0)
    assert await follower.tick() == []
    assert (await world.store.current()).number == rev
    await leader_ctl.tick()
    assert await world.split() == {"v1": 95.0, "v2": 5.0}
