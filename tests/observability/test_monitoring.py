"""deploy/monitoring: every metric the dashboard and the alert rules use exists in a live /metrics output;
the rules file is valid Prometheus rules YAML (and, with promtool, passes `check rules` and its unit tests)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.conftest import Admin, traffic

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RELEASE_DASHBOARD = MONITORING / "grafana-release-dashboard.json"
ALERTS = MONITORING / "alerts.yaml"
# turnout_* metric names; recording-rule names (turnout:...) and label names after `{` are not matched.
METRIC_RE = re.compile(r"(?<![\w:])turnout_[a-z0-9_]+\b")
RECORD_RE = re.compile(r"(?<![\w:])turnout:[a-z0-9_:]+")
DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


async def live_metric_names(admin: Admin) -> set[str]:
    await admin.seed()
    s = admin.ctx.stats
    traffic(s, "web", "v1", 5)
    traffic(s, "web", "v2", 1, status=503)
    s.upstream_error("v2", "reset", route="web")
    s.fallback("web", "v2", "v1")
    s.retry("web")
    s.reject("no_route")
    s.mirror("web", "v3", 200)
    s.identity_rejected("web", "jwt", "expired")
    s.tls_handshake_error("public", "protocol_version")
    s.zone_request("v1", "eu-1a")
    s.grpc_response("web", "v2", 14, "", True)
    s.canary_step("web", 1)
    s.canary_analysis("web", "pass")
    s.canary_step_outcome("web", "inconclusive")
    s.canary_abort("web")
    s.canary_weight("web", "v2", 5.0)
    s.version_check("v2", True)
    s.connection("downstream", 1)
    s.applied += 1
    s.apply_errors += 1
    s.access_log_dropped += 1
    r = await admin.call("GET", "/metrics", token=None)
    assert r.status == 200
    names = set()
    for fam in text_string_to_metric_families(r.body):
        assert fam.samples, f"{fam.name} has no sample"
        names.add(fam.name)
        names.update(smp.name for smp in fam.samples)
    return names


async def test_every_metric_used_by_dashboard_and_alerts_is_exported(admin: Admin) -> None:
    live = await live_metric_names(admin)
    used_dashboard = {m for e in dashboard_exprs() for m in METRIC_RE.findall(e)}
    used_release = {m for e in dashboard_exprs(RELEASE_DASHBOARD) for m in METRIC_RE.findall(e)}
    assert used_release - live == set()
    # The release dashboard: canary vs baseline traffic and latency, the rollout's gauges and the judge.
    assert {"turnout_requests_total", "turnout_request_duration_seconds_bucket", "turnout_canary_weight",
            "turnout_canary_step", "turnout_canary_steps_total", "turnout_canary_aborts_total",
            "turnout_version_check_failed"} <= used_release
    used_alerts = {m for r in rules() for m in METRIC_RE.findall(r["expr"])}
    assert used_dashboard - live == set()
    assert used_alerts - live == set()
    # The dashboard shows the split, rates, errors, latency, fallbacks, health and revisions.
    assert {"turnout_requests_total", "turnout_request_duration_seconds_bucket", "turnout_route_weight",
            "turnout_fallbacks_total", "turnout_endpoint_up", "turnout_state_revision"} <= used_dashboard
    # The error-ratio alert judges a version by the traffic of the others, not by the weights.
    assert {"turnout_requests_total", "turnout_route_healthy_versions",
            "turnout_fallbacks_total", "turnout_state_apply_errors_total",
            "turnout_version_check_failed"} <= used_alerts


def test_rules_file_structure() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    recorded: set[str] = set()
    alerts = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "record" in rule:
                assert set(rule) <= {"record", "expr", "labels"}
                assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["record"])
                recorded.add(rule["record"])
                continue
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert "for" not in rule or DURATION_RE.match(rule["for"])
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert set(rule["annotations"]) == {"summary", "description"}
            alerts.append(rule["alert"])
    used_records = {m for r in rules() for m in RECORD_RE.findall(r["expr"])}
    assert used_records <= recorded
    assert alerts == ["TurnoutVersionErrorRatioAboveBaseline", "TurnoutRouteNoHealthyVersion",
                      "TurnoutFallbacksHappening", "TurnoutStateApplyErrors", "TurnoutWorkerStale",
                      "TurnoutAccessLogDropping", "TurnoutVersionCheckFailed"]


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and all(t["expr"] for t in p["targets"])
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "instance", "route"]


def test_release_dashboard_structure() -> None:
    dash = json.loads(RELEASE_DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] != json.loads(DASHBOARD.read_text())["uid"]
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["expr"] for t in p["targets"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "route", "canary"]
    # One route at a time, and its canary: the version its rollout reports on turnout_canary_weight.
    assert (variables["route"]["multi"], variables["canary"]["multi"]) == (False, False)
    assert variables["canary"]["definition"] == 'label_values(turnout_canary_weight{route="$route"}, version)'
    side_by_side = {p["title"]: [t["legendFormat"] for t in p["targets"]] for p in dash["panels"] if p["type"] != "row"}
    for title in ("Request rate", "5xx ratio", "p50 latency", "p99 latency"):
        assert side_by_side[title] == ["canary $canary", "baseline"]
    assert [a["name"] for a in dash["annotations"]["list"]][1:] == ["State revisions", "Canary steps"]


def test_split_panels_are_per_route() -> None:
    """The split panels stack to 100% of one route each: their row repeats per value of `route`, and each
    series is a share of its route's total, so neither percent-stacks req/s nor adds up three routes."""
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    by_id = {p["id"]: p for p in panels}
    row = by_id[8]
    assert (row["type"], row["title"], row.get("repeat")) == ("row", "Traffic split: $route", "route")
    start = panels.index(row) + 1
    end = next(i for i in range(start, len(panels)) if panels[i]["type"] == "row")
    assert [p["id"] for p in panels[start:end]] == [9, 10]
    route_var = next(v for v in dash["templating"]["list"] if v["name"] == "route")
    assert (route_var["multi"], route_var["includeAll"]) == (True, True)
    sel = 'route=~"$route", instance=~"$instance"'
    exprs = {
        9: (f"sum by (route, version) (rate(turnout_requests_total{{{sel}}}[$__rate_interval]))"
            f" / on (route) group_left sum by (route) (rate(turnout_requests_total{{{sel}}}[$__rate_interval]))"),
        10: (f"max by (route, version) (turnout_route_weight{{{sel}}})"
             f" / on (route) group_left sum by (route) (max by (route, version) (turnout_route_weight{{{sel}}}))"),
    }
    for pid, expr in exprs.items():
        p = by_id[pid]
        d = p["fieldConfig"]["defaults"]
        assert d["custom"]["stacking"] == {"mode": "normal", "group": "A"}
        assert (d["unit"], d["min"], d["max"]) == ("percentunit", 0, 1)
        assert "repeat" not in p
        assert "$route" in p["title"]
        assert [(t["expr"], t["legendFormat"]) for t in p["targets"]] == [(expr, "{{version}}")]
    stacked = [p["id"] for p in panels
               if p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("stacking", {}).get("mode",
                                                                                                     "none") != "none"]
    assert stacked == [9, 10]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (apt-get install -y prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool, "test", "rules", "alerts.test.yaml"], cwd=MONITORING, capture_output=True, check=False,
                          text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


@pytest.mark.parametrize("dashboard", [DASHBOARD, RELEASE_DASHBOARD], ids=["overview", "release"])
def test_promtool_parses_every_dashboard_query(tmp_path: Path, dashboard: Path) -> None:
    tool = promtool()
    exprs = [e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$route", ".*")
             .replace("$instance", ".*").replace("$canary", "v2")
             for e in dashboard_exprs(dashboard) if not e.startswith("label_values(")]
    doc = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                      for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    check = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_promtool_lints_the_live_exposition(admin: Admin) -> None:
    tool = promtool()
    await live_metric_names(admin)  # seeds state and traffic touching every series
    body = (await admin.call("GET", "/metrics", token=None)).body
    proc = await asyncio.create_subprocess_exec(tool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(body.encode()), 60)
    assert (proc.returncode, out, err) == (0, b"", b"")
