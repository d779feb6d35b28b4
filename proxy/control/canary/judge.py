"""The canary judge's rules: per metric, a bound that passes and/or a bound that fails, absolute or relative to
the baseline measured over the same window; and the outcome of each rule on one window.

Syntax (a rollout's `checks`): `{"metric": "p99", "pass": "<= 1.2x baseline", "fail": "> 2x baseline"}`.
A bound is `N` (the metric's unit: a ratio for error_rate, seconds for latencies), `N%`, `Nms`, `Ns`,
`Nx baseline`, `baseline + N[%|ms|s]`, or `Nx baseline + N[...]`; `pass` may start with `<=` and `fail` with
`>` (read as written: the value passes at or below its pass bound, fails above its fail bound).

Design rule: pure functions of numbers; no I/O. With both bounds a value between them is `inconclusive`:
the judge is not sure, and says so, instead of rolling forward or back on noise. A rule that cannot be
judged on this window (a relative bound without baseline requests, a latency quantile of too few requests)
is `skipped` and says why; it neither passes nor fails the step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.checker import Checker

MetricName = Literal["error_rate", "p50", "p90", "p99"]
METRICS: tuple[MetricName, ...] = ("error_rate", "p50", "p90", "p99")
RuleOutcome = Literal["pass", "fail", "inconclusive", "skipped"]
# Fewer requests than this on a side and a high quantile is the single slowest request: not judged.
QUANTILE_MIN_SAMPLES = 100
# A relative latency bound is only breached by at least this much more than the baseline: below 10 ms the
# histogram's buckets are 0.5-5 ms wide, so a 1 ms -> 2 ms "doubling" is quantisation noise.
LATENCY_NOISE_FLOOR = 0.005

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(%|ms|s)?"
_BOUND_RE = re.compile(
    rf"^(?:(?:{_NUM}\s*x\s*)?(baseline)(?:\s*([+-])\s*{_NUM}\s*{_UNIT})?|{_NUM}\s*{_UNIT})$")


@dataclass(frozen=True, slots=True)
class Bound:
    """factor x baseline + offset (relative), or offset alone; in the metric's unit (ratio or seconds)."""

    relative: bool
    factor: float
    offset: float

    def resolve(self, baseline: float | None) -> float | None:
        if not self.relative:
            return self.offset
        # Rounded: 0.01 + 0.05 shown as 0.060000000000000005 helps no one reading the bound.
        return None if baseline is None else round(self.factor * baseline + self.offset, 9)


def _amount(number: str, unit: str | None, metric: MetricName) -> float | None:
    n = float(number)
    if metric == "error_rate":
        return n / 100.0 if unit == "%" else (n if unit is None else None)
    return {None: n, "s": n, "ms": n / 1000.0}.get(unit)


def parse_bound(text: str, metric: MetricName, op: str) -> Bound | str:
    """The bound of one side of a rule, or why `text` is not one (for the caller's field error)."""
    t = text.strip()
    if t.startswith(op):
        t = t[len(op):].strip()
    m = _BOUND_RE.match(t)
    if m is None:
        return (f"expected a bound such as '1%', '250ms', '1.2x baseline' or 'baseline + 0.5%' "
                f"(optionally after '{op}'), got {text!r}")
    factor, base, sign, off, off_unit, absolute, abs_unit = m.groups()
    units = "%, or a plain ratio" if metric == "error_rate" else "ms or s, or plain seconds"
    if base is None:
        v = _amount(absolute, abs_unit, metric)
        if v is None:
            return f"{metric} is measured in {units}, got {text!r}"
        return Bound(False, 0.0, v)
    offset = 0.0
    if off is not None:
        v = _amount(off, off_unit, metric)
        if v is None:
            return f"{metric} is measured in {units}, got {text!r}"
        offset = v if sign == "+" else -v
    return Bound(True, 1.0 if factor is None else float(factor), offset)


@dataclass(frozen=True, slots=True)
class Rule:
    metric: MetricName
    pass_rule: str | None  # the bound's text as the operator wrote it
    fail_rule: str | None

    def bounds(self) -> tuple[Bound | None, Bound | None]:
        p = None if self.pass_rule is None else parse_bound(self.pass_rule, self.metric, "<=")
        f = None if self.fail_rule is None else parse_bound(self.fail_rule, self.metric, ">")
        assert not isinstance(p, str) and not isinstance(f, str), "rules are validated by parse_rules"
        return p, f

    @property
    def text(self) -> str:
        parts = []
        if self.pass_rule is not None:
            parts.append(f"{self.metric} <= {self.pass_rule.strip().removeprefix('<=').strip()}")
        if self.fail_rule is not None:
            lead = "fail" if parts else f"{self.metric} fails"
            parts.append(f"{lead} > {self.fail_rule.strip().removeprefix('>').strip()}")
        return ", ".join(parts)


def parse_rules(c: Checker, value: object, path: str) -> tuple[Rule, ...]:
    """`checks: [{metric, pass, fail}, ...]` -> rules; errors (named by field path) go to `c`."""
    if not isinstance(value, list) or not value:
        c.fail(path, "expected a non-empty list of {metric, pass, fail} rules")
        return ()
    out = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        d = c.mapping(item, p, {"metric", "pass", "fail"})
        if d is None:
            continue
        metric = d.get("metric")
        if metric not in METRICS:
            c.fail(f"{p}.metric", f"expected one of {', '.join(METRICS)}, got {metric!r}")
            continue
        if d.get("pass") is None and d.get("fail") is None:
            c.fail(p, "expected a pass bound, a fail bound, or both")
            continue
        texts: dict[str, str | None] = {}
        for side, op in (("pass", "<="), ("fail", ">")):
            raw = d.get(side)
            texts[side] = None
            if raw is None:
                continue
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                c.fail(f"{p}.{side}", f"expected a bound such as '1%' or '1.2x baseline', got {raw!r}")
                continue
            b = parse_bound(str(raw), metric, op)
            if isinstance(b, str):
                c.fail(f"{p}.{side}", b)
                continue
            texts[side] = str(raw)
        if all(d.get(side) is None or texts[side] is not None for side in ("pass", "fail")):
            out.append(Rule(metric, texts["pass"], texts["fail"]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MetricResult:
    metric: MetricName
    value: float | None  # the canary's, over the window
    baseline: float | None  # the baseline's, over the same window
    pass_at: float | None  # resolved: value <= pass_at passes
    fail_above: float | None  # resolved: value > fail_above fails
    outcome: RuleOutcome
    rule: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Side:
    """What the judge reads of one side of the comparison."""

    requests: int
    error_rate: float | None
    quantiles: tuple[float | None, float | None, float | None]  # p50, p90, p99 (seconds)

    def value(self, metric: MetricName) -> float | None:
        if metric == "error_rate":
            return self.error_rate
        return self.quantiles[("p50", "p90", "p99").index(metric)]


def _show(metric: MetricName, x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:.2f}%" if metric == "error_rate" else f"{x * 1000:.1f}ms"


def judge_rule(rule: Rule, canary: Side, baseline: Side) -> MetricResult:
    m = rule.metric
    value, base = canary.value(m), baseline.value(m)
    pb, fb = rule.bounds()
    relative = (pb is not None and pb.relative) or (fb is not None and fb.relative)

    def out(outcome: RuleOutcome, note: str, p: float | None = None, f: float | None = None) -> MetricResult:
        return MetricResult(m, value, base, p, f, outcome, rule.text, note)

    few = canary.requests < QUANTILE_MIN_SAMPLES or (relative and baseline.requests < QUANTILE_MIN_SAMPLES)
    if m != "error_rate" and few:
        return out("skipped", f"fewer than {QUANTILE_MIN_SAMPLES} requests on a side: {m} not compared")
    if value is None:
        return out("skipped", "no canary requests")
    if relative and base is None:
        return out("skipped", "the baseline had no requests in the window")
    p = None if pb is None else pb.resolve(base)
    f = None if fb is None else fb.resolve(base)
    if m != "error_rate" and relative and base is not None and value - base < LATENCY_NOISE_FLOOR:
        # Within the histogram's resolution of the baseline: no regression, whatever the ratio says.
        return out("pass", f"within {_show(m, LATENCY_NOISE_FLOOR)} of the baseline", p, f)
    if f is not None and value > f:
        return out("fail", f"{m} {_show(m, value)} > {_show(m, f)}", p, f)
    if p is not None and value <= p:
        return out("pass", "", p, f)
    if p is not None and f is not None:
        return out("inconclusive", f"{m} {_show(m, value)} between pass {_show(m, p)} and fail {_show(m, f)}", p, f)
    if p is not None:
        return out("fail", f"{m} {_show(m, value)} > {_show(m, p)}", p, f)
    return out("pass", "", p, f)


def judge(rules: Sequence[Rule], canary: Side, baseline: Side) -> tuple[MetricResult, ...]:
    return tuple(judge_rule(r, canary, baseline) for r in rules)


def combined(results: Sequence[MetricResult]) -> Literal["pass", "fail", "inconclusive"]:
    """fail if any fails; else inconclusive if any is; else pass (also when all were skipped)."""
    outcomes = {r.outcome for r in results}
    if "fail" in outcomes:
        return "fail"
    return "inconclusive" if "inconclusive" in outcomes else "pass"


def describe_results(results: Sequence[MetricResult]) -> str:
    """One clause per rule, for a revision's reason and the CLI."""
    parts = []
    for r in results:
        bound = r.note if r.outcome != "pass" or r.note else f"{r.metric} {_show(r.metric, r.value)} ok"
        base = "" if r.baseline is None else f", baseline {_show(r.metric, r.baseline)}"
        parts.append(f"{r.outcome} {bound} [{r.rule}{base}]")
    return "; ".join(parts)
