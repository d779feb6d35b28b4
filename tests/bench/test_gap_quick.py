"""`python -m benchmarks.gap --quick` and `python -m benchmarks.profile.instructions --quick`: the two
measurements of where turnout's CPU goes run end to end against real proxies and write consistent results.

Speed is never asserted. What is checked: every target answered every request with 200, the counters the
reports divide are there for each target, the callgrind breakdown adds up to the total it reports (the self
costs of one dump sum to that dump's total, so the parts must sum to the per-request figure), and nothing
the runs started is left running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_quick import PNG_MAGIC, REPO, _processes_mentioning


@pytest.mark.slow
def test_gap_quick_measures_each_target(tmp_path: Path, bench_tools: None) -> None:
    targets = ["haproxy", "turnout", "floor", "floor-parse-buffered"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gap", "--quick", "--targets", ",".join(targets),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _processes_mentioning("benchmarks.profile.floor") == []
    (folder,) = tmp_path.glob("gap-*-quick")
    doc = json.loads((folder / "gap.json").read_text())
    assert list(doc["summary"]) == targets
    for name, s in doc["summary"].items():
        assert s["errors"] == 0, name
        assert s["rps"] > 0, name
        assert s["cpu_us"] > 0, name
        assert len(doc["runs"][name]) == 1, name
    assert (folder / "gap.png").read_bytes().startswith(PNG_MAGIC)
    md = (folder / "gap.md").read_text()
    assert md.startswith("# CPU per request, user and kernel")
    assert "turnout/HAProxy: CPU per request" in md


@pytest.mark.slow
def test_instructions_quick_adds_up(tmp_path: Path, bench_tools: None) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        why = "valgrind missing (apt-get install -y valgrind)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    targets = ["floor", "floor-buffered"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile.instructions", "--quick", "--targets",
                           ",".join(targets), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _processes_mentioning("benchmarks.profile.floor") == []
    (folder,) = tmp_path.glob("instructions-*-quick")
    doc = json.loads((folder / "instructions.json").read_text())
    assert [r["target"] for r in doc["results"]] == targets
    for r in doc["results"]:
        assert (r["ok"], r["errors"]) == (500, 0), r["target"]
        assert r["ir_busy"] > r["ir_idle"] > 0, r["target"]
        assert r["ir_per_request"] == pytest.approx((r["ir_busy"] - r["ir_idle"]) / 500, abs=0.1)
        assert sum(r["by_family"].values()) == pytest.approx(r["ir_per_request"], rel=1e-3), r["target"]
        assert r["by_family"]["uvloop + libuv"] > 0, r["target"]
        assert r["by_family"]["CPython (interpreter, objects, allocator)"] > 0, r["target"]
    assert (folder / "instructions.png").read_bytes().startswith(PNG_MAGIC)
    assert (folder / "instructions.md").read_text().startswith("# User-space instructions per request")
