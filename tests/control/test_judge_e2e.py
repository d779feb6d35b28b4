"""The judge end to end: real upstreams whose error rates the test sets, the real data plane, the admin API,
the controller's own loop and the `turnout` CLI as a subprocess. A canary failing a bit more than its
baseline, but not enough to fail, is neither promoted nor rolled back: the rollout pauses and says why."""

from __future__ import annotations

import json

import aiohttp

from tests.control.test_e2e import TOKEN, Stack, load, stack

__all__ = ["stack"]  # the fixture, shared with test_e2e


async def test_a_canary_between_pass_and_fail_pauses_inconclusive(stack: Stack) -> None:
    # v1 fails 1 request in 50 (2%), v2 1 in 20 (5%): above the pass bound (baseline + 0.5%, about 2.5%),
    # below the fail bound (baseline + 8%), whichever window of at least 60 canary requests is judged.
    stack.v1.fail_every, stack.v2.fail_every = 50, 20
    async with load(stack):
        code, out, err = await stack.cli(
            "canary", "start", "web", "--to", "v2", "--steps", "20,100", "--interval", "0.4s",
            "--min-requests", "60", "--check", "error_rate<=baseline + 0.5%", "--check", "error_rate>baseline + 8%",
            "--wait")
    assert (code, err) == (4, ""), out
    assert await stack.split() == {"v1": 80.0, "v2": 20.0}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with stack.session.get(f"{stack.admin_url}/api/v1/canary/web", headers=headers) as r:
        view = await r.json()
    assert (view["status"], view["pause_cause"]) == ("paused", "inconclusive")
    [m] = view["analysis"]["metrics"]
    assert (m["metric"], m["outcome"]) == ("error_rate", "inconclusive")
    assert m["pass"] < m["value"] <= m["fail"]
    assert view["analysis"]["canary"]["requests"] >= 60
    assert view["config"]["checks"] == [
        {"metric": "error_rate", "pass": "baseline + 0.5%", "fail": "baseline + 8%"}]
    # The CLI says why, and the history holds the event (no state change).
    code, status, _ = await stack.cli("canary", "status")
    lines = status.splitlines()
    assert (code, lines[0]) == (0, "web: v2 vs v1  [####................] 20%  step 1/2  paused")
    assert lines[2] == "    inconclusive error_rate <= baseline + 0.5%, fail > baseline + 8% (" + m["note"] + ")"
    assert lines[3].startswith("  canary web: v2 inconclusive at 20% (step 1/2); paused: inconclusive error_rate ")
    event = (await stack.store.history(route="web", limit=1))[0]
    assert (event.actor, event.summary) == ("canary", "canary web: v2 inconclusive at 20% (step 1/2); paused")
    prior = await stack.store.get(event.number - 1)
    assert (await stack.store.get(event.number)).state == prior.state
    async with aiohttp.ClientSession() as s, s.get(f"{stack.admin_url}/metrics") as r:
        text = await r.text()
    assert 'turnout_canary_steps_total{outcome="inconclusive",route="web"} 1.0' in text.splitlines()
    assert 'turnout_canary_weight{route="web",version="v2"} 20.0' in text.splitlines()
    # Abort: rolled back, counted.
    code, out, _ = await stack.cli("canary", "abort", "web", "--json")
    assert (code, json.loads(out)["status"]) == (0, "aborted")
    assert await stack.split() == {"v1": 100.0, "v2": 0.0}
    async with aiohttp.ClientSession() as s, s.get(f"{stack.admin_url}/metrics") as r:
        assert 'turnout_canary_aborts_total{route="web"} 1.0' in (await r.text()).splitlines()
