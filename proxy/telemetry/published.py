"""The files worker processes publish their statistics in: one JSON file per worker, replaced atomically.

Design rule: only file handling lives here (reading, atomic replacing, retiring, the start-time cutoff);
what the numbers mean and how they are summed is proxy.telemetry.metrics'. A file written before this
process started belongs to an earlier run and is never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A worker file not rewritten for this long belongs to a dead (or hung) worker: its gauges no longer count.
STALE_AFTER = 5.0


def _process_start_time() -> float:
    """Wall-clock start of this process: files older than it were left by an earlier run."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


# One clock tick of slack: /proc's start time is rounded to ticks.
_STARTED = _process_start_time() - 0.05


@dataclass(frozen=True, slots=True)
class Published:
    worker: str
    time: float
    pid: int
    ppid: int
    stats: Mapping[str, Any]
    extra: Mapping[str, Any]
    retired: bool = False  # replaced or restarted by the supervisor: its counters count, it is not "stale"


def read_worker_file(path: Path) -> Published | None:
    try:
        d = json.loads(path.read_bytes())
        return Published(str(d["worker"]), float(d["time"]), int(d["pid"]), int(d["ppid"]), d["stats"],
                         d.get("extra") or {}, bool(d.get("retired", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # vanished between listing and reading, or not ours


def read_published(directory: Path, since: float | None = None) -> Iterator[Published]:
    """Every worker file written after `since` (default: this process's start)."""
    cutoff = _STARTED if since is None else since
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return
    for p in paths:
        pub = read_worker_file(p)
        if pub is not None and pub.time >= cutoff:
            yield pub


def reset_directory(directory: Path) -> None:
    """Create `directory` and remove every worker file in it: the supervisor calls this before it starts
    its workers, so nothing of an earlier run is summed (the start-time check is the second guard)."""
    directory.mkdir(parents=True, exist_ok=True)
    for p in [*directory.glob("*.json"), *directory.glob(".*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def retire_published(directory: Path, worker_id: str) -> None:
    """Mark a worker that is gone for good (replaced, or dead and started again under a new id): its counters
    keep being summed, but it is no longer a live or a stale worker, so the stale-worker alert clears."""
    path = directory / f"{worker_id}.json"
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    doc["retired"] = True
    with contextlib.suppress(OSError):
        replace_file(path, json.dumps(doc, separators=(",", ":")).encode())


def replace_file(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
    os.replace(tmp, path)


def worker_extras(directory: Path | None) -> list[Mapping[str, Any]]:
    """The `extra` dicts of workers that are alive (published within STALE_AFTER)."""
    if directory is None:
        return []
    now = time.time()
    return [p.extra for p in read_published(directory) if now - p.time < STALE_AFTER and not p.retired]
