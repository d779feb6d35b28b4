"""The observability endpoints inside the real admin app: /metrics, /api/v1/stats, /ui."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.observe import Sampler
from proxy.settings import Settings
from proxy.telemetry.metrics import WorkerPublisher, aggregate
from proxy.telemetry.stats import Stats
from tests.observability.conftest import EP, Admin, start_admin, traffic


def values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_is_public_and_reflects_state_health_and_traffic(admin: Admin) -> None:
    await admin.seed()
    traffic(admin.ctx.stats, "web", "v1", 9)
    traffic(admin.ctx.stats, "web", "v2", 1, status=503)
    r = await admin.call("GET", "/metrics", token=None)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    v = values(r.body)
    assert v[("turnout_state_revision", frozenset())] == 6
    assert v[("turnout_requests_total", frozenset({("route", "web"), ("version", "v1"), ("code", "200")}))] == 9
    assert v[("turnout_requests_total", frozenset({("route", "web"), ("version", "v2"), ("code", "503")}))] == 1
    assert v[("turnout_route_weight", frozenset({("route", "web"), ("version", "v2")}))] == 10
    assert v[("turnout_pins", frozenset({("route", "web")}))] == 1
    assert v[("turnout_endpoint_up", frozenset({("version", "v2"), ("endpoint", EP["v2"]), ("zone", "")}))] == 0
    assert v[("turnout_state_applied_total", frozenset())] == 6  # every revision installed by the watcher


async def test_metrics_needs_the_token_when_configured(tmp_path: Path) -> None:
    runner, adm, session, store = await start_admin(tmp_path, Settings(metrics_auth=True))
    try:
        assert (await adm.call("GET", "/metrics", token=None)).status == 401
        assert (await adm.call("GET", "/metrics")).status == 200
    finally:
        await session.close()
        await runner.cleanup()
        await store.close()


async def test_metrics_sum_published_workers(tmp_path: Path) -> None:
    wdir = tmp_path / "metrics"
    w = Stats()
    traffic(w, "web", "v1", 4)
    WorkerPublisher(w, wdir, "0").publish()
    runner, adm, session, store = await start_admin(tmp_path, Settings(), metrics_dir=wdir)
    try:
        traffic(adm.ctx.stats, "web", "v1", 1)
        v = values((await adm.call("GET", "/metrics", token=None)).body)
        assert v[("turnout_requests_total", frozenset({("route", "web"), ("version", "v1"), ("code", "200")}))] == 5
        assert v[("turnout_workers", frozenset({("state", "live")}))] == 1
    finally:
        await session.close()
        await runner.cleanup()
        await store.close()


async def test_ui_page_is_public_and_self_contained(admin: Admin) -> None:
    r = await admin.call("GET", "/ui", token=None)
    assert (r.status, r.headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "<title>turnout · status</title>" in r.body
    # No external script, style or image; links only to the page's own views (#name).
    assert "src=" not in r.body
    assert re.findall(r'href="([^#][^"]*)"', r.body) == []


async def test_stats_needs_the_token(admin: Admin) -> None:
    assert (await admin.call("GET", "/api/v1/stats", token=None)).status == 401


async def test_stats_shape_before_any_rate(admin: Admin) -> None:
    await admin.seed()
    traffic(admin.ctx.stats, "web", "v1", 3)
    r = await admin.call("GET", "/api/v1/stats")
    assert r.status == 200
    body = r.body
    assert (body["revision"], body["window"], body["workers"]) == (6, None, {"live": 0, "stale": 0})
    assert [(v["name"], v["color"], v["endpoints"], v["healthy"]) for v in body["versions"]] == [
        ("v1", 0, 1, 1), ("v2", 1, 1, 0), ("v3", 2, 1, 1)]
    web, api = body["routes"]
    assert (web["name"], web["pins"], web["fallback"], web["sticky"], web["rps"]) == ("web", 1, ["v1"], True, None)
    assert [(v["name"], v["share"], v["pinned"], v["requests"], v["rps"]) for v in web["versions"]] == [
        ("v1", 0.9, 0, 3, None), ("v2", 0.1, 0, 0, None), ("v3", 0.0, 1, 0, None)]
    assert (api["name"], api["path_prefix"], [v["name"] for v in api["versions"]]) == ("api", "/api", ["v1"])


async def test_stats_rates_error_ratio_and_p99_over_the_window(admin: Admin) -> None:
    await admin.seed()
    observe = admin.observe()
    before = observe.snapshot()
    observe.sampler.samples.append(dataclasses.replace(before, time=time.time() - 5.0))
    traffic(admin.ctx.stats, "web", "v1", 99, duration=0.003)
    traffic(admin.ctx.stats, "web", "v1", 1, status=502, duration=0.3)
    traffic(admin.ctx.stats, "web", "v2", 10, duration=0.04)
    body = (await admin.call("GET", "/api/v1/stats")).body
    assert body["window"] == pytest.approx(5.0, abs=0.5)
    web = body["routes"][0]
    v1, v2, v3 = web["versions"]
    assert v1["rps"] == pytest.approx(100 / body["window"], rel=0.01)
    assert web["rps"] == pytest.approx(110 / body["window"], rel=0.01)
    assert (v1["error_ratio"], v2["error_ratio"], v3["error_ratio"]) == (0.01, 0.0, None)
    assert v1["p99"] == pytest.approx(0.0025 + 0.0025 * 99 / 99)  # rank 99 of 100 ends the (2.5ms, 5ms] bucket
    assert v2["p99"] == pytest.approx(0.025 + 0.025 * 0.99)
    assert v3["p99"] is None


def test_sampler_picks_the_newest_sample_at_least_a_window_old() -> None:
    base = aggregate(Stats(), None)
    s = Sampler(window=5.0)
    assert s.add(dataclasses.replace(base, time=100.0)) is None
    assert s.add(dataclasses.replace(base, time=100.2)) is None  # too short an interval for a rate
    assert s.add(dataclasses.replace(base, time=101.0)).time == 100.0  # type: ignore[union-attr]
    picked = s.add(dataclasses.replace(base, time=106.5))
    assert picked is not None and picked.time == 101.0
    s.add(dataclasses.replace(base, time=200.0))  # the old ones age out
    assert [x.time for x in s.samples] == [200.0]
