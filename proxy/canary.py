"""Automated canary: raise a new version's share of a route step by step while its numbers hold, and roll
back at once when they do not.

Design rule: the decision is a pure function (`analyse`) of two windows of numbers (canary, baseline) over
the requests since the last step, and the limits. The controller only gathers those numbers, keeps where
each rollout stands in the store's meta (so a restarted proxy resumes it) and applies each decision through
proxy.ops.set_split, so every step and every rollback is a revision with actor "canary" and a reason that
carries the numbers it was decided on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from proxy import drain as drain_mod
from proxy import gates, ops
from proxy.errors import ConflictError, FieldError, NotFoundError, StoreUnavailableError, ValidationError
from proxy.model import State
from proxy.parse import Checker
from proxy.stats import HIST_SLOTS, LATENCY_BUCKETS

if TYPE_CHECKING:
    from proxy.admin.context import AdminContext
    from proxy.metrics import StatsSnapshot
    from proxy.store.base import Store

log = logging.getLogger("turnout.canary")

ACTOR = "canary"
Verdict = Literal["pass", "fail", "wait"]
Status = Literal["running", "paused", "promoted", "rolled_back", "aborted", "failed"]
ACTIVE: tuple[Status, ...] = ("running", "paused")

DEFAULT_STEPS = (1.0, 5.0, 25.0, 50.0, 100.0)


# ---------------------------------------------------------------------------------------------- analysis

@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters of one or more versions on a route, as the proxy counts them."""

    requests: int = 0
    errors: int = 0  # 5xx responses + upstream errors
    latency: tuple[int, ...] = ()  # one count per LATENCY_BUCKETS bucket, plus the overflow bucket

    def since(self, earlier: Counters) -> Counters:
        """The increase since `earlier`. Counters that went down were reset (a restarted worker): all
        they hold now is new."""
        if self.requests < earlier.requests or self.errors < earlier.errors:
            return self
        if len(earlier.latency) != len(self.latency):
            return Counters(self.requests - earlier.requests, self.errors - earlier.errors, self.latency)
        return Counters(self.requests - earlier.requests, self.errors - earlier.errors,
                        tuple(max(0, a - b) for a, b in zip(self.latency, earlier.latency, strict=True)))


def histogram_quantile(counts: Sequence[int], q: float, bounds: Sequence[float] = LATENCY_BUCKETS) -> float | None:
    """The q-quantile of a bucketed histogram, interpolated linearly inside its bucket (as Prometheus does).

    None for an empty histogram. The overflow bucket has no upper bound: its quantile is the last bound.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


@dataclass(frozen=True, slots=True)
class Window:
    """One side of a comparison: what happened since the last step."""

    requests: int
    errors: int
    p99: float | None  # seconds; None without requests

    @classmethod
    def of(cls, c: Counters) -> Window:
        return cls(c.requests, c.errors, histogram_quantile(c.latency, 0.99))

    @property
    def error_rate(self) -> float | None:
        return None if self.requests == 0 else min(1.0, self.errors / self.requests)


@dataclass(frozen=True, slots=True)
class Limits:
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5
    min_requests: int = 200


@dataclass(frozen=True, slots=True)
class Analysis:
    verdict: Verdict
    canary: Window
    baseline: Window
    error_rate: float | None
    p99_ratio: float | None
    reason: str
    time: float = 0.0


# Fewer requests than this on either side and "p99" is the single slowest request: not compared.
P99_MIN_SAMPLES = 100
# A p99 regression must also be at least this large in absolute terms: below 10 ms the histogram's buckets
# are 0.5-5 ms wide, so a 1 ms -> 2 ms "doubling" is quantisation and scheduling noise, not a slower release.
P99_NOISE_FLOOR = 0.005


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}ms"


def analyse(canary: Window, baseline: Window, limits: Limits, now: float = 0.0) -> Analysis:
    """Compare the canary with its baseline over the same window. Pure; the verdict's reason has the numbers.

    - fewer than min_requests canary requests: wait, unless the errors already seen exceed what
      max_error_rate allows over min_requests (then the rate can only end up breached: fail now);
    - canary error rate above max_error_rate: fail;
    - canary p99 above max_p99_ratio times the baseline's p99: fail. Only when both sides had at least
      P99_MIN_SAMPLES requests: the p99 of fewer is just their slowest request, and one scheduler hiccup
      would roll back a healthy version. Nor when the difference is under P99_NOISE_FLOOR;
    - otherwise pass.
    """
    rate = canary.error_rate
    ratio = None
    if canary.p99 is not None and baseline.p99:
        ratio = canary.p99 / baseline.p99
    few = min(canary.requests, baseline.requests) < P99_MIN_SAMPLES

    def result(verdict: Verdict, reason: str) -> Analysis:
        return Analysis(verdict, canary, baseline, rate, ratio, reason, now)

    errors = f"{canary.errors}/{canary.requests}"
    if canary.requests < limits.min_requests:
        if canary.errors > limits.max_error_rate * limits.min_requests:
            return result("fail", f"{canary.errors} errors in the first {canary.requests} requests already exceed "
                                  f"max error rate {limits.max_error_rate:g} of {limits.min_requests} requests")
        return result("wait", f"{canary.requests} of {limits.min_requests} requests needed ({errors} errors)")
    assert rate is not None
    if rate > limits.max_error_rate:
        return result("fail", f"error rate {rate:.4f} ({errors}) > max {limits.max_error_rate:g}")
    text = f"error rate {rate:.4f} ({errors}) <= {limits.max_error_rate:g}"
    if ratio is None:
        return result("pass", f"{text}; p99 {_ms(canary.p99)} (no baseline requests to compare)")
    if few:
        return result("pass", f"{text}; p99 {_ms(canary.p99)} vs baseline {_ms(baseline.p99)} not compared "
                              f"(fewer than {P99_MIN_SAMPLES} requests on a side)")
    p99 = f"p99 {_ms(canary.p99)} = {ratio:.2f}x baseline {_ms(baseline.p99)}"
    if ratio > limits.max_p99_ratio:
        assert canary.p99 is not None and baseline.p99 is not None
        if canary.p99 - baseline.p99 < P99_NOISE_FLOOR:
            return result("pass", f"{text}; {p99}, but within {_ms(P99_NOISE_FLOOR)} of it")
        return result("fail", f"{p99} > max {limits.max_p99_ratio:g}x ({text})")
    return result("pass", f"{text}; {p99} <= {limits.max_p99_ratio:g}x")


def step_weights(baselines: Mapping[str, float], canary: str, percent: float) -> dict[str, float]:
    """Split weights giving the canary `percent`% and the baselines the rest in their original proportions.

    The scale is the baselines' total, so 'v1=100' at 5% becomes 'v1=95 v2=5'.
    """
    total = sum(baselines.values())
    share = percent / 100.0
    out = {v: round(w * (1.0 - share), 4) for v, w in baselines.items()}
    out[canary] = round(total * share, 4)
    return out


def rollback_weights(baselines: Mapping[str, float], canary: str) -> dict[str, float]:
    return {**baselines, canary: 0.0}


# ------------------------------------------------------------------------------------ where numbers come from

def counters_of(snap: StatsSnapshot, route: str, versions: Iterable[str]) -> Counters:
    """Sum of the versions' counters on `route`, over every worker (proxy.metrics.aggregate)."""
    requests = errors = 0
    latency = [0] * HIST_SLOTS
    for v in versions:
        cell = snap.get(route, v)
        requests += cell.requests
        errors += cell.errors_5xx + cell.upstream_errors
        for i, n in enumerate(cell.latency):
            latency[i] += n
    return Counters(requests, errors, tuple(latency))


# Metric names as proxy.metrics exports them (queried when a rollout uses --prometheus).
PROM_REQUESTS = "turnout_requests_total"
PROM_DURATION_BUCKET = "turnout_request_duration_seconds_bucket"
PROM_UPSTREAM_ERRORS = "turnout_upstream_errors_total"
# Prometheus rejects ranges below its scrape resolution poorly; a whole second is the smallest we ask for.
PROM_MIN_RANGE = 1
PROM_TIMEOUT = 10.0


def _prom_regex(names: Iterable[str]) -> str:
    # Version names are [A-Za-z0-9._-]; only '.' is special in a regex, and PromQL strings escape '\'.
    return "|".join(sorted(n.replace(".", "\\\\.") for n in names))


def prometheus_queries(route: str, versions: Iterable[str], seconds: float) -> dict[str, str]:
    """PromQL for one side of the comparison over the last `seconds`: requests, errors and p99."""
    sel = f'route="{route}",version=~"{_prom_regex(versions)}"'
    rng = f"[{max(PROM_MIN_RANGE, round(seconds))}s]"
    vsel = f'version=~"{_prom_regex(versions)}"'
    return {
        "requests": f"sum(increase({PROM_REQUESTS}{{{sel}}}{rng}))",
        "errors": f'sum(increase({PROM_REQUESTS}{{{sel},code=~"5.."}}{rng}))'
                  f" + (sum(increase({PROM_UPSTREAM_ERRORS}{{{vsel}}}{rng})) or vector(0))",
        "p99": f"histogram_quantile(0.99, sum by (le) (rate({PROM_DURATION_BUCKET}{{{sel}}}{rng})))",
    }


def parse_prometheus_value(body: Any) -> float | None:
    """The single number of an instant-query response; None for no series or NaN. Raises on an error body."""
    if not isinstance(body, Mapping) or body.get("status") != "success":
        err = body.get("error") if isinstance(body, Mapping) else None
        raise ValueError(f"prometheus query failed: {err if err else repr(body)}")
    data = body.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        result = [{"value": result}]
    if not isinstance(result, list) or not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value  # NaN: histogram_quantile over no requests


class PrometheusSource:
    """Reads both windows from a Prometheus server's HTTP API instead of this proxy's own counters."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"<PrometheusSource {self.url}>"

    async def window(self, route: str, versions: Iterable[str], seconds: float) -> Window:
        import aiohttp

        queries = prometheus_queries(route, versions, seconds)
        values: dict[str, float | None] = {}
        timeout = aiohttp.ClientTimeout(total=PROM_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for name, q in queries.items():
                async with session.get(f"{self.url}/api/v1/query", params={"query": q}) as resp:
                    values[name] = parse_prometheus_value(await resp.json(content_type=None))
        return Window(round(values["requests"] or 0), round(values["errors"] or 0), values["p99"])


# ------------------------------------------------------------------------------------------ rollout records

@dataclass(frozen=True, slots=True)
class CanaryConfig:
    route: str
    canary: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    interval: float = 60.0
    limits: Limits = field(default_factory=Limits)
    prometheus: str | None = None


def parse_config(body: object, route: str) -> CanaryConfig:
    """An API body ({"to": ..., "steps": [...], "interval": s, ...}) -> config; errors name the field."""
    c = Checker()
    d = c.mapping(body, "", {"to", "steps", "interval", "max_error_rate", "max_p99_ratio", "min_requests",
                             "prometheus", "force"})
    if d is None:
        c.raise_if_any()
        raise AssertionError
    to = c.string(d.get("to"), "to", what="the canary version's name")
    steps: list[float] = []
    raw_steps = d.get("steps", list(DEFAULT_STEPS))
    if not isinstance(raw_steps, list) or not raw_steps:
        c.fail("steps", "expected a non-empty list of percentages")
    else:
        for i, s in enumerate(raw_steps):
            n = c.number(s, f"steps[{i}]", 0.01, 100)
            if n is not None:
                if steps and n <= steps[-1]:
                    c.fail(f"steps[{i}]", f"steps must increase, got {n:g} after {steps[-1]:g}")
                steps.append(float(n))
    interval = c.number(d.get("interval", 60.0), "interval", 0.01, 86400)
    mer = c.number(d.get("max_error_rate", 0.01), "max_error_rate", 0, 1)
    mpr = c.number(d.get("max_p99_ratio", 1.5), "max_p99_ratio", 1)
    mr = c.number(d.get("min_requests", 200), "min_requests", 1, integer=True)
    prom = d.get("prometheus")
    if prom is not None and (not isinstance(prom, str) or not prom.startswith(("http://", "https://"))):
        c.fail("prometheus", f"expected an http(s):// URL of a Prometheus server, got {prom!r}")
    c.raise_if_any()
    assert to is not None and interval is not None and mer is not None and mpr is not None and mr is not None
    return CanaryConfig(route, to, tuple(steps), float(interval), Limits(float(mer), float(mpr), int(mr)), prom)


@dataclass(frozen=True, slots=True)
class Rollout:
    config: CanaryConfig
    status: Status
    baselines: tuple[tuple[str, float], ...]  # the baselines' weights when the rollout started
    step: int  # index into config.steps of the share the canary holds now
    weights: tuple[tuple[str, float], ...]  # the split this rollout last set, to notice outside changes
    actor: str  # who started it
    started: float
    updated: float
    message: str = ""
    analysis: Analysis | None = None
    check: str | None = None  # the check command's verdict summary, when the version has one

    @property
    def percent(self) -> float:
        return 100.0 if self.status == "promoted" else (0.0 if self.status in ("rolled_back", "aborted")
                                                        else self.config.steps[self.step])


def rollout_to_json(r: Rollout) -> str:
    return json.dumps(asdict(r))


def _window(d: Mapping[str, Any]) -> Window:
    return Window(int(d["requests"]), int(d["errors"]), d["p99"])


def rollout_from_json(text: str) -> Rollout:
    d = json.loads(text)
    cfg = d["config"]
    config = CanaryConfig(cfg["route"], cfg["canary"], tuple(cfg["steps"]), cfg["interval"],
                          Limits(**cfg["limits"]), cfg["prometheus"])
    a = d.get("analysis")
    analysis = None if a is None else Analysis(a["verdict"], _window(a["canary"]), _window(a["baseline"]),
                                               a["error_rate"], a["p99_ratio"], a["reason"], a["time"])
    return Rollout(config, d["status"], tuple((v, w) for v, w in d["baselines"]), d["step"],
                   tuple((v, w) for v, w in d["weights"]), d["actor"], d["started"], d["updated"],
                   d.get("message", ""), analysis, d.get("check"))


def _key(route: str) -> str:
    return f"canary/{route}"


INDEX_KEY = "canary/index"


async def load_rollout(store: Store, route: str) -> Rollout | None:
    raw = await store.get_meta(_key(route))
    return None if raw is None else rollout_from_json(raw)


async def load_rollouts(store: Store) -> list[Rollout]:
    names = json.loads(await store.get_meta(INDEX_KEY) or "[]")
    out = []
    for n in names:
        r = await load_rollout(store, n)
        if r is not None:
            out.append(r)
    return out


async def save_rollout(store: Store, r: Rollout) -> None:
    await store.set_meta(_key(r.config.route), rollout_to_json(r))
    names = json.loads(await store.get_meta(INDEX_KEY) or "[]")
    if r.config.route not in names:
        await store.set_meta(INDEX_KEY, json.dumps([*names, r.config.route]))


# ------------------------------------------------------------------------------------------------ leadership

class Leader(abc.ABC):
    """Which replica drives rollouts: with several proxies on one etcd store exactly one may step a route."""

    @abc.abstractmethod
    def is_leader(self) -> bool: ...

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class AlwaysLeader(Leader):
    """SQLite: one proxy per store, so this process always leads."""

    def __repr__(self) -> str:
        return "<AlwaysLeader>"

    def is_leader(self) -> bool:
        return True


# Lease time-to-live: a crashed leader's rollouts stand still at most this long before another replica leads.
LEASE_TTL = 5
# A leader trusts its lease for this share of the TTL after the keep-alive it last sent, so it stops acting
# before etcd could hand the key to another replica (etcd counts the TTL from when it got the keep-alive).
LEASE_TRUST = 0.6


class EtcdLeader(Leader):
    """Leadership as an etcd key created under a lease: the replica whose transaction created the key leads
    while it keeps the lease alive; a crashed or partitioned leader's lease lapses and another one takes over.
    `stop()` revokes the lease, so a clean shutdown hands over at once."""

    def __init__(self, host: str, port: int, key: str, *, ttl: int = LEASE_TTL, identity: str | None = None) -> None:
        import os
        import uuid

        self.host, self.port, self.key = host, port, key.encode()
        self.ttl = ttl
        self.identity = (identity or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}").encode()
        self._client: Any = None
        self._lease: Any = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<EtcdLeader {self.key.decode()} [{'leading' if self.is_leader() else 'following'}]>"

    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    async def start(self) -> None:
        import aetcd

        from proxy.store.etcd import GRPC_OPTIONS

        self._client = aetcd.Client(host=self.host, port=self.port, timeout=2.0, options=GRPC_OPTIONS)
        self._task = asyncio.create_task(self._run(), name="turnout-canary-leader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leading = self.is_leader()
        self._valid_until = 0.0
        if self._client is not None:
            if leading and self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.revoke()
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def campaign(self) -> bool:
        """One round: keep the lease alive, then hold or try to take the key. True while leading."""
        c = self._client
        sent = time.monotonic()
        if self._lease is not None:
            reply = await self._lease.refresh()
            if reply is None or reply.TTL <= 0:  # expired while we could not reach etcd
                self._lease = None
                self._valid_until = 0.0
        if self._lease is None:
            self._lease = await c.lease(self.ttl)
        tx = c.transactions
        won, responses = await c.transaction(
            compare=[tx.version(self.key) == 0],
            success=[tx.put(self.key, self.identity, lease=self._lease)],
            failure=[tx.get(self.key)])
        holder = self.identity if won else (bytes(responses[0][0][0]) if responses and responses[0] else b"")
        self._valid_until = sent + self.ttl * LEASE_TRUST if holder == self.identity else 0.0
        return self.is_leader()

    async def _run(self) -> None:
        while True:
            try:
                await self.campaign()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd unreachable: leadership lapses by itself (is_leader's deadline)
                log.warning("canary leader election: %s", e)
            await asyncio.sleep(self.ttl / 5)


def leader_for(store: Store) -> Leader:
    """An etcd store is shared by replicas, which elect one; any other store has a single proxy."""
    from urllib.parse import urlsplit

    if not store.url.startswith("etcd://"):
        return AlwaysLeader()
    parts = urlsplit(store.url)
    prefix = parts.path.strip("/") or "turnout"
    return EtcdLeader(parts.hostname or "127.0.0.1", parts.port or 2379, f"/{prefix}/leader/canary")


# ------------------------------------------------------------------------------------------------ controller

@dataclass(slots=True)
class _Window:
    """Where the current step's analysis window began (in memory: counters belong to this process)."""

    step: int
    started: float
    next_at: float
    counters: dict[str, Counters]  # "canary" / "baseline" -> cumulative counters at the window's start


StatsSource = Callable[[], "StatsSnapshot"]


class CanaryController:
    """Drives every rollout (and drain) in the store; started by `turnout serve` in the supervisor process."""

    def __init__(self, ctx: AdminContext, stats_source: StatsSource, *, leader: Leader | None = None,
                 clock: Callable[[], float] = time.time, tick: float | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.stats_source = stats_source
        self.leader = leader or leader_for(ctx.store)
        self.clock = clock
        self._tick = tick
        self._lock = asyncio.Lock()
        self._windows: dict[str, _Window] = {}
        self._task: asyncio.Task[None] | None = None
        self.drains = drain_mod.DrainTracker(self)

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "stopped"
        return f"<CanaryController {state} [windows: {len(self._windows)} | leader: {self.leader.is_leader()}]>"

    # lifecycle

    async def start(self) -> None:
        await self.leader.start()
        self.ctx.extras["canary"] = self
        self._task = asyncio.create_task(self._run(), name="turnout-canary")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.leader.stop()
        if self.ctx.extras.get("canary") is self:
            del self.ctx.extras["canary"]

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
        self.ctx.stats.canary_step(r.config.route, r.step + 1)
        return w

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
            return await self._save(replace(r, status="paused", updated=now,
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
        a = analyse(canary, baseline, cfg.limits, now)
        self.ctx.stats.canary_analysis(cfg.route, "inconclusive" if a.verdict == "wait" else a.verdict)
        r = replace(r, analysis=a, updated=now)
        if a.verdict == "fail":
            return await self._roll_back(r, "rolled_back", f"analysis failed at {cfg.steps[r.step]:g}%: {a.reason}",
                                         now)
        if a.verdict == "wait":
            return await self._save(replace(r, message=f"waiting: {a.reason}"))
        nxt = r.step + 1
        if nxt >= len(cfg.steps) or cfg.steps[nxt] >= 100.0:
            return await self._promote(r, a, now)
        version = state.versions[cfg.canary]
        why = gates.version_ready(version, self.ctx.health())
        if why is not None:
            return await self._save(replace(r, message=f"analysis passed but not stepping: {why}"))
        return await self._set_step(r, nxt, f"analysis passed at {cfg.steps[r.step]:g}%: {a.reason}", now)

    # actions (all under self._lock)

    async def _apply(self, r: Rollout, weights: Mapping[str, float], reason: str) -> Rollout:
        route = r.config.route
        await self.store.update(lambda s: ops.set_split(s, route, weights), actor=ACTOR, reason=reason)
        merged = dict(r.weights) | dict(weights)
        return replace(r, weights=tuple((v, merged[v]) for v in sorted(merged)))

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

    async def _promote(self, r: Rollout, a: Analysis, now: float) -> Rollout:
        cfg = r.config
        weights = step_weights(dict(r.baselines), cfg.canary, 100.0)
        old = ", ".join(v for v, _ in r.baselines)
        reason = (f"canary {cfg.route}: promoted {cfg.canary} to 100% after {len(cfg.steps)} step(s); {a.reason}; "
                  f"{old} kept registered (weight 0) for fallback")
        r = replace(await self._apply(r, weights, reason), step=len(cfg.steps) - 1)
        self.ctx.stats.canary_step(cfg.route, len(cfg.steps))
        return await self._finish(r, "promoted", reason, now)

    async def _roll_back(self, r: Rollout, status: Status, why: str, now: float) -> Rollout:
        cfg = r.config
        weights = rollback_weights(dict(r.baselines), cfg.canary)
        reason = f"canary {cfg.route}: rolled back {cfg.canary} to 0%; {why}"
        r = await self._apply(r, weights, reason)
        self.ctx.stats.canary_step(cfg.route, 0)
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
        gates.check_readiness(state, {cfg.canary: 1.0}, self.ctx.health(), force=force)
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
            return await self._save(replace(r, status="paused", updated=self.clock(), message=f"paused by {actor}"))

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
                                            message=f"resumed by {actor}"))

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


def describe(r: Rollout, width: int = 20) -> str:
    """Status lines for one rollout: a progress bar, the step, the last analysis numbers."""
    cfg = r.config
    pct = r.percent
    filled = round(width * pct / 100)
    bar = "#" * filled + "." * (width - filled)
    base = "+".join(v for v, _ in r.baselines)
    lines = [f"{cfg.route}: {cfg.canary} vs {base}  [{bar}] {pct:g}%  step {r.step + 1}/{len(cfg.steps)}  {r.status}"]
    a = r.analysis
    if a is not None:
        rate = "n/a" if a.error_rate is None else f"{a.error_rate:.4f}"
        ratio = "n/a" if a.p99_ratio is None else f"{a.p99_ratio:.2f}x"
        lines.append(f"  last analysis: {a.verdict}  canary {a.canary.requests} req, error rate {rate}, "
                     f"p99 {_ms(a.canary.p99)}  baseline {a.baseline.requests} req, p99 {_ms(a.baseline.p99)}  "
                     f"p99 ratio {ratio}")
    if r.check:
        lines.append(f"  {r.check}")
    if r.message:
        lines.append(f"  {r.message}")
    return "\n".join(lines)

