"""The judge inside the controller: an inconclusive step pauses the rollout, says why (record, event in the
history, metrics), and resume/promote/abort take it from there. Real SQLite store, requests recorded into
Stats as the data plane does, a clock the test moves."""

from __future__ import annotations

import dataclasses

from proxy.admin.canary_api import rollout_view
from proxy.control.canary import CanaryConfig, Thresholds, load_rollout
from proxy.control.canary.judge import Rule
from tests.control.conftest import World

RULES = (Rule("error_rate", "<= baseline + 0.5%", "> baseline + 5%"), Rule("p99", "<= 1.5x baseline", "> 3x baseline"))
CFG = CanaryConfig("web", "v2", (10.0, 50.0, 100.0), interval=10.0, limits=Thresholds(min_requests=100),
                   checks=RULES, sample_wait=2)


async def round_(w: World, ctl: object, *, canary: int = 100, errors: int = 0, duration: float = 0.004,
                 base_errors: int = 0) -> None:
    w.feed("v2", canary - errors, duration=duration)
    w.feed("v2", errors, status=503, duration=duration)
    w.feed("v1", 1000 - base_errors, duration=0.004)
    w.feed("v1", base_errors, status=503, duration=0.004)
    w.clock.advance(10.0)
    await ctl.tick()  # type: ignore[attr-defined]


async def test_a_metric_between_its_bounds_pauses_with_an_event_and_no_traffic_change(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await round_(world, ctl, base_errors=10)  # 0% vs baseline 1%: pass -> 50%
    assert await world.split() == {"v1": 50.0, "v2": 50.0}
    before = await world.store.current()
    await round_(world, ctl, errors=3, base_errors=10)  # 3% vs 1%: above 1.5%, not above 6%
    assert await world.split() == {"v1": 50.0, "v2": 50.0}
    r = await load_rollout(world.store, "web")
    assert r is not None
    assert (r.status, r.pause_cause, r.step) == ("paused", "inconclusive", 1)
    assert r.message == (
        "canary web: v2 inconclusive at 50% (step 2/3); paused: inconclusive error_rate 3.00% between pass 1.50% "
        "and fail 6.00% [error_rate <= baseline + 0.5%, fail > baseline + 5%, baseline 1.00%]; pass within "
        "5.0ms of the baseline [p99 <= 1.5x baseline, fail > 3x baseline, baseline 5.0ms] (resume to judge the step "
        "again, promote or abort)")
    # One revision-free event in the route's history: same state, actor canary, the numbers as its reason.
    event = await world.store.current()
    assert (event.number, event.state) == (before.number + 1, before.state)
    assert (event.info.actor, event.info.summary, event.info.routes) == (
        "canary", "canary web: v2 inconclusive at 50% (step 2/3); paused", ("web",))
    assert r.revision == event.number
    assert event.info.reason.startswith("inconclusive error_rate 3.00% between")
    assert world.stats.canary_outcomes == {("web", "pass"): 1, ("web", "inconclusive"): 1}
    assert world.stats.canary_weights == {"web": ["v2", 50.0]}
    # Each finished step's analysis is kept for the chart; the API names the bounds pass/fail.
    view = rollout_view(r)
    assert [(a["step"], a["percent"], a["verdict"]) for a in view["analyses"]] == [
        (0, 10.0, "pass"), (1, 50.0, "inconclusive")]
    assert view["analysis"]["metrics"][0] == {
        "metric": "error_rate", "value": 0.03, "baseline": 0.01, "pass": 0.015, "fail": 0.06,
        "outcome": "inconclusive", "rule": "error_rate <= baseline + 0.5%, fail > baseline + 5%",
        "note": "error_rate 3.00% between pass 1.50% and fail 6.00%"}
    assert view["config"]["checks"] == [
        {"metric": "error_rate", "pass": "<= baseline + 0.5%", "fail": "> baseline + 5%"},
        {"metric": "p99", "pass": "<= 1.5x baseline", "fail": "> 3x baseline"}]
    assert (view["pause_cause"], view["next_analysis"], view["steps"]) == ("inconclusive", None, [
        {"percent": 10.0, "state": "done"}, {"percent": 50.0, "state": "current"}, {"percent": 100.0, "state": "next"}])
    # Paused means paused: more rounds change nothing.
    await round_(world, ctl)
    assert (await world.store.current()).number == event.number
    # Resumed, the step is judged again on a fresh window.
    r = await ctl.resume("web", actor="bob")
    assert (r.status, r.pause_cause) == ("running", None)
    await ctl.tick()  # opens the window
    await round_(world, ctl)
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "promoted"
    assert await world.split() == {"v1": 0.0, "v2": 100.0}


async def test_too_few_requests_for_sample_wait_intervals_is_inconclusive(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await round_(world, ctl, canary=40)
    r = await load_rollout(world.store, "web")
    assert r is not None and (r.status, r.message) == ("running", "waiting: 40 of 100 requests needed (0/40 errors)")
    await round_(world, ctl, canary=40)  # 80 of 100 after the second interval: sample_wait is 2
    r = await load_rollout(world.store, "web")
    assert r is not None and (r.status, r.pause_cause) == ("paused", "inconclusive")
    assert r.analysis is not None and r.analysis.reason == (
        "too few requests to judge after 2 interval(s): 80 of 100 requests needed (0/80 errors)")
    assert await world.split() == {"v1": 90.0, "v2": 10.0}
    assert world.stats.canary_outcomes == {("web", "inconclusive"): 1}
    # The older per-round counter: both rounds neither passed nor failed.
    assert world.stats.canary_results == {("web", "inconclusive"): 2}


async def test_relative_latency_fails_and_counts_an_abort(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    await round_(world, ctl, canary=200, duration=0.3)  # p99 ~0.5 s vs ~5 ms: far above 3x
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "rolled_back"
    assert r.analysis is not None and [m.outcome for m in r.analysis.metrics] == ["pass", "fail"]
    assert r.message.startswith("canary web: rolled back v2 to 0%; analysis failed at 10%: pass error_rate 0.00% ok")
    assert (world.stats.canary_aborts, world.stats.canary_weights) == ({"web": 1}, {"web": ["v2", 0.0]})
    assert world.stats.canary_outcomes == {("web", "fail"): 1}


async def test_promote_skips_the_remaining_steps_and_abort_counts(world: World) -> None:
    ctl = world.controller()
    await ctl.start_rollout(CFG, actor="alice")
    r = await ctl.promote("web", actor="bob")
    assert (r.status, r.revision) == ("promoted", (await world.store.current()).number)
    assert await world.split() == {"v1": 0.0, "v2": 100.0}
    info = (await world.store.history(route="web", limit=1))[0]
    assert info.reason == ("canary web: promoted v2 to 100% by bob at step 1/3; v1 kept registered (weight 0) "
                           "for fallback")
    cfg2 = dataclasses.replace(CFG, canary="v1")
    await ctl.start_rollout(cfg2, actor="alice")
    await ctl.abort("web", actor="bob")
    assert world.stats.canary_aborts == {"web": 1}
