"""Canary analysis: the numbers of a canary and its baseline over one window, and the verdict on them.

Design rule: the decision is a pure function (`analyse`) of two windows of numbers (canary, baseline) over
the requests since the last step, and the thresholds. Nothing here does I/O; the controller
(proxy.control.canary.controller) gathers the numbers and applies the verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.control.canary.judge import MetricResult, Rule, Side, combined, describe_results, judge
from proxy.telemetry.metrics import StatsSnapshot
from proxy.telemetry.stats import HIST_SLOTS, LATENCY_BUCKETS

# wait: the step's sample is still short and the window keeps growing (not an outcome); inconclusive: the
# step ended and the judge is not sure (too few requests after sample_wait intervals, or a metric between
# its pass and fail bounds), so the rollout pauses.
Verdict = Literal["pass", "fail", "wait", "inconclusive"]


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters of one or more versions on a route, as the proxy counts them."""

    requests: int = 0
    errors: int = 0  # 5xx responses + gRPC error statuses + requests moved away down the fallback chain
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
    p50: float | None = None
    p90: float | None = None

    @classmethod
    def of(cls, c: Counters) -> Window:
        return cls(c.requests, c.errors, histogram_quantile(c.latency, 0.99), histogram_quantile(c.latency, 0.5),
                   histogram_quantile(c.latency, 0.9))

    @property
    def side(self) -> Side:
        return Side(self.requests, self.error_rate, (self.p50, self.p90, self.p99))

    @property
    def error_rate(self) -> float | None:
        return None if self.requests == 0 else min(1.0, self.errors / self.requests)


@dataclass(frozen=True, slots=True)
class Thresholds:
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
    step: int = 0  # index of the step judged (set by the controller)
    percent: float = 0.0  # the canary's share during that step
    metrics: tuple[MetricResult, ...] = ()  # one per rule, in the rules' order


def legacy_rules(limits: Thresholds) -> tuple[Rule, ...]:
    """The rules today's flat thresholds mean, to show per metric what `analyse` decided on them."""
    return (Rule("error_rate", f"{limits.max_error_rate:g}", None),
            Rule("p99", f"{limits.max_p99_ratio:g}x baseline", None))


# Fewer requests than this on either side and "p99" is the single slowest request: not compared.
P99_MIN_SAMPLES = 100
# A p99 regression must also be at least this large in absolute terms: below 10 ms the histogram's buckets
# are 0.5-5 ms wide, so a 1 ms -> 2 ms "doubling" is quantisation and scheduling noise, not a slower release.
P99_NOISE_FLOOR = 0.005


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}ms"


def analyse(canary: Window, baseline: Window, limits: Thresholds, now: float = 0.0,
            rules: Sequence[Rule] = ()) -> Analysis:
    """Compare the canary with its baseline over the same window. Pure; the verdict's reason has the numbers.

    With `rules` (a rollout's `checks`) the judge decides (proxy.control.canary.judge): fewer than
    min_requests canary requests wait; else any rule failing fails, any rule inconclusive (between its pass
    and fail bounds) is inconclusive, otherwise pass. Without rules, the flat thresholds decide:

    - fewer than min_requests canary requests: wait, unless the errors already seen exceed what
      max_error_rate allows over min_requests (then the rate can only end up breached: fail now);
    - canary error rate above max_error_rate: fail;
    - canary p99 above max_p99_ratio times the baseline's p99: fail. Only when both sides had at least
      P99_MIN_SAMPLES requests: the p99 of fewer is just their slowest request, and one scheduler hiccup
      would roll back a healthy version. Nor when the difference is under P99_NOISE_FLOOR;
    - otherwise pass.
    """
    if rules:
        return _judged(canary, baseline, limits, now, rules)
    metrics = judge(legacy_rules(limits), canary.side, baseline.side)
    rate = canary.error_rate
    ratio = None
    if canary.p99 is not None and baseline.p99:
        ratio = canary.p99 / baseline.p99
    few = min(canary.requests, baseline.requests) < P99_MIN_SAMPLES

    def result(verdict: Verdict, reason: str) -> Analysis:
        return Analysis(verdict, canary, baseline, rate, ratio, reason, now, metrics=metrics)

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


def _judged(canary: Window, baseline: Window, limits: Thresholds, now: float, rules: Sequence[Rule]) -> Analysis:
    rate = canary.error_rate
    ratio = canary.p99 / baseline.p99 if canary.p99 is not None and baseline.p99 else None
    metrics = judge(rules, canary.side, baseline.side)
    if canary.requests < limits.min_requests:
        reason = (f"{canary.requests} of {limits.min_requests} requests needed "
                  f"({canary.errors}/{canary.requests} errors)")
        return Analysis("wait", canary, baseline, rate, ratio, reason, now, metrics=metrics)
    verdict: Verdict = combined(metrics)
    return Analysis(verdict, canary, baseline, rate, ratio, describe_results(metrics), now,
                    metrics=metrics)


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


# This proxy's own counters; a rollout with --prometheus reads proxy.control.canary.prometheus instead.

def counters_of(snap: StatsSnapshot, route: str, versions: Iterable[str]) -> Counters:
    """Sum of the versions' counters on `route`, over every worker (proxy.telemetry.metrics.aggregate).

    An error is a request that failed on the version once: a 5xx answer (the upstream's, or the 502/504 the
    proxy answers when the upstream failed), a gRPC response with an error grpc-status (HTTP 200), or a
    request that chose the version but was moved down the fallback chain (failed connect, no healthy
    endpoint), answered by another version. Such a moved request
    is one of the version's requests too, so the error rate stays a share of what chose the version. The
    per-attempt upstream error counter is not added: its failures already are one of those two.
    """
    names = set(versions)
    requests = errors = 0
    latency = [0] * HIST_SLOTS
    for v in names:
        cell = snap.get(route, v)
        requests += cell.requests
        errors += cell.errors_5xx + cell.grpc_errors
        for i, n in enumerate(cell.latency):
            latency[i] += n
    moved = sum(n for (r, source, _), n in snap.fallbacks.items() if r == route and source in names)
    return Counters(requests + moved, errors + moved, tuple(latency))
