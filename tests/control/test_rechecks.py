"""Continuous scanning (proxy.control.rechecks): live versions' check commands run again on a schedule; a
failure flags the version (event, gauge, no more weight or pins through the one gate) and, with
on_check_fail: shift, moves its traffic to the fallback. Real check commands (sh), a real SQLite store."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from proxy import changes
from proxy.control import gates
from proxy.control.rechecks import Rechecker, live_checked, recheck, shift_away
from proxy.errors import ConflictError
from proxy.model import Mirror, Route, State
from tests.control.conftest import EP1, EP2, World, seed, static


def scanner(tmp_path: Path) -> tuple[tuple[str, ...], Path]:
    """A check that fails while `bad` exists, saying so on its last line as scanners do."""
    bad = tmp_path / "vulnerable"
    return ("sh", "-c", f'if [ -e "{bad}" ]; then echo "1 critical: CVE-2026-0001"; exit 1; fi; echo "0 findings"'), bad


def state_with(check: tuple[str, ...], *, shift: bool = False, pins: dict[str, str] | None = None) -> State:
    v2 = static("v2", EP2, check)
    if shift:
        v2 = dataclasses.replace(v2, spec=dataclasses.replace(v2.spec, on_check_fail="shift"))
    return State(versions={"v1": static("v1", EP1), "v2": v2},
                 routes=(Route("web", split=(("v1", 90.0), ("v2", 10.0)), fallback=("v1",), pins=pins or {}),))


class Later:
    """The schedule's clock, a given number of seconds ahead of the wall clock verdicts are stamped with."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


def test_live_versions_are_those_some_route_can_reach() -> None:
    s = state_with(("true",))
    assert live_checked(s) == {"v2": ("web",)}
    off = dataclasses.replace(s, routes=(Route("web", split=(("v1", 1.0), ("v2", 0.0))),))
    assert live_checked(off) == {}
    mirrored = dataclasses.replace(off, routes=(dataclasses.replace(off.routes[0], mirrors=(Mirror("v2", 5.0),)),))
    assert live_checked(mirrored) == {"v2": ("web",)}


def test_shift_moves_weight_and_pins_to_the_fallback() -> None:
    s = state_with(("true",), pins={"acme": "v2", "zed": "v1"})
    new, summary = shift_away(s, "v2")
    r = new.routes[0]
    assert (r.split, dict(r.pins)) == ((("v1", 100.0), ("v2", 0.0)), {"acme": "v1", "zed": "v1"})
    assert summary == "shift v2 to fallback: web: 10 weight and 1 pin(s) to v1"
    no_fallback = dataclasses.replace(s, routes=(dataclasses.replace(s.routes[0], fallback=()),))
    assert shift_away(no_fallback, "v2") == (no_fallback, "")


async def test_a_failing_re_check_flags_and_blocks_more_traffic_until_it_passes(world: World, tmp_path: Path) -> None:
    check, bad = scanner(tmp_path)
    await seed(world.store, state_with(check))
    clock = Later()
    rc = Rechecker(world.store, world.stats, interval=3600.0, clock=clock)
    assert await rc.tick() == ["v2"]  # never checked yet: due now
    first = await gates.last_verdict(world.store, "v2")
    assert first is not None and (first.ok, first.flagged) == (True, False)
    assert await rc.tick() == []  # not due again for an hour
    bad.touch()
    clock.ahead = 3601.0
    before = await world.store.current()
    assert await rc.tick() == ["v2"]
    v = await gates.last_verdict(world.store, "v2")
    assert v is not None and (v.ok, v.flagged, v.exit_code) == (False, True, 1)
    event = await world.store.current()
    assert (event.number, event.state) == (before.number + 1, before.state)
    assert (event.info.actor, event.info.routes) == ("check", ("web",))
    assert event.info.summary.startswith("re-check v2: FAILED (exit 1, ")
    assert event.info.summary.endswith("1 critical: CVE-2026-0001; receives traffic on web; flagged: gains no "
                                       "weight or pins until a check passes")
    assert world.stats.check_failed == {"v2": 1}
    assert await world.split() == {"v1": 90.0, "v2": 10.0}  # the default only flags
    # No more weight, no new pins: the gate runs the check again, and it still fails.
    with pytest.raises(ConflictError, match="check v2: FAILED"):
        await gates.gated_update(world.store, lambda s: changes.set_split(s, "web", {"v2": 20.0}), actor="alice")
    with pytest.raises(ConflictError, match="check v2: FAILED"):
        await gates.gated_update(world.store, lambda s: changes.pin(s, "web", "acme", "v2"), actor="alice")
    # Less is always allowed.
    await gates.gated_update(world.store, lambda s: changes.set_split(s, "web", {"v2": 5.0}), actor="alice")
    assert await world.split() == {"v1": 90.0, "v2": 5.0}
    # Fixed (the scanner's finding was resolved): the next re-check unflags, with an event.
    bad.unlink()
    clock.ahead = 7202.0
    assert await rc.tick() == ["v2"]
    v = await gates.last_verdict(world.store, "v2")
    assert v is not None and (v.ok, v.flagged) == (True, False)
    info = (await world.store.history(route="web", limit=1))[0]
    assert info.summary.startswith("re-check v2: passed") and info.summary.endswith("; unflagged")
    assert world.stats.check_failed == {"v2": 0}
    await gates.gated_update(world.store, lambda s: changes.set_split(s, "web", {"v2": 20.0}), actor="alice")
    assert await world.split() == {"v1": 90.0, "v2": 20.0}


async def test_on_check_fail_shift_moves_the_traffic_in_one_revision(world: World, tmp_path: Path) -> None:
    check, bad = scanner(tmp_path)
    await seed(world.store, state_with(check, shift=True, pins={"acme": "v2"}))
    bad.touch()
    v = await recheck(world.store, world.stats, "v2", actor="alice")
    assert (v.ok, v.flagged) == (False, True)
    assert await world.split() == {"v1": 100.0, "v2": 0.0}
    r = (await world.store.current()).state.route("web")
    assert r is not None and dict(r.pins) == {"acme": "v1"}
    shift, event = (await world.store.history(route="web", limit=2))
    assert (shift.actor, shift.summary) == ("check", "shift v2 to fallback: web: 10 weight and 1 pin(s) to v1")
    assert shift.reason.startswith("on_check_fail: shift; check v2: FAILED")
    assert event.actor == "alice" and event.summary.startswith("re-check v2: FAILED")


async def test_a_version_without_traffic_is_not_scheduled_nor_flagged(world: World, tmp_path: Path) -> None:
    check, bad = scanner(tmp_path)
    s = state_with(check)
    await seed(world.store, dataclasses.replace(s, routes=(Route("web", split=(("v1", 1.0),)),)))
    rc = Rechecker(world.store, world.stats, interval=3600.0)
    assert await rc.tick() == []
    bad.touch()
    v = await recheck(world.store, world.stats, "v2")  # `check-version v2` still runs it
    assert (v.ok, v.flagged) == (False, False)
    info = (await world.store.history(limit=1))[0]
    assert info.summary.endswith("; receives no traffic; not flagged")
    with pytest.raises(ConflictError, match="has no check command"):
        await recheck(world.store, world.stats, "v1")
