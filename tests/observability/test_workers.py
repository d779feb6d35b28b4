"""Counters summed across real worker processes stay monotonic through a worker's death and restart."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

import proxy.telemetry.metrics
import proxy.telemetry.published
from proxy.telemetry.metrics import aggregate
from proxy.telemetry.published import worker_extras
from proxy.telemetry.stats import Stats

SCRIPT = Path(__file__).with_name("worker_script.py")


async def spawn(directory: Path, worker_id: str, n: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(SCRIPT), str(directory), worker_id, str(n),
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line == b"ready\n"
    return proc


def requests(directory: Path, local: Stats) -> int:
    return aggregate(local, directory).get("web", "v1").requests


async def test_worker_death_and_restart_keep_counters_monotonic(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    local = Stats()
    local.request("web", "v1", 200, 0.002, 0, 0)  # the supervisor's own share
    procs = []
    try:
        procs.append(w0 := await spawn(tmp_path, "0", 5))
        procs.append(w1 := await spawn(tmp_path, "1", 7))
        snap = aggregate(local, tmp_path)
        assert (snap.get("web", "v1").requests, snap.workers, snap.connections["downstream"]) == (13, ("0", "1"), 4)
        assert sorted(e["worker"] for e in worker_extras(tmp_path)) == ["0", "1"]

        w1.kill()  # no chance to publish again: its last file must keep counting
        await w1.wait()
        assert requests(tmp_path, local) == 13
        # As if the dead worker's file were old now (summing and the live-worker view both read the bound).
        monkeypatch.setattr(proxy.telemetry.metrics, "STALE_AFTER", 0.0)
        monkeypatch.setattr(proxy.telemetry.published, "STALE_AFTER", 0.0)
        snap = aggregate(local, tmp_path)
        got = (snap.get("web", "v1").requests, snap.connections["downstream"], snap.stale_workers)
        assert got == (13, 0, ("0", "1"))
        assert worker_extras(tmp_path) == []
        monkeypatch.undo()

        procs.append(w1b := await spawn(tmp_path, "1", 3))  # same slot, same supervisor: continues from 7
        snap = aggregate(local, tmp_path)
        assert (snap.get("web", "v1").requests, snap.connections["downstream"]) == (16, 4)
        assert json.loads((tmp_path / "1.json").read_text())["pid"] == w1b.pid

        w0.send_signal(signal.SIGTERM)  # one more request, then the final publish on the way out
        assert await asyncio.wait_for(w0.wait(), 20) == 0
        assert requests(tmp_path, local) == 17
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
