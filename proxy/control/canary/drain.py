"""Drain: move every new session of a sticky route to a new version while sessions already assigned to the
old one stay there, and say when the old version has no session traffic left.

Design rule: a drain is a split change (old -> 0, new takes its weight) plus the route's assignment cookie,
which the data plane honours for any version in the route's chains, weight 0 included
(CompiledRoute.assigned). So nothing here touches the request path; the canary controller's loop watches
the old version's request counter and declares it drained once it stayed flat for the quiet period.
"""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal

from proxy import changes
from proxy.control import gates
from proxy.control.canary.analysis import counters_of
from proxy.errors import ConflictError, FieldError, NotFoundError, ValidationError
from proxy.model import Route, State
from proxy.store.base import Store
from proxy.telemetry.metrics import StatsSnapshot

DrainStatus = Literal["draining", "drained", "cancelled"]
# Session traffic to the old version stays flat this long before it counts as drained. Long enough for a
# browser tab's periodic polling (typically < 60 s) to show up; operators shorten it for APIs.
DEFAULT_QUIET = 120.0
INDEX_KEY = "drain/index"
# Progress is written back to the store at most this often (the status shows it; the decision does not need it).
SAVE_EVERY = 1.0
# Counters belong to one process: a drain's start-time baseline is only used by the process that took it.
PROCESS = f"{socket.gethostname()}:{os.getpid()}"
# The status page's chart of old-session requests: one point per tick (about a second), the last 10 minutes.
HISTORY_POINTS = 600


@dataclass(frozen=True, slots=True)
class Drain:
    route: str
    old: str
    new: str
    quiet: float
    status: DrainStatus
    actor: str
    started: float
    updated: float
    old_requests: int = 0  # session requests the old version served since the drain began (this process)
    last_seen: float = 0.0  # when the old version last served one; the quiet period counts from here
    message: str = ""
    # The old version's request counter on the route when the drain began, in process `baseline_of`: the
    # requests after it are the drain's, from the very first one. Another process counts from its first look.
    baseline: int | None = None
    baseline_of: str = ""


def drain_weights(route: Route, old: str, new: str) -> dict[str, float]:
    """The new version takes over the old one's weight; the old one keeps its bucket position at 0."""
    split = dict(route.split)
    if old not in split:
        raise ValidationError([FieldError("from", f"version {old!r} is not in route {route.name!r}'s split")])
    if old == new:
        raise ValidationError([FieldError("to", "cannot drain a version into itself")])
    total = split.get(new, 0.0) + split[old]
    if total <= 0:
        raise ConflictError(f"neither {old!r} nor {new!r} has weight on route {route.name!r}: nothing to drain")
    return {old: 0.0, new: total}


def observe(d: Drain, count: int, previous: int | None, now: float) -> Drain:
    """Pure progress step: `count` is the old version's cumulative request counter on the route now,
    `previous` what it was at the last observation (None: first one, so any traffic is unknown yet)."""
    if d.status != "draining":
        return d
    if previous is None:
        return replace(d, updated=now)
    grew = count - previous if count >= previous else count  # a reset counter: all it holds is new
    if grew > 0:
        d = replace(d, old_requests=d.old_requests + grew, last_seen=now, updated=now)
    if now - d.last_seen >= d.quiet:
        idle = now - d.last_seen
        return replace(d, status="drained", updated=now,
                       message=f"{d.old} drained: no session traffic for {idle:.1f}s "
                               f"({d.old_requests} request(s) served to old sessions since the drain began)")
    return d


def _key(route: str) -> str:
    return f"drain/{route}"


async def load_drain(store: Store, route: str) -> Drain | None:
    raw = await store.get_meta(_key(route))
    return None if raw is None else Drain(**json.loads(raw))


async def load_drains(store: Store) -> list[Drain]:
    out = []
    for name in json.loads(await store.get_meta(INDEX_KEY) or "[]"):
        d = await load_drain(store, name)
        if d is not None:
            out.append(d)
    return out


async def save_drain(store: Store, d: Drain) -> None:
    await store.set_meta(_key(d.route), json.dumps(asdict(d)))
    names = json.loads(await store.get_meta(INDEX_KEY) or "[]")
    if d.route not in names:
        await store.set_meta(INDEX_KEY, json.dumps([*names, d.route]))


async def start_drain(store: Store, health: gates.HealthMap, route: str, old: str, new: str, *,
                      quiet: float = DEFAULT_QUIET, actor: str, now: float, force: bool = False,
                      old_requests: Callable[[], int] | None = None) -> Drain:
    """`old_requests`: the old version's request counter on the route in this process (the drain tracker's
    source), read just before the split changes so that every old-session request after it is counted."""
    state = (await store.current()).state
    r = state.route(route)
    if r is None:
        raise NotFoundError(f"no route named {route!r}")
    if new not in state.versions:
        raise ValidationError([FieldError("to", f"unknown version {new!r}")])
    if not r.sticky:
        raise ConflictError(f"route {route!r} is not sticky: sessions have no assignment to keep, so a drain is "
                            "just a split change")
    if not r.assignment_cookie:
        raise ConflictError(f"route {route!r} has no assignment_cookie: without it sessions on {old!r} cannot "
                            "stay there; set one on the route (and let sessions pick it up) before draining")
    prior = await load_drain(store, route)
    if prior is not None and prior.status == "draining":
        raise ConflictError(f"route {route!r} is already draining {prior.old!r} into {prior.new!r}")
    weights = drain_weights(r, old, new)
    gates.check_readiness(state, weights, health, route=route, force=force)
    await gates.check_gate(store, state.versions[new], actor=actor, routes=(route,), force=force)
    reason = (f"drain {route}: new sessions go to {new}; sessions assigned to {old} stay until it has been "
              f"idle for {quiet:g}s")
    baseline = None if old_requests is None else old_requests()
    await store.update(lambda s: changes.set_split(s, route, weights), actor=actor, reason=reason)
    d = Drain(route, old, new, quiet, "draining", actor, now, now, last_seen=now, message=reason,
              baseline=baseline, baseline_of=PROCESS if baseline is not None else "")
    await save_drain(store, d)
    return d


async def cancel_drain(store: Store, route: str, *, actor: str, now: float) -> Drain:
    d = await load_drain(store, route)
    if d is None or d.status != "draining":
        raise NotFoundError(f"route {route!r} is not draining")
    d = replace(d, status="cancelled", updated=now, message=f"cancelled by {actor} (the split stays as it is)")
    await save_drain(store, d)
    return d


class DrainTracker:
    """The canary controller's helper for drains: remembers counters between its ticks. It needs the store,
    the process's counters and the clock, not the controller (which owns it)."""

    def __init__(self, store: Store, stats_source: Callable[[], StatsSnapshot],
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.stats_source = stats_source
        self.clock = clock
        # route -> (the drain as last observed, the old version's counter then). The stored record lags
        # behind (saves are throttled), so the live one is authoritative while the stored one is draining.
        self._live: dict[str, tuple[Drain, int]] = {}
        self._saved: dict[str, float] = {}
        # route -> (time, old-session requests so far) per tick while draining: in memory, for the status page
        self._points: dict[str, deque[tuple[float, int]]] = {}

    def __repr__(self) -> str:
        return f"<DrainTracker [watching: {len(self._live)}]>"

    async def tick(self) -> list[Drain]:
        store = self.store
        now = self.clock()
        out: list[Drain] = []
        drains = await load_drains(store)
        if not any(d.status == "draining" for d in drains):
            self._live.clear()
            return drains
        snap = self.stats_source()  # summing every worker's counters is the costly part: only when needed
        state = (await store.current()).state
        for stored in drains:
            d = stored
            if d.status != "draining":
                self._live.pop(d.route, None)
                out.append(d)
                continue
            if state.route(d.route) is None:
                d = replace(d, status="cancelled", updated=now, message=f"route {d.route!r} was deleted")
                await save_drain(store, d)
                out.append(d)
                continue
            count = counters_of(snap, d.route, [d.old]).requests
            live = self._live.get(d.route)
            previous = d.baseline if d.baseline_of == PROCESS else None
            if live is not None and live[0].started == d.started:
                d, previous = live
            nd = observe(d, count, previous, now)
            self._live[d.route] = (nd, count)
            self._record(nd, now)
            if nd.status == "drained":
                nd = await self._release(nd, state)
                await save_drain(store, nd)
            elif nd.old_requests != d.old_requests and now - self._saved.get(d.route, 0.0) >= SAVE_EVERY:
                self._saved[d.route] = now
                await save_drain(store, nd)
            out.append(nd)
        return out

    def _record(self, d: Drain, now: float) -> None:
        points = self._points.get(d.route)
        if points is None or (points and points[0][0] < d.started):  # a new drain on the route starts afresh
            points = self._points[d.route] = deque(maxlen=HISTORY_POINTS)
        points.append((round(now, 3), d.old_requests))

    def history(self, route: str) -> list[tuple[float, int]]:
        """(time, old-session requests so far) of the route's drain, one per tick this process observed it."""
        return list(self._points.get(route, ()))

    def live(self, route: str) -> Drain | None:
        """The drain as last observed (the stored record lags up to SAVE_EVERY behind)."""
        live = self._live.get(route)
        return None if live is None else live[0]

    async def _release(self, d: Drain, state: State) -> Drain:
        """A drained version leaves the split (weight 0 there already), so the assignment cookie stops
        holding sessions on it: they follow the split like new ones. One revision, with the drain's numbers."""
        store = self.store
        _, note = release(state, d)
        d = replace(d, message=f"{d.message}; {note}") if note else d
        summary = f"drain {d.route}: {d.old} drained into {d.new}"
        released: list[bool] = []

        def change(s: State) -> changes.Change:
            new, _ = release(s, d)
            released.append(new is not s)
            return new, summary

        await store.update(change, actor=d.actor, reason=d.message)
        if not released or not released[-1]:
            # Released already (or the operator gave it weight again): the end of the drain is still history.
            await gates.record(store, actor=d.actor, summary=summary, reason=d.message, routes=(d.route,))
        return d


def release(state: State, d: Drain) -> tuple[State, str]:
    """The state with drained `d.old` dropped from the split, and a note for the drain's message."""
    r = state.route(d.route)
    if r is None or dict(r.split).get(d.old) != 0.0 or not any(w > 0 for v, w in r.split if v != d.old):
        return state, ""
    new, _ = changes.drop_from_split(state, d.route, d.old)
    if d.old in r.fallback:
        return new, (f"{d.old} is still in the route's fallback chain, so sessions assigned to it keep reaching "
                     "it until it is removed from there")
    return new, "released: its sessions now follow the split"


def summary(d: Drain, now: float) -> str:
    if d.status == "draining":
        idle = now - d.last_seen
        return (f"{d.route}: draining {d.old} -> {d.new}  {d.old_requests} old-session request(s) so far, "
                f"idle {idle:.0f}s of {d.quiet:g}s")
    return f"{d.route}: {d.status} {d.old} -> {d.new}  {d.message}"


def timing(d: Drain, now: float) -> dict[str, float | None]:
    """Seconds since the old version last served a session request, and of the quiet period left."""
    if d.status != "draining":
        return {"idle": None, "quiet_left": None}
    idle = max(0.0, now - d.last_seen)
    return {"idle": round(idle, 3), "quiet_left": round(max(0.0, d.quiet - idle), 3)}


def drain_to_dict(d: Drain) -> Mapping[str, object]:
    return asdict(d)
