"""proxy.telemetry.stats: what the data plane's calls leave in the counters, and the snapshot wire format."""

from __future__ import annotations

import json
from bisect import bisect_left

from proxy.telemetry.stats import HIST_SLOTS, LATENCY_BUCKETS, Stats


def test_request_counts_per_code_sums_and_buckets() -> None:
    s = Stats()
    s.request("web", "v1", 200, 0.0004, 10, 100)
    s.request("web", "v1", 200, 0.0005, 10, 100)  # on a bound: counted in that bucket (le)
    s.request("web", "v1", 503, 0.003, 5, 0)
    s.request("web", "v1", 200, 12.0, 1, 1)  # beyond the last bound: overflow slot
    s.request("web", "v2", 404, 0.05, 0, 7)
    assert s.requests == {("web", "v1", 200): 3, ("web", "v1", 503): 1, ("web", "v2", 404): 1}
    hist = s.latency[("web", "v1")]
    assert len(hist) == HIST_SLOTS == len(LATENCY_BUCKETS) + 1
    assert hist[0] == 2 and hist[LATENCY_BUCKETS.index(0.005)] == 1 and hist[-1] == 1 and sum(hist) == 4
    cell = s.cells["web"]["v1"]
    assert (cell.bytes_in, cell.bytes_out) == (26, 201)
    assert abs(cell.duration_sum - 12.0039) < 1e-9


def test_bucket_slot_is_bisect_left_of_the_bounds() -> None:
    # Stats.request finds the slot with its own scan (compiled, cheaper than calling bisect_left): same slots.
    durations = [0.0, *LATENCY_BUCKETS, *(b * 1.001 for b in LATENCY_BUCKETS), *(b * 0.999 for b in LATENCY_BUCKETS)]
    for d in durations:
        s = Stats()
        s.request("web", "v1", 200, d, 0, 0)
        assert s.latency[("web", "v1")].index(1) == bisect_left(LATENCY_BUCKETS, d), d


def test_other_counters_and_gauges() -> None:
    s = Stats()
    s.upstream_error("v2", "connect")
    s.upstream_error("v2", "timeout", route="web")
    s.fallback("web", "v2", "v1")
    s.fallback("web", "v2", "v1")
    s.retry("web")
    s.reject("too_large")
    s.connection("downstream", 3)
    s.connection("downstream", -1)
    s.mirror("web", "v3", 200)
    s.canary_step("web", 2)
    s.canary_step("web", 3)
    s.canary_analysis("web", "pass")
    s.applied += 2
    s.apply_errors += 1
    assert s.upstream_errors == {("v2", "connect"): 1, ("v2", "timeout"): 1}
    assert s.cells["web"]["v2"].upstream_errors == 1
    assert s.fallbacks == {("web", "v2", "v1"): 2}
    assert (s.retries, s.rejected, s.connections) == ({"web": 1}, {"too_large": 1}, {"downstream": 2, "upstream": 0})
    assert (s.mirrors, s.canary_steps, s.canary_results) == ({("web", "v3", "200"): 1}, {"web": 3},
                                                             {("web", "pass"): 1})
    assert repr(s) == "<Stats [Requests: 0 | Connections: 2 downstream, 0 upstream]>"


def test_snapshot_is_json_and_a_copy() -> None:
    s = Stats()
    s.request("web", "v1", 200, 0.002, 1, 2)
    s.fallback("web", "v2", "v1")
    s.applied = 4
    wire = s.snapshot()
    assert json.loads(json.dumps(wire)) == wire
    assert wire["cells"] == [["web", "v1", {"200": 1}, 0.002, 1, 2, [0, 0, 1] + [0] * (HIST_SLOTS - 3), 0]]
    assert (wire["fallbacks"], wire["applied"]) == ([["web", "v2", "v1", 1]], 4)
    s.request("web", "v1", 200, 0.002, 1, 2)
    assert wire["cells"][0][2] == {"200": 1}  # later increments do not reach an earlier snapshot
