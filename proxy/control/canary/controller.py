"""The canary controller: steps every running rollout (and drain) in the store.

Design rule: the controller only gathers the numbers (this process's counters or Prometheus), keeps where
each rollout stands in the store's meta (so a restarted proxy resumes it) and applies each decision of
proxy.control.canary.analysis.analyse through proxy.changes.set_split, so every step and every rollback is a revision
with actor "canary" and a reason that carries the numbers it was decided on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from proxy import changes
from proxy.control import gates
from proxy.control.canary.analysis import (
    Analysis,
    Counters,
    Window,
    analyse,
    counters_of,
    rollback_weights,
    step_weights,
)
from proxy.control.canary.drain import DrainTracker
from proxy.control.canary.prometheus import PrometheusSource
from proxy.control.canary.rollout import (
    ACTIVE,
    MAX_ANALYSES,
    CanaryConfig,
    Rollout,
    Status,
    load_rollout,
    load_rollouts,
    save_rollout,
)
from proxy.control.leader import Leader, LedLoop, leader_for
from proxy.errors import ConflictError, FieldError, NotFoundError, StoreUnavailableError, ValidationError
from proxy.model import State
from proxy.store.base import Store
from proxy.telemetry.metrics import StatsSnapshot
from proxy.telemetry.stats import Stats

log = logging.getLogger("turnout.canary")

ACTOR = "canary"


@dataclass(slots=True)
class _Window:
    """Where the current step's analysis window began (in memory: counters belong to this process)."""

    step: int
    started: float
    next_at: float
    counters: dict[str, Counters]  # "canary" / "baseline" -> cumulative counters at the window's start
    waits: int = 0  # analyses of this step that found the sample short


StatsSource = Callable[[], StatsSnapshot]


class CanaryController(LedLoop):
    """Drives every rollout (and drain) in the store; started by `turnout serve` in the supervisor process."""

    task_name = "turnout-canary"

    def __init__(self, store: Store, stats: Stats, health: gates.HealthView, stats_source: StatsSource, *,
                 leader: Leader | None = None, clock: Callable[[], float] = time.time,
                 tick: float | None = None) -> None:
        self.store = store
        self.stats = stats  # this process's: the canary gauges live here
        self.health = health
        self.stats_source = stats_source
        self.leader = leader or leader_for(store, "canary")
        self.clock = clock
        self._tick = tick
        self._lock = asyncio.Lock()
        self._windows: dict[str, _Window] = {}
        self._task: asyncio.Task[None] | None = None
        self.drains = DrainTracker(store, stats_source, clock)

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "stopped"
        return f"<CanaryController {state} [windows: {len(self._windows)} | leader: {self.leader.is_leader()}]>"

    # lifecycle

    async def _run(self) -> None:
        while True:
            period = self._tick
            try:
                rollouts = await self.tick()
                if period is None:
                    # A quarter interval keeps a decision within 25% of its due time; 1 s caps the idle cost.
                    intervals = [r.config.interval for r in rollouts if r.status == "running"]
                    period = min([1.0, *(i / 4 for i in intervals)])
            except StoreUnavailableError as e:
                # Expected while etcd is away; a one-line note, not a traceback every second.
                log.warning("canary controller: %s; retrying", e)
                period = period or 1.0
            except Exception:
                log.exception("canary controller tick failed; retrying")
                period = period or 1.0
            await asyncio.sleep(max(0.01, period))

    # one round

    async def tick(self) -> list[Rollout]:
        """Advance every running rollout and drain once; returns the rollouts as they stand afterwards."""
        if not self.leader.is_leader():
            self._windows.clear()
            return []
        out = []
        for listed in await load_rollouts(self.store):
            r = listed
            if r.status == "running":
                async with self._lock:
                    # Re-read under the lock: an operator's pause/abort may have landed since the listing.
                    fresh = await load_rollout(self.store, r.config.route) or r
                    r = await self._advance(fresh) if fresh.status == "running" else fresh
            out.append(r)
        await self.drains.tick()
        return out

    def snapshot(self, r: Rollout) -> dict[str, Counters]:
        snap = self.stats_source()
        baselines = [v for v, _ in r.baselines]
        return {"canary": counters_of(snap, r.config.route, [r.config.canary]),
                "baseline": counters_of(snap, r.config.route, baselines)}

    def _new_window(self, r: Rollout, now: float) -> _Window:
        w = _Window(r.step, now, now + r.config.interval, self.snapshot(r))
        self._windows[r.config.route] = w
        # Also after a restart or a change of leader: the gauge lives in this process's Stats.
        self.stats.canary_step(r.config.route, r.step + 1)
        self.stats.canary_weight(r.config.route, r.config.canary, r.config.steps[r.step])
        return w

    def next_analysis(self, route: str) -> float | None:
        """When this process judges the route's running step next (None: not driving it)."""
        w = self._windows.get(route)
        return None if w is None else w.next_at

    async def _measure(self, r: Rollout, w: _Window, now: float) -> tuple[Window, Window]:
        if r.config.prometheus:
            src = PrometheusSource(r.config.prometheus)
            seconds = now - w.started
            return (await src.window(r.config.route, [r.config.canary], seconds),
                    await src.window(r.config.route, [v for v, _ in r.baselines], seconds))
        snap = self.snapshot(r)
        return Window.of(snap["canary"].since(w.counters["canary"])), \
            Window.of(snap["baseline"].since(w.counters["baseline"]))

    async def _advance(self, r: Rollout) -> Rollout:
        now = self.clock()
        cfg = r.config
        state = (await self.store.current()).state
        route = state.route(cfg.route)
        if route is None or cfg.canary not in state.versions:
            what = f"route {cfg.route!r}" if route is None else f"version {cfg.canary!r}"
            return await self._finish(r, "failed", f"{what} no longer exists; rollout stopped", now)
        split = dict(route.split)
        if any(abs(split.get(v, 0.0) - w) > 1e-6 for v, w in r.weights):
            return await self._save(replace(r, status="paused", updated=now, pause_cause="split_changed",
                                            message="the route's split was changed outside the rollout; paused "
                                                    "(resume to continue from the current step, abort to roll back)"))
        w = self._windows.get(cfg.route)
        if w is None or w.step != r.step:
            self._new_window(r, now)
            return r
        if now < w.next_at:
            return r
        w.next_at = now + cfg.interval
        try:
            canary, baseline = await self._measure(r, w, now)
        except Exception as e:  # a monitoring outage must neither promote nor roll back
            return await self._save(replace(r, updated=now, message=f"cannot measure: {e}; waiting"))
        pct = cfg.steps[r.step]
        a = replace(analyse(canary, baseline, cfg.limits, now, cfg.checks), step=r.step, percent=pct)
        if a.verdict == "wait":
            w.waits += 1
            if w.waits >= cfg.sample_wait:
                a = replace(a, verdict="inconclusive", reason=f"too few requests to judge after {w.waits} "
                                                              f"interval(s): {a.reason}")
        # Rounds (the older turnout_canary_analysis_total): a round that neither passed nor failed is inconclusive.
        self.stats.canary_analysis(cfg.route, a.verdict if a.verdict in ("pass", "fail") else "inconclusive")
        r = replace(r, analysis=a, updated=now)
        if a.verdict == "wait":
            return await self._save(replace(r, message=f"waiting: {a.reason}"))
        self.stats.canary_step_outcome(cfg.route, a.verdict)
        r = replace(r, analyses=(*r.analyses, a)[-MAX_ANALYSES:])
        if a.verdict == "fail":
            return await self._roll_back(r, "rolled_back", f"analysis failed at {pct:g}%: {a.reason}", now)
        if a.verdict == "inconclusive":
            return await self._inconclusive(r, a, now)
        nxt = r.step + 1
        if nxt >= len(cfg.steps) or cfg.steps[nxt] >= 100.0:
            return await self._promote(r, a, now)
        version = state.versions[cfg.canary]
        why = gates.version_ready(version, self.health())
        flagged = await gates.last_verdict(self.store, cfg.canary)
        if why is None and flagged is not None and flagged.flagged:
            why = f"version {cfg.canary!r} is flagged by a failed re-check ({flagged.summary})"
        if why is not None:
            return await self._save(replace(r, message=f"analysis passed but not stepping: {why}"))
        return await self._set_step(r, nxt, f"analysis passed at {cfg.steps[r.step]:g}%: {a.reason}", now)

    # actions (all under self._lock)

    async def _apply(self, r: Rollout, weights: Mapping[str, float], reason: str) -> Rollout:
        route = r.config.route
        rev = await self.store.update(lambda s: changes.set_split(s, route, weights), actor=ACTOR, reason=reason)
        merged = dict(r.weights) | dict(weights)
        return replace(r, weights=tuple((v, merged[v]) for v in sorted(merged)), revision=rev.number)

    async def _inconclusive(self, r: Rollout, a: Analysis, now: float) -> Rollout:
        """Not sure: neither forward nor back. Pause, say why, and leave an event in the route's history."""
        cfg = r.config
        why = f"canary {cfg.route}: {cfg.canary} inconclusive at {a.percent:g}% (step {r.step + 1}/{len(cfg.steps)})"
        self._windows.pop(cfg.route, None)
        event = await gates.record(self.store, actor=ACTOR, summary=f"{why}; paused", reason=a.reason,
                                   routes=(cfg.route,))
        return await self._save(replace(r, status="paused", pause_cause="inconclusive", updated=now,
                                        revision=event.number,
                                        message=f"{why}; paused: {a.reason} (resume to judge the step again, "
                                                "promote or abort)"))

    async def _set_step(self, r: Rollout, step: int, why: str, now: float) -> Rollout:
        cfg = r.config
        pct = cfg.steps[step]
        weights = step_weights(dict(r.baselines), cfg.canary, pct)
        reason = f"canary {cfg.route}: {cfg.canary} to {pct:g}% (step {step + 1}/{len(cfg.steps)}); {why}"
        r = await self._apply(r, weights, reason)
        r = replace(r, step=step, updated=now, message=reason)
        self._windows.pop(cfg.route, None)
        await self._save(r)
        self._new_window(r, now)
        return r

    async def _promote(self, r: Rollout, a: Analysis | str, now: float) -> Rollout:
        cfg = r.config
        weights = step_weights(dict(r.baselines), cfg.canary, 100.0)
        old = ", ".join(v for v, _ in r.baselines)
        why = a if isinstance(a, str) else f"after {len(cfg.steps)} step(s); {a.reason}"
        reason = (f"canary {cfg.route}: promoted {cfg.canary} to 100% {why}; "
                  f"{old} kept registered (weight 0) for fallback")
        r = replace(await self._apply(r, weights, reason), step=len(cfg.steps) - 1)
        self.stats.canary_step(cfg.route, len(cfg.steps))
        self.stats.canary_weight(cfg.route, cfg.canary, 100.0)
        return await self._finish(r, "promoted", reason, now)

    async def _roll_back(self, r: Rollout, status: Status, why: str, now: float) -> Rollout:
        cfg = r.config
        weights = rollback_weights(dict(r.baselines), cfg.canary)
        reason = f"canary {cfg.route}: rolled back {cfg.canary} to 0%; {why}"
        r = await self._apply(r, weights, reason)
        self.stats.canary_step(cfg.route, 0)
        self.stats.canary_weight(cfg.route, cfg.canary, 0.0)
        self.stats.canary_abort(cfg.route)
        return await self._finish(r, status, reason, now)

    async def _finish(self, r: Rollout, status: Status, message: str, now: float) -> Rollout:
        self._windows.pop(r.config.route, None)
        return await self._save(replace(r, status=status, message=message, updated=now))

    async def _save(self, r: Rollout) -> Rollout:
        await save_rollout(self.store, r)
        return r

    # operator commands (the admin API calls these)

    async def start_rollout(self, cfg: CanaryConfig, *, actor: str, force: bool = False) -> Rollout:
        await self._refuse_active(cfg.route)
        state = (await self.store.current()).state
        plan_baselines(state, cfg)
        gates.check_readiness(state, {cfg.canary: 1.0}, self.health(), force=force)
        # The check command may run for minutes: outside the lock, so other rollouts keep moving meanwhile.
        verdict = await gates.check_gate(self.store, state.versions[cfg.canary], actor=actor, routes=(cfg.route,),
                                         force=force)
        async with self._lock:
            await self._refuse_active(cfg.route)
            state = (await self.store.current()).state
            baselines = plan_baselines(state, cfg)
            now = self.clock()
            r = Rollout(cfg, "running", tuple(baselines.items()), 0, (), actor, now, now,
                        check=None if verdict is None else verdict.summary)
            return await self._set_step(r, 0, f"rollout started by {actor}", now)

    async def _refuse_active(self, route: str) -> None:
        prior = await load_rollout(self.store, route)
        if prior is not None and prior.status in ACTIVE:
            raise ConflictError(f"route {route!r} already has a {prior.status} rollout of "
                                f"{prior.config.canary!r}; abort it first")

    async def _command(self, route: str, want: tuple[Status, ...]) -> Rollout:
        r = await load_rollout(self.store, route)
        if r is None:
            raise NotFoundError(f"no rollout on route {route!r}")
        if r.status not in want:
            raise ConflictError(f"the rollout on {route!r} is {r.status}, not {' or '.join(want)}")
        return r

    async def pause(self, route: str, *, actor: str) -> Rollout:
        async with self._lock:
            r = await self._command(route, ("running",))
            self._windows.pop(route, None)
            return await self._save(replace(r, status="paused", updated=self.clock(), pause_cause="operator",
                                            message=f"paused by {actor}"))

    async def resume(self, route: str, *, actor: str) -> Rollout:
        async with self._lock:
            r = await self._command(route, ("paused",))
            state = (await self.store.current()).state
            rt = state.route(route)
            split = {} if rt is None else dict(rt.split)
            # Adopt the current split as this step's, so an operator's manual tweak is not reported again.
            weights = tuple((v, split.get(v, 0.0)) for v, _ in r.weights)
            self._windows.pop(route, None)
            return await self._save(replace(r, status="running", weights=weights, updated=self.clock(),
                                            pause_cause=None, message=f"resumed by {actor}"))

    async def promote(self, route: str, *, actor: str, force: bool = False) -> Rollout:
        """Skip the remaining steps: the canary to 100% now (readiness still applies unless forced)."""
        async with self._lock:
            r = await self._command(route, ACTIVE)
            state = (await self.store.current()).state
            gates.check_readiness(state, {r.config.canary: 1.0}, self.health(), force=force)
            return await self._promote(r, f"by {actor} at step {r.step + 1}/{len(r.config.steps)}", self.clock())

    async def abort(self, route: str, *, actor: str) -> Rollout:
        async with self._lock:
            r = await self._command(route, ACTIVE)
            return await self._roll_back(r, "aborted", f"aborted by {actor}", self.clock())

    async def rollouts(self) -> list[Rollout]:
        return await load_rollouts(self.store)


def plan_baselines(state: State, cfg: CanaryConfig) -> dict[str, float]:
    """The versions the canary takes weight from (all others with weight > 0), validated for a start."""
    route = state.route(cfg.route)
    if route is None:
        raise NotFoundError(f"no route named {cfg.route!r}")
    if cfg.canary not in state.versions:
        raise ValidationError([FieldError("to", f"unknown version {cfg.canary!r}")])
    baselines = {v: w for v, w in route.split if v != cfg.canary and w > 0}
    if not baselines:
        raise ConflictError(f"route {cfg.route!r} has no other version with weight > 0 to compare "
                            f"{cfg.canary!r} with")
    return baselines
