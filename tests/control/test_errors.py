"""What a canary counts as an error, from real requests through the real data plane: an upstream failure
counts once (as the 502 the proxy answered, or as the fallback that moved the request away), and only on
its own route, in this proxy's counters and in the PromQL a rollout sends to Prometheus."""

from __future__ import annotations

import asyncio
import re

from prometheus_client.parser import text_string_to_metric_families

from proxy.control.canary import Counters, counters_of, prometheus_queries
from proxy.model import Match
from proxy.telemetry.metrics import aggregate, render
from tests.dataplane.helpers import Client, Upstream, simple_route, start_proxy, table, version

_TERM = re.compile(r"sum\(increase\((\w+)\{([^}]*)\}\[\d+s\]\)\)")
_MATCHER = re.compile(r'(\w+)(=~|=)"((?:[^"\\]|\\.)*)"')


def evaluate(query: str, exposition: str) -> float:
    """A sum of `sum(increase(metric{...}[r]))` terms over counters that started at zero with this process:
    each increase is the counter's value. Enough PromQL to check which series a query selects."""
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(exposition) for s in f.samples]
    total = 0.0
    for name, matchers in _TERM.findall(query):
        wanted = [(k, op, v.replace("\\\\", "\\")) for k, op, v in _MATCHER.findall(matchers)]
        for sname, labels, value in samples:
            if sname == name and all(labels.get(k) == v if op == "=" else re.fullmatch(v, labels.get(k, ""))
                                     for k, op, v in wanted):
                total += value
    return total


async def test_an_upstream_failure_is_one_error_of_its_own_route() -> None:
    v1, v2 = await Upstream(name="v1").start(), await Upstream(name="v2").start()
    routes = [simple_route(("v2", 1.0), name="web"),
              simple_route(("v2", 1.0), name="api", match=Match(path_prefix="/api")),
              simple_route(("v2", 1.0), name="shop", match=Match(path_prefix="/shop"), fallback=("v1",))]
    t = table([version("v1", v1), version("v2", v2)], routes)
    p = await start_proxy(t)
    try:
        for _ in range(100):  # the first active health check passes, then v2 goes away: connects are refused
            if any(r.target == "/healthz" for r in v2.requests):
                break
            await asyncio.sleep(0.01)
        await v2.stop()
        c = await Client.open(p.port)
        statuses = [(await c.get(path)).status for path in ("/", "/api/a", "/api/b", "/shop", "/shop", "/shop")]
        c.close()
        assert statuses == [502, 502, 502, 200, 200, 200]
        snap = aggregate(p.stats, None)
        web, api = counters_of(snap, "web", ["v2"]), counters_of(snap, "api", ["v2"])
        assert (web.requests, web.errors, api.requests, api.errors) == (1, 1, 2, 2)
        # Every request that chose v2 on shop was answered by v1: each is one request and one error of v2, and
        # no error of v1's.
        assert counters_of(snap, "shop", ["v2"]) == Counters(3, 3, (0,) * len(web.latency))
        assert counters_of(snap, "shop", ["v1"]).errors == 0
        text = render(snap, t, p.dp.health_view()).decode()
        assert [evaluate(prometheus_queries(r, ["v2"], 60)["errors"], text) for r in ("web", "api", "shop")] == \
            [1.0, 2.0, 3.0]
        assert [evaluate(prometheus_queries(r, ["v2"], 60)["requests"], text) for r in ("web", "api", "shop")] == \
            [1.0, 2.0, 3.0]
    finally:
        await p.dp.shutdown(0.1)
        await v1.stop()
