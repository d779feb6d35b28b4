"""`python -m benchmarks.idle --quick --processes 2`: idle connections spread over two processes of each proxy.

Speed and memory are never asserted; what is checked is that the spread happened as the report says: every
connection answered and still held, each held by one of the proxy's serving processes (read from /proc), two
of them sharing the load, and nothing the run started left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_quick import PNG_MAGIC, REPO, _processes_mentioning


@pytest.mark.slow
def test_idle_quick_spreads_connections_over_processes(tmp_path: Path, bench_tools: None) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.idle", "--quick", "--processes", "2", "--out", str(out),
                           "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Proxies and client processes alike name the work folder on their command lines.
    assert _processes_mentioning(str(work)) == []

    (folder,) = out.glob("idle-*-quick")
    doc = json.loads((folder / "idle.json").read_text())
    runs = doc["runs"]
    assert [(r["proxy"], r["connections"], r["processes"]) for r in runs] == [
        ("turnout", 500, 2), ("haproxy", 500, 2), ("nginx", 500, 2)]
    # turnout: supervisor + 2 workers; HAProxy: 2 instances; nginx: master + 2 workers.
    assert [len(r["per_process"]) for r in runs] == [3, 2, 3]
    for r in runs:
        assert (r["answered"], r["held"], r["failed"], r["client_processes"]) == (500, 500, 0, 2), r["proxy"]
        assert r["client_connections_seen"] == 500, r["proxy"]
        serving = [p["client_connections"] for p in r["per_process"] if p["client_connections"] > 0]
        assert len(serving) == 2, (r["proxy"], r["per_process"])
        assert r["max_process_fds"] == max(p["fds"] for p in r["per_process"])
    assert set(doc["summary"]["kib"]) == {"500x2"}
    assert (folder / "idle.png").read_bytes().startswith(PNG_MAGIC)
    md = (folder / "idle.md").read_text()
    assert md.startswith("# Memory per idle keep-alive connection")
    assert "2 HAProxy instances on one port" in md
