"""proxy.telemetry.metrics: snapshots, windows, quantiles and the Prometheus text built from them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.model import Match, Route, State, Version, VersionSpec
from proxy.table import RouteTable
from proxy.telemetry.metrics import (
    StatsSnapshot,
    WorkerPublisher,
    aggregate,
    quantile,
    render,
)
from proxy.telemetry.published import read_published, reset_directory
from proxy.telemetry.stats import HIST_SLOTS, LATENCY_BUCKETS, Stats


def hist(**at: int) -> list[int]:
    """Counts per bucket by upper bound, e.g. hist(b0_01=5) puts 5 in the (0.005, 0.01] bucket."""
    h = [0] * HIST_SLOTS
    for key, n in at.items():
        h[LATENCY_BUCKETS.index(float(key[1:].replace("_", ".")))] += n
    return h


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    h = hist(b0_01=100)  # all in (0.005, 0.01]
    assert quantile(h, 0.5) == pytest.approx(0.0075)
    assert quantile(h, 0.99) == pytest.approx(0.005 + 0.005 * 0.99)
    h2 = hist(b0_001=90, b0_1=10)
    assert quantile(h2, 0.5) == pytest.approx(0.0005 + 0.0005 * (50 / 90))
    assert quantile(h2, 0.99) == pytest.approx(0.05 + 0.05 * (9 / 10))
    assert quantile(hist(b0_0005=4), 0.5) == pytest.approx(0.00025)  # first bucket starts at 0


def test_quantile_edges() -> None:
    assert math.isnan(quantile([0] * HIST_SLOTS, 0.99))
    overflow = [0] * HIST_SLOTS
    overflow[-1] = 3
    assert quantile(overflow, 0.99) == 10.0
    assert quantile(hist(b0_01=1), 1.0) == pytest.approx(0.01)
    assert quantile(hist(b0_01=1)[:-1], 0.5) == pytest.approx(0.0075)  # without the overflow slot too


def snap_of(s: Stats, t: float = 0.0) -> StatsSnapshot:
    snap = aggregate(s, None)
    return StatsSnapshot(**{**{f: getattr(snap, f) for f in StatsSnapshot.__slots__}, "time": t})


def test_version_stats_and_window() -> None:
    s = Stats()
    for _ in range(8):
        s.request("web", "v2", 200, 0.002, 0, 0)
    s.request("web", "v2", 502, 0.002, 0, 0)
    s.request("web", "v2", 503, 0.2, 0, 0)
    s.upstream_error("v2", "reset", route="web")
    older = snap_of(s, 100.0)
    for _ in range(3):
        s.request("web", "v2", 500, 0.02, 0, 0)
    s.request("web", "v2", 200, 0.02, 0, 0)
    s.fallback("web", "v2", "v1")
    s.connection("downstream", 5)
    now = snap_of(s, 105.0)
    total = now.get("web", "v2")
    assert (total.requests, total.errors_5xx, total.upstream_errors) == (14, 5, 1)
    assert total.codes == {200: 9, 502: 1, 503: 1, 500: 3}
    w = now.since(older)
    recent = w.get("web", "v2")
    assert (recent.requests, recent.errors_5xx, recent.upstream_errors, recent.codes) == (4, 3, 0, {500: 3, 200: 1})
    assert recent.error_ratio == 0.75
    assert recent.latency == tuple(hist(b0_025=4))
    assert (w.fallbacks, w.connections) == ({("web", "v2", "v1"): 1}, {"downstream": 5, "upstream": 0})
    assert now.get("web", "nope").requests == 0 and now.get("web", "nope").error_ratio == 0.0
    assert set(now.versions_of("web")) == {"v2"}


def table() -> RouteTable:
    v = {n: Version(n, VersionSpec("static", (f"http://127.0.0.1:{p}",)), (f"http://127.0.0.1:{p}",))
         for n, p in (("v1", 9301), ("v2", 9302))}
    web = Route("web", split=(("v1", 3.0), ("v2", 1.0)), pins={"a": "v2", "b": "v2"}, fallback=("v1",))
    api = Route("api", match=Match(path_prefix="/api"), split=(("v1", 1.0),))
    return RouteTable(State(v, (web, api)), 7)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def test_render_is_valid_prometheus_text_with_exact_values() -> None:
    s = Stats()
    s.request("web", "v1", 200, 0.003, 10, 20)
    s.request("web", "v1", 200, 0.02, 10, 20)
    s.request("web", "v2", 503, 0.3, 1, 2)
    s.upstream_error("v2", "timeout")
    s.fallback("web", "v2", "v1")
    s.retry("web")
    s.reject("no_route")
    s.connection("downstream", 2)
    s.mirror("web", "v2", "error")
    s.canary_step("web", 1)
    s.canary_analysis("web", "fail")
    s.applied, s.apply_errors = 3, 1
    text = render(aggregate(s, None), table(), {"v1": {"http://127.0.0.1:9301": True},
                                                "v2": {"http://127.0.0.1:9302": False}}).decode()
    got = samples(text)

    def v(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert v("turnout_requests_total", route="web", version="v1", code="200") == 2
    assert v("turnout_requests_total", route="web", version="v2", code="503") == 1
    assert v("turnout_request_duration_seconds_bucket", route="web", version="v1", le="0.0025") == 0
    assert v("turnout_request_duration_seconds_bucket", route="web", version="v1", le="0.005") == 1
    assert v("turnout_request_duration_seconds_bucket", route="web", version="v1", le="0.025") == 2
    assert v("turnout_request_duration_seconds_bucket", route="web", version="v1", le="+Inf") == 2
    assert v("turnout_request_duration_seconds_count", route="web", version="v1") == 2
    assert v("turnout_request_duration_seconds_sum", route="web", version="v1") == pytest.approx(0.023)
    assert v("turnout_request_bytes_total", route="web", version="v1", direction="in") == 20
    assert v("turnout_upstream_errors_total", version="v2", kind="timeout") == 1
    assert v("turnout_fallbacks_total", route="web", from_version="v2", to_version="v1") == 1
    assert v("turnout_retries_total", route="web") == 1
    assert v("turnout_requests_rejected_total", reason="no_route") == 1
    assert v("turnout_mirror_requests_total", route="web", version="v2", code="error") == 1
    assert v("turnout_route_weight", route="web", version="v1") == 3
    assert v("turnout_route_weight", route="web", version="v2") == 1
    assert v("turnout_route_weight", route="api", version="v1") == 1
    assert (v("turnout_pins", route="web"), v("turnout_pins", route="api")) == (2, 0)
    assert v("turnout_endpoint_up", version="v1", endpoint="http://127.0.0.1:9301", zone="") == 1
    assert v("turnout_endpoint_up", version="v2", endpoint="http://127.0.0.1:9302", zone="") == 0
    assert (v("turnout_connections", side="downstream"), v("turnout_connections", side="upstream")) == (2, 0)
    assert v("turnout_state_revision") == 7
    assert (v("turnout_state_applied_total"), v("turnout_state_apply_errors_total")) == (3, 1)
    assert v("turnout_canary_step", route="web") == 1
    assert v("turnout_canary_analysis_total", route="web", result="fail") == 1
    assert v("turnout_workers", state="live") == 0
    # web: v1 (healthy) and v2 (down) in its split, v1 its fallback -> 1; api: v1 -> 1.
    assert v("turnout_route_healthy_versions", route="web") == 1
    assert v("turnout_route_healthy_versions", route="api") == 1
    # Every histogram bucket bound is one of LATENCY_BUCKETS, and only those plus +Inf.
    les = {dict(k[1])["le"] for k in got if k[0] == "turnout_request_duration_seconds_bucket"}
    assert les == {repr(b) for b in LATENCY_BUCKETS} | {"+Inf"}


def test_no_series_carries_a_client_id_label() -> None:
    s = Stats()
    s.request("web", "v2", 200, 0.001, 0, 0)
    text = render(aggregate(s, None), table(), {}).decode()
    labels = {name for fam in text_string_to_metric_families(text) for smp in fam.samples for name in smp.labels}
    assert labels == {"route", "version", "code", "le", "direction", "side", "state"}
    assert "turnout_route_healthy_versions" in text
    assert '"a"' not in text and '"b"' not in text  # the pinned clients' ids


def test_publisher_file_roundtrip_and_read_cutoff(tmp_path: Path) -> None:
    s = Stats()
    s.request("web", "v1", 200, 0.001, 0, 0)
    pub = WorkerPublisher(s, tmp_path, "w0", extra=lambda: {"health": {"v1": {"x": True}}})
    pub.publish()
    assert repr(pub) == f"<WorkerPublisher w0 -> {tmp_path / 'w0.json'} [Publishes: 1]>"
    (found,) = read_published(tmp_path)
    assert (found.worker, found.extra) == ("w0", {"health": {"v1": {"x": True}}})
    assert list(read_published(tmp_path, since=found.time + 1)) == []  # an earlier run's file is ignored
    assert [p.name for p in tmp_path.iterdir()] == ["w0.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="plain file name"):
        WorkerPublisher(s, tmp_path, "../x")


def test_route_healthy_versions_counts_unknown_health_as_healthy_and_down_as_down() -> None:
    t = table()
    unknown = samples(render(aggregate(Stats(), None), t, {}).decode())
    assert unknown[("turnout_route_healthy_versions", (("route", "web"),))] == 2
    down = {"v1": {"http://127.0.0.1:9301": False}, "v2": {"http://127.0.0.1:9302": False}}
    got = samples(render(aggregate(Stats(), None), t, down).decode())
    assert got[("turnout_route_healthy_versions", (("route", "web"),))] == 0
    assert got[("turnout_route_healthy_versions", (("route", "api"),))] == 0


def test_reset_directory_removes_worker_files_only(tmp_path: Path) -> None:
    d = tmp_path / "run" / "metrics"
    reset_directory(d)  # creates it
    WorkerPublisher(Stats(), d, "0").publish()
    (d / ".1.99.tmp").write_text("{")
    (d / "keep.txt").write_text("x")
    reset_directory(d)
    assert [p.name for p in d.iterdir()] == ["keep.txt"]
