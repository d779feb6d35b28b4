"""Continuous scanning: the check command of every version that receives traffic runs again on a schedule.

A vulnerability database grows; an image that passed last week can fail today. So a pass is not kept
forever: every `check_interval` (a process setting, default 24 h) each live version with a check (weight
> 0, pins, fallback entry or mirror on some route) is checked again, and `turnout check-version NAME` or
`POST /api/v1/versions/NAME/check` runs one now.

- A live version that fails is *flagged*: its verdict says so (proxy.control.gates.CheckVerdict.flagged),
  an event that changes no state goes into the history, `turnout_version_check_failed{version}` is 1,
  and it can gain no weight or pins (proxy.control.gates.gated_update asks for a passing check first).
- With the version's `on_check_fail: shift` its traffic (weight and pins) moves to each route's fallback
  in one revision, actor "check". The default only flags: a scanner can be wrong, and moving traffic
  off a version is a decision with consequences of its own.
- A version that passes again is unflagged (an event too).

Design rule: the decisions (who is live, what a shift changes) are pure functions of the state; the
Rechecker only schedules, runs the command (proxy.control.gates.run_check) and records. It runs where the
canary controller runs (the leader, with several replicas on etcd).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from proxy.changes import Change, reachable
from proxy.control import gates
from proxy.control.leader import Leader, LedLoop, leader_for
from proxy.errors import ConflictError, NotFoundError, StoreUnavailableError
from proxy.model import Route, State
from proxy.store.base import Store
from proxy.telemetry.stats import Stats

log = logging.getLogger("turnout.rechecks")

ACTOR = "check"
DEFAULT_CHECK_INTERVAL = 86400.0
# The schedule is looked at this often at most: a due re-check starts within a minute of its time.
MAX_TICK = 60.0


def live_checked(state: State) -> dict[str, tuple[str, ...]]:
    """Versions with a check command that some route can send requests (or mirrored copies) to -> routes."""
    checked = {name for name, v in state.versions.items() if v.spec.check}
    out: dict[str, list[str]] = {}
    if not checked:
        return {}
    for r in state.routes:
        for name in sorted(reachable(r, checked)):
            out.setdefault(name, []).append(r.name)
    return {name: tuple(routes) for name, routes in out.items()}


def _shift_route(r: Route, version: str) -> tuple[Route, str] | None:
    target = next((v for v in r.fallback if v != version), None)
    weight = dict(r.split).get(version, 0.0)
    pinned = [c for c, v in r.pins.items() if v == version]
    if target is None or (weight <= 0 and not pinned):
        return None
    split = [(v, 0.0 if v == version else w + (weight if v == target else 0.0)) for v, w in r.split]
    if weight > 0 and all(v != target for v, _ in split):
        split.append((target, weight))
    pins = r.pins
    if pinned:
        pins = {c: (target if v == version else v) for c, v in r.pins.items()}
    parts = [f"{weight:g} weight"] if weight > 0 else []
    if pinned:
        parts.append(f"{len(pinned)} pin(s)")
    return replace(r, split=tuple(split), pins=pins), f"{r.name}: {' and '.join(parts)} to {target}"


def shift_away(state: State, version: str) -> Change:
    """Move `version`'s weight and pins on every route to the first other version of that route's fallback
    chain. Routes without one keep sending it traffic (there is nowhere safe to send it); the summary says
    which routes moved."""
    routes = []
    moved = []
    for r in state.routes:
        shifted = _shift_route(r, version)
        if shifted is None:
            routes.append(r)
            continue
        routes.append(shifted[0])
        moved.append(shifted[1])
    if not moved:
        return state, ""
    return replace(state, routes=tuple(routes)), f"shift {version} to fallback: " + "; ".join(moved)


async def recheck(store: Store, stats: Stats, name: str, *, actor: str = ACTOR) -> gates.CheckVerdict:
    """Run `name`'s check now; flag or unflag it, record what changed, shift its traffic when it asks."""
    state = (await store.current()).state
    version = state.versions.get(name)
    if version is None:
        raise NotFoundError(f"no version named {name!r}")
    if not version.spec.check:
        raise ConflictError(f"version {name!r} has no check command")
    prior = await gates.last_verdict(store, name)
    v = await gates.run_check(version)
    # Re-read: the check may have run for minutes, during which the version may have gained or lost routes.
    state = (await store.current()).state
    routes = live_checked(state).get(name, ())
    was = prior is not None and prior.flagged
    flagged = not v.ok and (bool(routes) or was)
    v = replace(v, flagged=flagged)
    await store.set_meta(f"check/{name}", json.dumps(asdict(v)))
    stats.version_check(name, flagged)
    shift = flagged and version.spec.on_check_fail == "shift"
    if not v.ok:
        where = f"receives traffic on {', '.join(routes)}" if routes else "receives no traffic"
        what = "flagged: gains no weight or pins until a check passes" if flagged else "not flagged"
        await gates.record(store, actor=actor, summary=f"re-{v.summary}; {where}; {what}", reason=v.output,
                           routes=routes)
    elif was:
        await gates.record(store, actor=actor, summary=f"re-{v.summary}; unflagged", reason=v.output, routes=routes)
    if shift:
        await store.update(lambda s: shift_away(s, name), actor=ACTOR,
                           reason=f"on_check_fail: shift; {v.summary}")
    return v


def check_view(v: gates.CheckVerdict | None, live: bool, interval: float) -> dict[str, Any] | None:
    """The `check` object of a version in the admin API and the status page's JSON."""
    if v is None:
        return None
    return {"ok": v.ok, "time": v.time, "exit_code": v.exit_code, "summary": v.summary, "flagged": v.flagged,
            "next": v.time + interval if live else None}


async def check_views(store: Store, state: State, interval: float) -> dict[str, dict[str, Any] | None]:
    live = live_checked(state)
    out: dict[str, dict[str, Any] | None] = {}
    for name, version in state.versions.items():
        verdict = await gates.last_verdict(store, name) if version.spec.check else None
        out[name] = check_view(verdict, name in live, interval)
    return out


class Rechecker(LedLoop):
    """The schedule: every live checked version whose last verdict is older than `interval` is checked."""

    task_name = "turnout-rechecks"

    def __init__(self, store: Store, stats: Stats, *, interval: float = DEFAULT_CHECK_INTERVAL,
                 leader: Leader | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.stats = stats
        self.interval = interval
        self.leader = leader or leader_for(store, "rechecks")
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._running: set[str] = set()

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "stopped"
        return f"<Rechecker {state} every {self.interval:g}s [checking: {len(self._running)}]>"

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except StoreUnavailableError as e:
                log.warning("re-checks: %s; retrying", e)
            except Exception:
                log.exception("re-check round failed; retrying")
            await asyncio.sleep(max(0.05, min(MAX_TICK, self.interval / 4)))

    async def tick(self) -> list[str]:
        """Re-check what is due (one after another: scanners are heavy); returns the versions checked."""
        if not self.leader.is_leader():
            return []
        state = (await self.store.current()).state
        now = self.clock()
        done = []
        for name, version in state.versions.items():
            if not version.spec.check:
                continue
            last = await gates.last_verdict(self.store, name)
            # The gauge lives in this process: set it for every checked version, also after a restart.
            self.stats.version_check(name, last is not None and last.flagged)
        for name in live_checked(state):
            last = await gates.last_verdict(self.store, name)
            if last is not None and last.time + self.interval > now:
                continue
            await self.check(name)
            done.append(name)
        return done

    async def check(self, name: str, *, actor: str = ACTOR) -> gates.CheckVerdict:
        self._running.add(name)
        try:
            return await recheck(self.store, self.stats, name, actor=actor)
        finally:
            self._running.discard(name)
