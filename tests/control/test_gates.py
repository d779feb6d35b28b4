"""Readiness and check-command gates: who may get traffic, and what history says about it."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from proxy.control.canary import CanaryConfig, Thresholds
from proxy.control.gates import admit, check_gate, check_readiness, gaining, last_verdict, run_check, version_ready
from proxy.errors import ConflictError
from proxy.model import Mirror, Route, State, Version, VersionSpec
from tests.control.conftest import EP2, World, seed, static, two_versions

CFG = CanaryConfig("web", "v2", (50.0, 100.0), interval=10.0, limits=Thresholds(0.01, 1.5, 20))

# A stand-in for an image scanner: prints what it was given, then its findings, and exits with `code`.
def scanner(code: int) -> tuple[str, ...]:
    script = ("import os, sys; "
              "print('scanning', os.environ['TURNOUT_VERSION'], os.environ['TURNOUT_IMAGE'] or '-', "
              "os.environ['TURNOUT_ENDPOINTS']); "
              f"print('CVE-2026-0001 critical' if {code} else 'no findings'); sys.exit({code})")
    return (sys.executable, "-c", script)


def test_version_ready() -> None:
    v = static("v2", EP2)
    assert version_ready(v, {}) is None  # not probed yet: instances exist, so ready
    assert version_ready(v, {"v2": {EP2: True, "http://127.0.0.1:9": False}}) is None
    assert version_ready(v, {"v2": {EP2: False}}) == "version 'v2' has no healthy endpoint (0 of 1 healthy)"
    empty = Version("v3", VersionSpec(kind="local", command=("srv",)), ())
    assert version_ready(empty, {}) == "version 'v3' has no instances"


def test_check_readiness_refuses_weight_for_an_unready_version() -> None:
    state = two_versions()
    down = {"v2": {EP2: False}}
    with pytest.raises(ConflictError) as e:
        check_readiness(state, {"v2": 5.0}, down)
    assert e.value.status_hint == 409
    assert str(e.value) == "version 'v2' has no healthy endpoint (0 of 1 healthy) (use force to override)"
    check_readiness(state, {"v2": 5.0}, down, force=True)
    check_readiness(state, {"v2": 0.0, "v1": 100.0}, down)  # taking weight away is always allowed


def test_check_readiness_on_a_route_checks_only_rising_weights() -> None:
    state = two_versions()
    down = {"v1": {"http://127.0.0.1:9001": False}}
    check_readiness(state, {"v1": 50.0}, down, route="web")  # v1 goes down from 100: allowed
    with pytest.raises(ConflictError, match="'v1' has no healthy endpoint"):
        check_readiness(state, {"v1": 150.0}, down, route="web")


async def test_run_check_passes_identity_in_the_environment() -> None:
    v = Version("v2", VersionSpec(kind="docker", image="shop@sha256:" + "a" * 64, check=scanner(0)),
                (EP2, "http://127.0.0.1:9012"))
    verdict = await run_check(v)
    assert verdict.ok and verdict.exit_code == 0
    assert verdict.output == (f"scanning v2 shop@sha256:{'a' * 64} {EP2} http://127.0.0.1:9012\nno findings")


async def test_run_check_timeout_and_missing_binary() -> None:
    slow = static("v2", EP2, (sys.executable, "-c", "import time; print('pulling db', flush=True); time.sleep(30)"))
    v = await run_check(slow, timeout=0.5)
    assert (v.ok, v.exit_code) == (False, None)
    assert v.output == "pulling db\n(timed out after 0.5s)"
    assert v.summary.startswith("check v2: FAILED (timed out, ")
    missing = static("v2", EP2, ("/nonexistent/scanner",))
    v = await run_check(missing)
    assert (v.ok, v.exit_code) == (False, None)
    assert v.output.startswith("cannot run '/nonexistent/scanner': ")


async def test_failing_check_refuses_the_rollout_and_is_in_history(world: World) -> None:
    await world.store.close()
    from proxy.store.sqlite import SQLiteStore

    world.store = SQLiteStore(world.path.with_name("check.db"))
    world.ctx.store = world.store
    await seed(world.store, two_versions(scanner(3)))
    ctl = world.controller()
    with pytest.raises(ConflictError) as e:
        await ctl.start_rollout(CFG, actor="alice")
    assert str(e.value).startswith("check v2: FAILED (exit 3, ")
    assert str(e.value).endswith("s): CVE-2026-0001 critical (version gets no traffic until its check passes)")
    assert await world.split() == {"v1": 100.0}
    info = (await world.store.history(route="web", limit=1))[0]
    assert (info.actor, info.routes) == ("alice", ("web",))
    assert info.summary.startswith("check v2: FAILED (exit 3, ")
    assert info.reason == f"scanning v2 - {EP2}\nCVE-2026-0001 critical"
    verdict = await last_verdict(world.store, "v2")
    assert verdict is not None and verdict.exit_code == 3


async def test_passing_check_lets_the_rollout_start_and_is_run_once(world: World) -> None:
    await world.store.close()
    from proxy.store.sqlite import SQLiteStore

    world.store = SQLiteStore(world.path.with_name("check.db"))
    world.ctx.store = world.store
    await seed(world.store, two_versions(scanner(0)))
    ctl = world.controller()
    r = await ctl.start_rollout(CFG, actor="alice")
    assert r.check is not None and r.check.startswith("check v2: passed (exit 0, ")
    assert await world.split() == {"v1": 50.0, "v2": 50.0}
    summaries = [i.summary for i in await world.store.history(route="web", limit=10)]
    assert summaries[0] == "split web: v1=100 -> v1=50 v2=50"
    assert summaries[1].startswith("check v2: passed (exit 0, ")
    # A pass holds for an immutable version: the next gate reuses it without running the command again.
    state = (await world.store.current()).state
    again = await check_gate(world.store, state.versions["v2"], actor="bob")
    assert again is not None and again.time == (await last_verdict(world.store, "v2")).time  # type: ignore[union-attr]
    assert len([i for i in await world.store.history(limit=50) if i.summary.startswith("check v2")]) == 1


async def test_admit_runs_both_gates_for_a_split_change(world: World) -> None:
    state = (await world.store.current()).state
    with pytest.raises(ConflictError, match="no healthy endpoint"):
        await admit(world.store, state, {"v2": 10.0}, {"v2": {EP2: False}}, route="web", actor="alice")
    await admit(world.store, state, {"v2": 10.0}, {}, route="web", actor="alice")


def test_gaining_names_every_way_a_checked_version_gets_traffic() -> None:
    v4 = static("v4", "http://127.0.0.1:9004", scanner(3))
    base = two_versions()
    old = replace(base, versions={**base.versions, "v4": v4})
    web = old.routes[0]

    def with_web(**changes: object) -> State:
        return replace(old, routes=(replace(web, **changes),))  # type: ignore[arg-type]

    assert gaining(old, old) == {}
    assert gaining(old, with_web(split=(("v1", 100.0), ("v4", 0.0)))) == {}  # weight 0: no traffic
    assert gaining(old, with_web(split=(("v1", 100.0), ("v4", 1.0)))) == {"v4": ("web",)}
    assert gaining(old, with_web(pins={"bob": "v4"})) == {"v4": ("web",)}
    assert gaining(old, with_web(fallback=("v1", "v4"))) == {"v4": ("web",)}
    assert gaining(old, with_web(mirrors=(Mirror("v4", 10.0),))) == {"v4": ("web",)}
    # With an assignment cookie a weight-0 version is served to whoever sends its name in the cookie.
    assert gaining(old, with_web(split=(("v1", 100.0), ("v4", 0.0)), assignment_cookie="tv")) == {"v4": ("web",)}
    both = replace(old, routes=(web, Route("api", split=(("v4", 1.0),))))
    assert gaining(old, both) == {"v4": ("api",)}
    # Already reachable (here through a pin): more weight is no new traffic for the gate.
    pinned = with_web(pins={"bob": "v4"})
    assert gaining(pinned, replace(pinned, routes=(replace(pinned.routes[0], split=(("v1", 1.0), ("v4", 1.0))),))) == {}
    # Versions without a check command are never named.
    assert gaining(old, with_web(split=(("v1", 100.0), ("v2", 5.0)))) == {}
