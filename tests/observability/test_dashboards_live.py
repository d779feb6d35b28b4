"""Both Grafana dashboards against a live Prometheus (Debian's `prometheus`) scraping a real turnout: real
upstreams, the real data plane, the admin API's /metrics and a canary rollout in progress. Every query of
every panel, annotation and template variable must run without error; the release dashboard's canary vs
baseline panels must find their series."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.control.test_e2e import TOKEN, Stack, load, stack

__all__ = ["stack"]  # the fixture, shared with tests/control/test_e2e

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARDS = ("grafana-dashboard.json", "grafana-release-dashboard.json")
# Grafana's variables as a user would have them on this proxy; ranges long enough for 2+ scrapes at 1 s.
VARIABLES = {"$__rate_interval": "10s", "$__range": "1m", "$route": "web", "$canary": "v2", "$instance": ".*"}
# The release dashboard's panels that must see data while a canary of v2 runs on `web` with traffic.
MUST_HAVE_DATA = ("Request rate", "5xx ratio", "p50 latency", "p99 latency", "Canary weight and step",
                  "Configured split")


def queries(name: str) -> list[tuple[str, str]]:
    """(where, expression) of every query in a dashboard file."""
    dash = json.loads((MONITORING / name).read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    out += [(f"variable {v['name']!r}", v["definition"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def substitute(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    return expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, target: str) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is missing (apt-get install -y prometheus)")
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "turnout", "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def instant(session: aiohttp.ClientSession, prom: str, expr: str) -> dict[str, Any]:
    if expr.startswith("label_values("):
        # Grafana's label_values(selector, label) is the label values API, not PromQL.
        selector, _, label = expr[len("label_values("):-1].rpartition(",")
        async with session.get(f"{prom}/api/v1/label/{label.strip()}/values",
                               params={"match[]": selector.strip()}) as r:
            return dict(await r.json())
    async with session.get(f"{prom}/api/v1/query", params={"query": expr}) as r:
        return dict(await r.json())


async def scraped(session: aiohttp.ClientSession, prom: str, series: str, samples: int,
                  timeout: float = 30.0) -> None:
    """Until Prometheus holds `samples` scrapes of `series` (rates need several)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            body = await instant(session, prom, f"min(count_over_time({series}[1m]))")
            result = body.get("data", {}).get("result", [])
            if result and float(result[0]["value"][1]) >= samples:
                return
        await asyncio.sleep(0.25)
    raise AssertionError(f"prometheus did not scrape {series} {samples} times within {timeout:g}s")


async def test_every_dashboard_query_runs_against_live_prometheus(stack: Stack, tmp_path: Path) -> None:
    stack.v1.fail_every, stack.v2.fail_every = 10, 7  # both sides answer some 5xx: every ratio has a numerator
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"to": "v2", "steps": [10, 20, 30, 40, 50, 60, 70, 80, 90], "interval": 2.0, "min_requests": 5,
            "max_error_rate": 0.5, "max_p99_ratio": 100}
    admin = stack.admin_url.removeprefix("http://")
    async with prometheus(tmp_path, admin) as prom, aiohttp.ClientSession() as session, load(stack):
        await scraped(session, prom, "turnout_state_revision", 2)
        async with stack.session.post(f"{stack.admin_url}/api/v1/canary/web", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
        # The canary's own series (its requests, 5xx, weight) through several scrapes: rates need two.
        await scraped(session, prom, 'turnout_requests_total{version="v2"}', 3)
        await scraped(session, prom, "turnout_canary_weight", 3)
        results = {}
        for name in DASHBOARDS:
            for where, expr in queries(name):
                results[(name, where, expr)] = await instant(session, prom, substitute(expr))
        async with stack.session.get(f"{stack.admin_url}/api/v1/canary/web", headers=headers) as r:
            rollout = await r.json()
    failed = {k: v for k, v in results.items() if v.get("status") != "success"}
    assert failed == {}
    assert len(results) == sum(len(queries(n)) for n in DASHBOARDS)
    assert rollout["status"] == "running"  # the canary was in progress throughout
    # Queries answer {"result": [...]}; the label values API answers the list itself.
    release = {where: v["data"] if isinstance(v["data"], list) else v["data"]["result"]
               for (name, where, _), v in results.items() if name == "grafana-release-dashboard.json"}
    empty = [t for t in MUST_HAVE_DATA if not release[f"panel {t!r}"]]
    assert empty == []
    assert release["variable 'canary'"] == ["v2"]
    assert release["variable 'route'"] == ["web"]
