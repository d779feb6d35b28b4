"""The Prometheus source: the PromQL it sends and how it reads answers, against a fake Prometheus HTTP API
on loopback that answers from a table of canned query results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from proxy.control.canary import (
    CanaryConfig,
    PrometheusSource,
    Thresholds,
    Window,
    load_rollout,
    parse_prometheus_value,
    prometheus_queries,
)
from tests.control.conftest import World


@dataclass
class FakePrometheus:
    url: str = ""
    answers: dict[str, str] = field(default_factory=dict)  # query -> value ("NaN" allowed); others: empty
    seen: list[str] = field(default_factory=list)


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()

    async def query(request: web.Request) -> web.Response:
        q = request.query.get("query", "")
        fake.seen.append(q)
        if q.startswith("syntax error"):
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "parse error"},
                                     status=400)
        result = [] if q not in fake.answers else [{"metric": {}, "value": [1700000000.0, fake.answers[q]]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def test_queries() -> None:
    q = prometheus_queries("web", ["v1.2", "v1"], 59.6)
    sel = 'route="web",version=~"v1|v1\\\\.2"'
    assert q == {
        "requests": f"(sum(increase(turnout_requests_total{{{sel}}}[60s])) or vector(0)) + "
                    '(sum(increase(turnout_fallbacks_total{route="web",from_version=~"v1|v1\\\\.2"}[60s])) '
                    'or vector(0))',
        "errors": f'(sum(increase(turnout_requests_total{{{sel},code=~"5.."}}[60s])) or vector(0)) + '
                  f'(sum(increase(turnout_grpc_responses_total{{{sel},grpc_status=~"2|4|12|13|14|15"}}[60s])) '
                  'or vector(0)) + '
                  '(sum(increase(turnout_fallbacks_total{route="web",from_version=~"v1|v1\\\\.2"}[60s])) '
                  'or vector(0))',
        "p99": f"histogram_quantile(0.99, sum by (le) (rate(turnout_request_duration_seconds_bucket{{{sel}}}[60s])))",
        "p50": f"histogram_quantile(0.5, sum by (le) (rate(turnout_request_duration_seconds_bucket{{{sel}}}[60s])))",
        "p90": f"histogram_quantile(0.9, sum by (le) (rate(turnout_request_duration_seconds_bucket{{{sel}}}[60s])))",
    }
    # never below one second
    assert prometheus_queries("web", ["v2"], 0.2)["requests"].count("[1s]))") == 2


def test_parse_values() -> None:
    ok = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "42"]}]}}
    assert parse_prometheus_value(ok) == 42.0
    assert parse_prometheus_value({"status": "success", "data": {"resultType": "vector", "result": []}}) is None
    nan = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "NaN"]}]}}
    assert parse_prometheus_value(nan) is None
    assert parse_prometheus_value({"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}}) == 3.0
    with pytest.raises(ValueError, match="prometheus query failed: parse error"):
        parse_prometheus_value({"status": "error", "error": "parse error"})


async def test_window_from_a_fake_prometheus(prom: FakePrometheus) -> None:
    q = prometheus_queries("web", ["v2"], 10)
    prom.answers = {q["requests"]: "250", q["errors"]: "5", q["p99"]: "0.042", q["p50"]: "0.01"}
    w = await PrometheusSource(prom.url).window("web", ["v2"], 10)
    assert w == Window(250, 5, 0.042, 0.01, None)
    assert prom.seen == [q["requests"], q["errors"], q["p99"], q["p50"], q["p90"]]
    # No series at all (a version with no traffic yet): zero requests, no p99.
    assert await PrometheusSource(prom.url).window("web", ["v9"], 10) == Window(0, 0, None)


async def test_rollout_decided_on_prometheus_numbers(world: World, prom: FakePrometheus) -> None:
    cfg = CanaryConfig("web", "v2", (10.0, 100.0), interval=10.0, limits=Thresholds(0.01, 1.5, 100),
                       prometheus=prom.url)
    ctl = world.controller()
    await ctl.start_rollout(cfg, actor="alice")
    canary = prometheus_queries("web", ["v2"], 10)
    base = prometheus_queries("web", ["v1"], 10)
    prom.answers = {canary["requests"]: "400", canary["errors"]: "12", canary["p99"]: "0.02",
                    base["requests"]: "3600", base["errors"]: "0", base["p99"]: "0.02"}
    world.feed("v2", 1000)  # the proxy's own counters say all is well; Prometheus decides
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 100.0, "v2": 0.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "rolled_back"
    assert r.message == ("canary web: rolled back v2 to 0%; analysis failed at 10%: "
                         "error rate 0.0300 (12/400) > max 0.01")


async def test_unreachable_prometheus_neither_steps_nor_rolls_back(world: World) -> None:
    cfg = CanaryConfig("web", "v2", (10.0, 100.0), interval=10.0, limits=Thresholds(0.01, 1.5, 100),
                       prometheus="http://127.0.0.1:9")
    ctl = world.controller()
    await ctl.start_rollout(cfg, actor="alice")
    world.clock.advance(10.0)
    await ctl.tick()
    assert await world.split() == {"v1": 90.0, "v2": 10.0}
    r = await load_rollout(world.store, "web")
    assert r is not None and r.status == "running" and r.message.startswith("cannot measure: ")
