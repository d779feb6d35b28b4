"""The pure parts of the canary: histogram quantiles, windows, the verdict, the weights of each step."""

from __future__ import annotations

import json

import pytest

from proxy.control.canary import (
    Analysis,
    CanaryConfig,
    Counters,
    Rollout,
    Thresholds,
    Window,
    analyse,
    describe,
    histogram_quantile,
    parse_config,
    rollback_weights,
    rollout_from_json,
    rollout_to_json,
    step_weights,
)
from proxy.errors import ValidationError
from proxy.telemetry.stats import HIST_SLOTS, LATENCY_BUCKETS

LIMITS = Thresholds(max_error_rate=0.01, max_p99_ratio=1.5, min_requests=100)


def hist(**slots: int) -> tuple[int, ...]:
    """A histogram with counts in the slots named s0..s14 (s7 is (0.05, 0.1])."""
    out = [0] * HIST_SLOTS
    for name, n in slots.items():
        out[int(name[1:])] = n
    return tuple(out)


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 100 requests in (0.05, 0.1]: rank 99 is 99% of the way through that bucket.
    assert histogram_quantile(hist(s7=100), 0.99) == pytest.approx(0.0995)
    # 50 fast (<= 0.5 ms) and 50 in (0.25, 0.5]: the median sits at the top of the first bucket.
    assert histogram_quantile(hist(s0=50, s9=50), 0.5) == pytest.approx(0.0005)
    assert histogram_quantile(hist(s0=50, s9=50), 0.99) == pytest.approx(0.25 + 0.25 * 49 / 50)


def test_quantile_edges() -> None:
    assert histogram_quantile(hist(), 0.99) is None
    assert histogram_quantile(hist(s14=3), 0.99) == LATENCY_BUCKETS[-1]  # overflow slot: the largest bound
    assert histogram_quantile(hist(s0=10), 0.99) == pytest.approx(0.0005 * 0.99)


def test_counters_since_is_the_increase_and_survives_a_reset() -> None:
    before = Counters(100, 2, hist(s3=100))
    now = Counters(150, 5, hist(s3=140, s4=10))
    assert now.since(before) == Counters(50, 3, hist(s3=40, s4=10))
    restarted = Counters(7, 0, hist(s3=7))  # a worker restarted: counters went down
    assert restarted.since(before) == restarted


def test_window_of_counters() -> None:
    w = Window.of(Counters(200, 4, hist(s7=200)))
    assert (w.requests, w.errors) == (200, 4)
    assert w.error_rate == 0.02
    assert w.p99 == pytest.approx(0.0995)
    assert Window(0, 0, None).error_rate is None


def test_too_few_requests_wait() -> None:
    a = analyse(Window(99, 0, 0.01), Window(5000, 0, 0.01), LIMITS)
    assert a.verdict == "wait"
    assert a.reason == "99 of 100 requests needed (0/99 errors)"


def test_too_few_requests_but_already_too_many_errors_fail() -> None:
    # 1% of 100 is 1 error: 2 errors breach the limit whatever the next requests do.
    a = analyse(Window(20, 2, 0.01), Window(5000, 0, 0.01), LIMITS)
    assert a.verdict == "fail"
    assert a.reason == ("2 errors in the first 20 requests already exceed max error rate 0.01 of 100 requests")
    assert analyse(Window(20, 1, 0.01), Window(5000, 0, 0.01), LIMITS).verdict == "wait"


def test_error_rate_breach() -> None:
    a = analyse(Window(200, 3, 0.01), Window(5000, 0, 0.01), LIMITS)
    assert a.verdict == "fail"
    assert a.error_rate == 0.015
    assert a.reason == "error rate 0.0150 (3/200) > max 0.01"


def test_error_rate_at_the_limit_passes() -> None:
    a = analyse(Window(200, 2, 0.010), Window(5000, 0, 0.008), LIMITS)
    assert a.verdict == "pass"
    assert a.p99_ratio == pytest.approx(1.25)
    assert a.reason == "error rate 0.0100 (2/200) <= 0.01; p99 10.0ms = 1.25x baseline 8.0ms <= 1.5x"


def test_latency_breach() -> None:
    a = analyse(Window(200, 0, 0.032), Window(5000, 0, 0.016), LIMITS)
    assert a.verdict == "fail"
    assert a.p99_ratio == 2.0
    assert a.reason == "p99 32.0ms = 2.00x baseline 16.0ms > max 1.5x (error rate 0.0000 (0/200) <= 0.01)"


def test_latency_not_compared_on_few_requests_or_within_the_noise_floor() -> None:
    few = analyse(Window(99, 0, 0.5), Window(5000, 0, 0.01), LIMITS.__class__(0.01, 1.5, 50))
    assert few.verdict == "pass"
    assert few.reason == ("error rate 0.0000 (0/99) <= 0.01; p99 500.0ms vs baseline 10.0ms not compared "
                          "(fewer than 100 requests on a side)")
    tiny = analyse(Window(200, 0, 0.0049), Window(5000, 0, 0.001), LIMITS)
    assert tiny.verdict == "pass"
    assert tiny.reason == ("error rate 0.0000 (0/200) <= 0.01; p99 4.9ms = 4.90x baseline 1.0ms, "
                           "but within 5.0ms of it")
    assert analyse(Window(200, 0, 0.0061), Window(5000, 0, 0.001), LIMITS).verdict == "fail"


def test_no_baseline_traffic_judges_errors_only() -> None:
    a = analyse(Window(200, 0, 0.5), Window(0, 0, None), LIMITS)
    assert a.verdict == "pass"
    assert a.p99_ratio is None
    assert a.reason == "error rate 0.0000 (0/200) <= 0.01; p99 500.0ms (no baseline requests to compare)"


def test_step_weights_keep_the_baselines_proportions() -> None:
    assert step_weights({"v1": 100.0}, "v2", 1) == {"v1": 99.0, "v2": 1.0}
    assert step_weights({"v1": 100.0}, "v2", 100) == {"v1": 0.0, "v2": 100.0}
    # Two baselines 3:1 (total 4): at 25% they share the remaining 75% as 2.25:0.75.
    assert step_weights({"a": 3.0, "b": 1.0}, "c", 25) == {"a": 2.25, "b": 0.75, "c": 1.0}
    assert rollback_weights({"a": 3.0, "b": 1.0}, "c") == {"a": 3.0, "b": 1.0, "c": 0.0}


def test_parse_config_defaults_and_errors() -> None:
    cfg = parse_config({"to": "v2"}, "web")
    assert cfg == CanaryConfig("web", "v2", (1.0, 5.0, 25.0, 50.0, 100.0), 60.0, Thresholds(0.01, 1.5, 200), None)
    with pytest.raises(ValidationError) as e:
        parse_config({"to": "v2", "steps": [5, 1], "interval": 0, "min_requests": 1.5, "speed": 1,
                      "prometheus": "ftp://x"}, "web")
    assert [str(x) for x in e.value.errors] == [
        "speed: unknown field (expected one of: checks, force, interval, max_error_rate, max_p99_ratio, "
        "min_requests, prometheus, sample_wait, steps, to)",
        "steps[1]: steps must increase, got 1 after 5",
        "interval: expected a number between 0.01 and 86400, got 0",
        "min_requests: expected an integer, got a number",
        "prometheus: expected an http(s):// URL of a Prometheus server, got 'ftp://x'",
    ]


def test_rollout_round_trips_through_json_and_describes_itself() -> None:
    a = Analysis("pass", Window(250, 1, 0.012), Window(4000, 3, 0.010), 0.004, 1.2, "fine", 5.0)
    r = Rollout(CanaryConfig("web", "v2", (1.0, 5.0, 25.0, 50.0, 100.0), 0.2, Thresholds(0.01, 1.5, 200)),
                "running", (("v1", 100.0),), 2, (("v1", 75.0), ("v2", 25.0)), "alice", 1.0, 2.0,
                "step 3", a, None)
    text = rollout_to_json(r)
    assert rollout_from_json(text) == r
    assert json.loads(text)["config"]["steps"] == [1.0, 5.0, 25.0, 50.0, 100.0]
    assert describe(r) == (
        "web: v2 vs v1  [#####...............] 25%  step 3/5  running\n"
        "  last analysis: pass  canary 250 req, error rate 0.0040, p99 12.0ms  baseline 4000 req, p99 10.0ms  "
        "p99 ratio 1.20x\n"
        "  step 3")
