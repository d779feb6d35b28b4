"""The harness's pure parts: result validation, rendering, percentiles and config templates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import WRK_SCRIPT, percentile, request_bytes
from benchmarks.peers import render
from benchmarks.report import SCHEMA, clean, markdown, validate, write


def _target(rps: float, cpu: float | None) -> dict[str, Any]:
    median: dict[str, Any] = {"rps": rps, "socket_errors": 0, "non_2xx": 0}
    if cpu is not None:
        median |= {"cpu_us": cpu, "cpu_user_us": cpu / 3, "cpu_sys_us": cpu * 2 / 3}
    return {"status": "ok", "median": median, "runs": []}


def good_doc() -> dict[str, Any]:
    lat = {"p50_ms": 0.2, "p99_ms": 0.9, "added_p50_ms": 0.1, "added_p99_ms": 0.3, "achieved_rate": 100.0,
           "rate_reached": True, "non_2xx": 0, "socket_errors": 0}
    mem = {"status": "ok", "idle": {"rss_before_mib": 10.0, "rss_mib": 50.0, "kib_per_connection": 4.0,
                                    "answered": 10_000, "failed": 0},
           "stream": {"rss_before_mib": 10.0, "rss_peak_mib": 12.0, "growth_mib": 2.0, "body_bytes": 104857600}}
    mode = {"status": "ok", "trials": 200, "first_p50_ms": 1.0, "first_p99_ms": 2.0, "all_p50_ms": 1.5,
            "all_p99_ms": 3.0, "admin_call_p50_ms": 1.0}
    doc = {
        "schema": SCHEMA, "date": "2026-11-27T06:00:00Z", "quick": False,
        "machine": {"cpus": 2, "proxy_core": 1, "load_core": 0}, "plan": {},
        "scenarios": {
            "throughput": {"status": "ok", "targets": {"direct": _target(50_000, None),
                                                       "turnout": _target(20_000, 40.0),
                                                       "haproxy": _target(25_000, 30.0),
                                                       "nginx": _target(25_000, 32.0)},
                           "ratios": {"rps": {"turnout/haproxy": 0.8, "turnout/nginx": 0.8},
                                      "cpu_us": {"turnout/haproxy": 1.33, "turnout/nginx": 1.25}}},
            "latency": {"status": "ok", "rate_basis": "turnout", "basis_rps": 20_000.0,
                        "levels": [{"fraction": 0.25, "rate": 5000.0,
                                    "targets": {"direct": {**lat, "added_p50_ms": None},
                                                "turnout": lat, "haproxy": lat, "nginx": lat}}]},
            "pins": {"status": "ok", "configs": {"10": {"pins": 10, "rps": 20_000.0, "cpu_us": 40.0,
                                                        "startup_seconds": 1.0},
                                                 "100000": {"pins": 100_000, "rps": 20_000.0, "cpu_us": 41.0,
                                                            "startup_seconds": 6.0}},
                     "cpu_ratio_large_over_small": 1.025},
            "memory": {"status": "ok", "idle_connections": 10_000,
                       "targets": {"turnout": mem, "haproxy": mem, "nginx": mem}},
            "change_safety": {"status": "ok", "rate": 10_000.0, "seconds": 20, "changes": 1000, "non_2xx": 0,
                              "socket_errors": 0, "passed": True,
                              "admin": {"ok": 1000, "call_p50_ms": 1.0, "call_p99_ms": 4.0},
                              "load": {"sent": 200_000}},
            "rollback": {"status": "ok", "modes": {"1 process": mode, "2 workers": mode,
                                                   "3 replicas (etcd)": {"status": "skipped",
                                                                         "reason": "etcd missing"}}},
        },
    }
    # A JSON round trip unshares the dicts used several times above, so a test can change one of them.
    return json.loads(json.dumps(doc))


def test_a_well_formed_document_has_no_problems() -> None:
    assert validate(good_doc()) == []


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda d: d.update(schema="other/1"), "schema: expected 'turnout-benchmark/1', got 'other/1'"),
    (lambda d: d["scenarios"].pop("pins"), "scenarios.pins: missing"),
    (lambda d: d["scenarios"]["memory"].update(status="skipped"),
     "scenarios.memory.reason: a skipped scenario must say why"),
    (lambda d: d["scenarios"]["throughput"]["targets"]["turnout"]["median"].update(rps=0),
     "scenarios.throughput.targets.turnout.median.rps: expected > 0, got 0"),
    (lambda d: d["scenarios"]["rollback"]["modes"]["1 process"].update(all_p99_ms=None),
     "scenarios.rollback.modes.1 process.all_p99_ms: expected a finite number, got None"),
    (lambda d: d["scenarios"]["latency"]["levels"][0]["targets"]["nginx"].pop("p50_ms"),
     "scenarios.latency.levels[0].targets.nginx.p50_ms: missing"),
    (lambda d: d["scenarios"]["change_safety"].update(passed="yes"),
     "scenarios.change_safety.passed: expected true or false"),
])
def test_each_malformed_part_is_named(mutate: Any, problem: str) -> None:
    doc = good_doc()
    mutate(doc)
    assert validate(doc) == [problem]


def test_nan_becomes_null_so_the_json_is_strict() -> None:
    assert clean({"a": [math.nan, 1.0], "b": {"c": math.inf}}) == {"a": [None, 1.0], "b": {"c": None}}


def test_written_results_are_strict_json_markdown_and_png(tmp_path: Path) -> None:
    doc = good_doc()
    doc["scenarios"]["latency"]["levels"][0]["targets"]["nginx"]["p99_ms"] = math.nan
    paths = write(doc, tmp_path, "run", latest=True)
    assert [p.name for p in paths] == ["run.json", "run.md", "run.png"]
    loaded = json.loads(paths[0].read_text())
    assert loaded["scenarios"]["latency"]["levels"][0]["targets"]["nginx"]["p99_ms"] is None
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "latest.png").read_bytes() == paths[2].read_bytes()
    md = paths[1].read_text()
    assert "| turnout | 20,000 | 40.0 |" in md
    assert "turnout/HAProxy: throughput 0.80x, CPU per request 1.33x" in md
    assert "| 3 replicas (etcd) | skipped: etcd missing |" in md


def test_markdown_shows_the_first_line_of_a_long_reason() -> None:
    doc = good_doc()
    doc["scenarios"]["pins"] = {"status": "failed", "reason": "turnout did not start | x\nTraceback ...\nmore"}
    assert "*failed: turnout did not start / x*" in markdown(doc)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_configs_render_with_every_placeholder_filled() -> None:
    values = {"LISTEN": "127.0.0.1:1", "V1": "127.0.0.1:2", "V2": "127.0.0.1:3", "RUN": "/run/x", "WWW": "/w"}
    for name in ("haproxy.cfg.tmpl", "nginx.conf.tmpl", "backends.conf.tmpl"):
        text = render(name, **values)
        assert "@" not in text.replace('"v1', "").replace('"v2', "")
    backends = render("backends.conf.tmpl", **values)
    assert 'listen 127.0.0.1:2;' in backends and 'return 200 "v1 0123456789\\n";' in backends
    assert "location = /big { root /w; }" in backends
    with pytest.raises(ValueError, match="@RUN@"):
        render("nginx.conf.tmpl", LISTEN="a", V1="b", V2="c")


def test_requests_and_wrk_script_carry_the_client_id() -> None:
    assert request_bytes("c7") == b"GET / HTTP/1.1\r\nHost: bench\r\nX-Client-Id: c7\r\n\r\n"
    script = WRK_SCRIPT % {"n": 100}
    assert '["X-Client-Id"] = "c" .. n' in script and "i = (i + 1) % 100" in script
