"""/metrics of a real `turnout serve --workers 2`: traffic handled by both workers is summed, and the
counts survive a worker's death."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import Turnout, backend, http, wait_until

pytestmark = pytest.mark.slow


def metrics(t: Turnout) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, body = http("GET", t.admin + "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def total(m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_are_summed_and_a_dead_workers_counts_stay(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{p1}"]}}
  v2: {{endpoints: ["http://127.0.0.1:{p2}"]}}
routes:
  - name: web
    split: {{v1: 1, v2: 1}}
    sticky: false
""")
        with Turnout(tmp_path, str(routes), "--workers", "2") as t:
            assert t.proc is not None
            pid = t.proc.pid
            workers = wait_until(lambda: len(children(pid)) == 2 and children(pid))
            # A worker publishes once its data plane listens: then both take connections.
            wait_until(lambda: metrics(t).get(("turnout_workers", frozenset({("state", "live")}))) == 2)
            for i in range(40):
                # A new connection per request: SO_REUSEPORT spreads them over both workers.
                assert http("GET", f"{t.url}/r{i}", headers={"Connection": "close"})[0] == 200
            m = wait_until(lambda: (mm := metrics(t)) and total(mm, "turnout_requests_total") == 40 and mm)
            # Each worker alternates v1, v2 on its own; how connections spread over workers decides the rest.
            per_version = {dict(k[1])["version"]: v for k, v in m.items() if k[0] == "turnout_requests_total"}
            assert set(per_version) == {"v1", "v2"} and abs(per_version["v1"] - per_version["v2"]) <= 2
            assert m[("turnout_route_weight", frozenset({("route", "web"), ("version", "v2")}))] == 1
            assert m[("turnout_state_revision", frozenset())] == 1
            assert total(m, "turnout_request_duration_seconds_count") == 40
            # Health comes from the workers' published views.
            wait_until(lambda: metrics(t).get(("turnout_endpoint_up", frozenset(
                {("version", "v1"), ("endpoint", f"http://127.0.0.1:{p1}"), ("zone", "")}))) == 1)

            # The status page's JSON reads the same sums.
            status, stats = t.api("GET", "/api/v1/stats")
            assert status == 200 and stats["workers"] == {"live": 2, "stale": 0}
            assert sum(v["requests"] for v in stats["routes"][0]["versions"]) == 40

            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda: not alive(workers[0]))
            answered = 0
            for i in range(10):
                try:
                    status = http("GET", f"{t.url}/s{i}", headers={"Connection": "close"})[0]
                except ConnectionResetError:
                    # Seen rarely right after the kill, under load (cause not pinned down). Tolerated here;
                    # the exact total below checks that only answered requests were counted.
                    continue
                assert status == 200
                answered += 1
            assert answered >= 5
            m = wait_until(lambda: (mm := metrics(t)) and total(mm, "turnout_requests_total") == 40 + answered and mm)
            assert total(m, "turnout_request_duration_seconds_count") == 40 + answered
