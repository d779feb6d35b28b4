"""The canary judge's rules (proxy.control.canary.judge): bound syntax, each rule's outcome, and analyse()
with rules; exact numbers, no I/O."""

from __future__ import annotations

import pytest

from proxy.control.canary import Thresholds, Window, analyse, parse_config
from proxy.control.canary.judge import Bound, Rule, Side, combined, judge_rule, parse_bound
from proxy.errors import ValidationError

LIMITS = Thresholds(min_requests=100)


@pytest.mark.parametrize(("text", "metric", "op", "bound"), [
    ("1%", "error_rate", "<=", Bound(False, 0.0, 0.01)),
    ("<= 0.02", "error_rate", "<=", Bound(False, 0.0, 0.02)),
    ("baseline + 0.5%", "error_rate", "<=", Bound(True, 1.0, 0.005)),
    ("> 2x baseline", "error_rate", ">", Bound(True, 2.0, 0.0)),
    ("1.2x baseline", "p99", "<=", Bound(True, 1.2, 0.0)),
    ("250ms", "p99", "<=", Bound(False, 0.0, 0.25)),
    ("0.3s", "p50", "<=", Bound(False, 0.0, 0.3)),
    ("1.5x baseline + 20ms", "p90", "<=", Bound(True, 1.5, 0.02)),
    ("baseline - 5ms", "p99", "<=", Bound(True, 1.0, -0.005)),
])
def test_bounds(text: str, metric: str, op: str, bound: Bound) -> None:
    assert parse_bound(text, metric, op) == bound  # type: ignore[arg-type]


def test_bad_bounds_say_why() -> None:
    assert parse_bound("fast", "p99", "<=") == (
        "expected a bound such as '1%', '250ms', '1.2x baseline' or 'baseline + 0.5%' (optionally after '<='), "
        "got 'fast'")
    assert parse_bound("250ms", "error_rate", "<=") == "error_rate is measured in %, or a plain ratio, got '250ms'"
    assert parse_bound("baseline + 1%", "p99", ">") == (
        "p99 is measured in ms or s, or plain seconds, got 'baseline + 1%'")


def side(requests: int, rate: float | None, p99: float | None = None) -> Side:
    return Side(requests, rate, (None, None, p99))


def test_one_rule_with_both_bounds_passes_fails_or_is_not_sure() -> None:
    rule = Rule("error_rate", "<= baseline + 0.5%", "> baseline + 2%")
    base = side(1000, 0.01)
    ok, between, bad = (judge_rule(rule, side(500, r), base) for r in (0.014, 0.02, 0.031))
    assert (ok.outcome, ok.pass_at, ok.fail_above) == ("pass", pytest.approx(0.015), pytest.approx(0.03))
    assert (between.outcome, between.note) == ("inconclusive", "error_rate 2.00% between pass 1.50% and fail 3.00%")
    assert (bad.outcome, bad.note) == ("fail", "error_rate 3.10% > 3.00%")
    assert ok.rule == "error_rate <= baseline + 0.5%, fail > baseline + 2%"
    assert combined([ok, between]) == "inconclusive"
    assert combined([ok, between, bad]) == "fail"
    assert combined([ok]) == "pass"


def test_one_sided_rules() -> None:
    only_pass = Rule("error_rate", "1%", None)
    assert judge_rule(only_pass, side(500, 0.02), side(0, None)).outcome == "fail"
    assert judge_rule(only_pass, side(500, 0.01), side(0, None)).outcome == "pass"
    only_fail = Rule("p99", None, "> 2x baseline")
    assert judge_rule(only_fail, side(500, 0.0, 0.5), side(500, 0.0, 0.2)).outcome == "fail"
    assert judge_rule(only_fail, side(500, 0.0, 0.39), side(500, 0.0, 0.2)).outcome == "pass"


def test_rules_that_cannot_be_judged_are_skipped() -> None:
    rel = Rule("error_rate", "baseline + 1%", None)
    assert judge_rule(rel, side(500, 0.0), side(0, None)).note == "the baseline had no requests in the window"
    q = Rule("p99", "1.2x baseline", None)
    few = judge_rule(q, side(500, 0.0, 0.5), side(99, 0.0, 0.1))
    assert (few.outcome, few.note) == ("skipped", "fewer than 100 requests on a side: p99 not compared")
    # Within the histogram's resolution of the baseline: 3 ms vs 1 ms is not a regression.
    noise = judge_rule(q, side(500, 0.0, 0.003), side(500, 0.0, 0.001))
    assert (noise.outcome, noise.note) == ("pass", "within 5.0ms of the baseline")


def test_analyse_with_rules_waits_for_the_sample_then_judges() -> None:
    rules = (Rule("error_rate", "baseline + 0.5%", "baseline + 3%"), Rule("p99", "1.2x baseline", "2x baseline"))
    base = Window(1000, 10, 0.1)
    a = analyse(Window(99, 0, 0.1), base, LIMITS, rules=rules)
    assert (a.verdict, a.reason) == ("wait", "99 of 100 requests needed (0/99 errors)")
    a = analyse(Window(200, 4, 0.15), base, LIMITS, rules=rules)
    assert a.verdict == "inconclusive"
    assert [m.outcome for m in a.metrics] == ["inconclusive", "inconclusive"]
    assert a.reason == ("inconclusive error_rate 2.00% between pass 1.50% and fail 4.00% "
                        "[error_rate <= baseline + 0.5%, fail > baseline + 3%, baseline 1.00%]; "
                        "inconclusive p99 150.0ms between pass 120.0ms and fail 200.0ms "
                        "[p99 <= 1.2x baseline, fail > 2x baseline, baseline 100.0ms]")
    assert analyse(Window(200, 2, 0.11), base, LIMITS, rules=rules).verdict == "pass"
    assert analyse(Window(200, 2, 0.25), base, LIMITS, rules=rules).verdict == "fail"


def test_legacy_limits_also_report_per_metric() -> None:
    a = analyse(Window(200, 0, 0.1), Window(1000, 0, 0.1), Thresholds(0.01, 1.5, 100))
    assert a.verdict == "pass"
    assert [(m.metric, m.outcome, m.rule) for m in a.metrics] == [
        ("error_rate", "pass", "error_rate <= 0.01"), ("p99", "pass", "p99 <= 1.5x baseline")]


def test_parse_config_checks_and_their_errors() -> None:
    cfg = parse_config({"to": "v2", "checks": [{"metric": "p99", "pass": "<= 1.2x baseline", "fail": "> 2x baseline"}],
                        "sample_wait": 2}, "web")
    assert (cfg.checks, cfg.sample_wait) == ((Rule("p99", "<= 1.2x baseline", "> 2x baseline"),), 2)
    with pytest.raises(ValidationError) as e:
        parse_config({"to": "v2", "checks": [{"metric": "p95", "pass": "1%"}, {"metric": "p99"},
                                             {"metric": "error_rate", "fail": "2ms"}, {"metric": "p50", "pass": True}],
                      "sample_wait": 0}, "web")
    assert [str(x) for x in e.value.errors] == [
        "checks[0].metric: expected one of error_rate, p50, p90, p99, got 'p95'",
        "checks[1]: expected a pass bound, a fail bound, or both",
        "checks[2].fail: error_rate is measured in %, or a plain ratio, got '2ms'",
        "checks[3].pass: expected a bound such as '1%' or '1.2x baseline', got True",
        "sample_wait: expected a number between 1 and 1000, got 0",
    ]
