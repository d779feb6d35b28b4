"""`python -m benchmarks --quick` end to end: it runs, stops what it started, and writes well-formed results.

Speed is never asserted here; the numbers only have to be well formed (finite, positive where they count
something), and every scenario either ran or says why not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import SCENARIO_NAMES, validate

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def _failures(node: object, path: str) -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}: {node.get('reason')}"] if node.get("status") == "failed" else []
        for key, value in node.items():
            found += _failures(value, f"{path}.{key}")
        return found
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _failures(v, f"{path}[{i}]")]
    return []


@pytest.mark.slow
def test_quick_run_writes_well_formed_results(tmp_path: Path, bench_tools: None) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Everything the harness started is gone (their command lines name files in the work folder).
    assert _processes_mentioning(str(work)) == []

    jsons = sorted(out.glob("*-quick.json"))
    assert len(jsons) == 1
    stem = jsons[0].with_suffix("")
    doc = json.loads(jsons[0].read_text())
    assert validate(doc) == []
    assert doc["quick"] is True
    assert set(doc["scenarios"]) == set(SCENARIO_NAMES)
    statuses = {name: s["status"] for name, s in doc["scenarios"].items()}
    # Nothing failed anywhere: no scenario, no target within one, no rollback mode.
    assert _failures(doc["scenarios"], "scenarios") == []
    # The peers always run where the tools are installed; only turnout-only scenarios may be skipped.
    assert statuses["throughput"] == statuses["latency"] == statuses["memory"] == "ok"
    thr = doc["scenarios"]["throughput"]["targets"]
    assert {"direct", "haproxy", "nginx"} <= {n for n, t in thr.items() if t["status"] == "ok"}

    png = stem.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("# turnout benchmark")
    assert "| haproxy |" in md and "| nginx |" in md
    # A quick run never replaces the full run's `latest.*` that the README shows.
    assert not (out / "latest.png").exists()
