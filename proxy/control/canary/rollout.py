"""Rollout records: the config an operator starts a rollout with, where each rollout stands, and how both
are kept in the store's meta (one key per route plus an index), so a restarted proxy resumes them.

Design rule: records are plain frozen data with a JSON form; a config is validated once, by parse_config,
with errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from proxy.checker import Checker
from proxy.control.canary.analysis import Analysis, Thresholds, Window, _ms
from proxy.control.canary.judge import MetricResult, Rule, parse_rules
from proxy.store.base import Store

Status = Literal["running", "paused", "promoted", "rolled_back", "aborted", "failed"]
ACTIVE: tuple[Status, ...] = ("running", "paused")

DEFAULT_STEPS = (1.0, 5.0, 25.0, 50.0, 100.0)
# Intervals a step waits for its minimum sample before the judge calls it inconclusive and pauses: a canary
# that gets almost no traffic is not judged healthy (or failing) on a handful of requests.
DEFAULT_SAMPLE_WAIT = 3
# Finished steps' analyses kept in a rollout's record (the status page's chart over the steps).
MAX_ANALYSES = 50
PauseCause = Literal["operator", "inconclusive", "split_changed"]


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    route: str
    canary: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    interval: float = 60.0
    limits: Thresholds = field(default_factory=Thresholds)
    prometheus: str | None = None
    checks: tuple[Rule, ...] = ()  # the judge's rules; () = the flat limits decide (as before rules existed)
    sample_wait: int = DEFAULT_SAMPLE_WAIT


def parse_config(body: object, route: str) -> CanaryConfig:
    """An API body ({"to": ..., "steps": [...], "interval": s, ...}) -> config; errors name the field."""
    c = Checker()
    d = c.mapping(body, "", {"to", "steps", "interval", "max_error_rate", "max_p99_ratio", "min_requests",
                             "prometheus", "force", "checks", "sample_wait"})
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
    checks = parse_rules(c, d["checks"], "checks") if d.get("checks") is not None else ()
    sample_wait = c.number(d.get("sample_wait", DEFAULT_SAMPLE_WAIT), "sample_wait", 1, 1000, integer=True)
    prom = d.get("prometheus")
    if prom is not None and (not isinstance(prom, str) or not prom.startswith(("http://", "https://"))):
        c.fail("prometheus", f"expected an http(s):// URL of a Prometheus server, got {prom!r}")
    c.raise_if_any()
    assert to is not None and interval is not None and mer is not None and mpr is not None and mr is not None
    assert sample_wait is not None
    return CanaryConfig(route, to, tuple(steps), float(interval), Thresholds(float(mer), float(mpr), int(mr)), prom,
                        checks, int(sample_wait))


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
    pause_cause: PauseCause | None = None  # why a paused rollout is paused
    analyses: tuple[Analysis, ...] = ()  # each finished step's analysis, oldest first (at most MAX_ANALYSES)
    revision: int | None = None  # the last revision this rollout wrote: a step, the end, an inconclusive event

    @property
    def percent(self) -> float:
        return 100.0 if self.status == "promoted" else (0.0 if self.status in ("rolled_back", "aborted")
                                                        else self.config.steps[self.step])


def rollout_to_json(r: Rollout) -> str:
    return json.dumps(asdict(r))


def _window(d: Mapping[str, Any]) -> Window:
    return Window(int(d["requests"]), int(d["errors"]), d["p99"], d.get("p50"), d.get("p90"))


def _analysis(a: Mapping[str, Any]) -> Analysis:
    return Analysis(a["verdict"], _window(a["canary"]), _window(a["baseline"]), a["error_rate"], a["p99_ratio"],
                    a["reason"], a["time"], a.get("step", 0), a.get("percent", 0.0),
                    tuple(MetricResult(**m) for m in a.get("metrics", ())))


def rollout_from_json(text: str) -> Rollout:
    d = json.loads(text)
    cfg = d["config"]
    config = CanaryConfig(cfg["route"], cfg["canary"], tuple(cfg["steps"]), cfg["interval"],
                          Thresholds(**cfg["limits"]), cfg["prometheus"],
                          tuple(Rule(**r) for r in cfg.get("checks", ())), cfg.get("sample_wait", DEFAULT_SAMPLE_WAIT))
    a = d.get("analysis")
    analysis = None if a is None else _analysis(a)
    return Rollout(config, d["status"], tuple((v, w) for v, w in d["baselines"]), d["step"],
                   tuple((v, w) for v, w in d["weights"]), d["actor"], d["started"], d["updated"],
                   d.get("message", ""), analysis, d.get("check"), d.get("pause_cause"),
                   tuple(_analysis(x) for x in d.get("analyses", ())), d.get("revision"))


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
        for m in a.metrics:
            note = f" ({m.note})" if m.note else ""
            lines.append(f"    {m.outcome:<12} {m.rule}{note}")
    if r.check:
        lines.append(f"  {r.check}")
    if r.message:
        lines.append(f"  {r.message}")
    return "\n".join(lines)
