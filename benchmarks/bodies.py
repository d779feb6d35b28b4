"""Large bodies through the proxy: a 1 GB response and a 1 GB upload, turnout vs HAProxy (#17).

    .venv/bin/python -m benchmarks.bodies [--rounds 2] [--gb 1] [--out DIR] [--quick]

Downloads: curl (on core 0) fetches the backends' 100 MB `/big` (nginx, sendfile, sparse file) ten times on
one keep-alive connection through the proxy: 1,000 MiB. Uploads: curl PUTs a 1 GB sparse file
(`-T`, `Expect:` off) to a tiny Python sink (this module run with `--sink PORT`, on core 0) that reads and
discards the body and answers 200 once it has all of it. The proxy runs under `taskset -c 1`; its CPU =
utime+stime of its process group from /proc before and after; CPU seconds per GB = CPU / (bytes / 1e9);
MB/s = bytes / curl's wall time. turnout: one worker, a catch-all route to v1 and `/upload` to the sink,
`limits.max_body_bytes` raised from its 100 MiB default (`--config`);
HAProxy: the anchor config with `use_backend sink if { path_beg /upload }`. Rounds are interleaved.
`--quick`: one round of 100 MB each way. Writes `bodies-<date>/bodies.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.peers as peers
from benchmarks.load import run_tool
from benchmarks.peers import BIG_FILE_BYTES, Backends, Lab, Target
from benchmarks.procs import (
    Processes,
    cores,
    free_port,
    machine_load,
    pinned,
    raise_nofile,
    require_tools,
    wait_http,
    wait_port,
)
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 2.0  # turnout's CPU per GB <= 2x HAProxy's


# The sink: reads a request head, then exactly Content-Length body bytes, and answers.

class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.left = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        while data:
            if self.left < 0:
                self.buf += data
                head, sep, rest = self.buf.partition(b"\r\n\r\n")
                if not sep:
                    return
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                self.left = int(m.group(1)) if m else 0
                self.buf, data = b"", rest
            take = min(self.left, len(data))
            self.left -= take
            data = data[take:]
            if self.left == 0:
                self.left = -1
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")  # type: ignore[attr-defined]


async def sink(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Sink, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_sink(lab: Lab) -> int:
    port = free_port()
    run = lab.work / "sink"
    run.mkdir()
    proc = lab.procs.start("sink", pinned([sys.executable, "-m", "benchmarks.bodies", "--sink", str(port)],
                                          lab.load_core), run / "stdout.log", cwd=peers.REPO,
                           env=dict(os.environ, PYTHONPATH=str(peers.REPO)))
    wait_port(proc, port, 10.0)
    return port


def start_turnout(lab: Lab, b: Backends, sink_port: int) -> Target:
    run = lab.work / "turnout-bodies"
    run.mkdir()
    doc = {"versions": {"v1": {"endpoints": [f"http://127.0.0.1:{b.v1}"]},
                        "sink": {"endpoints": [f"http://127.0.0.1:{sink_port}"]}},
           "routes": [{"name": "upload", "match": {"path_prefix": "/upload"}, "split": {"sink": 100}},
                      {"name": "down", "match": {"path_prefix": "/"}, "split": {"v1": 100}}]}
    (run / "routes.yaml").write_text(json.dumps(doc))
    # The default body limit is 100 MiB; HAProxy has none. Raised for the upload, the only change.
    (run / "config.yaml").write_text(json.dumps({"limits": {"max_body_bytes": 4 * 10**9}}))
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(run / "config.yaml"),
            "--routes", str(run / "routes.yaml"),
            "--store", f"sqlite:///{run / 'state.db'}", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--workers", "1", "--shutdown-grace", "1", "--state-dir", str(run)]
    env = dict(os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN="bench-bodies", PYTHONPATH=str(peers.REPO))
    proc = lab.procs.start("turnout", pinned(argv, lab.proxy_core), run / "stdout.log", env=env, cwd=peers.REPO)
    wait_http(proc, port, 90.0)
    return Target("turnout", port, proc)


def start_haproxy(lab: Lab, b: Backends, sink_port: int) -> Target:
    run = lab.work / "haproxy-bodies"
    run.mkdir()
    port = free_port()
    text = peers.render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                        V2=f"127.0.0.1:{b.v2}", RUN=str(run))
    text = text.replace("  default_backend be\n", "  use_backend sink if { path_beg /upload }\n  default_backend be\n")
    text += f"backend sink\n  http-reuse always\n  server s1 127.0.0.1:{sink_port}\n"
    (run / "haproxy.cfg").write_text(text)
    proc = lab.procs.start("haproxy", pinned(["haproxy", "-f", str(run / "haproxy.cfg")], lab.proxy_core),
                           run / "stdout.log")
    wait_http(proc, port, 10.0)
    return Target("haproxy", port, proc)


async def curl(argv: list[str], core: int | None, timeout: float) -> tuple[int, float]:
    """(bytes moved, seconds) summed over curl's transfers (-w prints one line per URL)."""
    code, text = await run_tool(pinned(["curl", "-s", "-S", *argv], core), timeout)
    moved = seconds = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\d{3}) (\d+) (\d+) ([\d.]+)$", line.strip())
        if m:
            if m.group(1) != "200":
                raise RuntimeError(f"curl got status {m.group(1)}")
            moved += int(m.group(2)) + int(m.group(3))
            seconds += float(m.group(4))
    if code != 0 or not moved:
        raise RuntimeError(f"curl exited {code}: {text[-300:]}")
    return int(moved), seconds


async def measure(t: Target, kind: str, upload_file: Path, times: int, core: int | None) -> dict[str, float]:
    assert t.proc is not None
    fmt = "%{http_code} %{size_download} %{size_upload} %{time_total}\\n"
    if kind == "download":
        url = f"http://127.0.0.1:{t.port}/big"
        argv = ["-w", fmt, *(["-o", "/dev/null", url] * times)]
    else:
        argv = ["-w", fmt, "-o", "/dev/null", "-H", "Expect:", "-T", str(upload_file),
                f"http://127.0.0.1:{t.port}/upload"]
    before = t.proc.cpu()
    moved, seconds = await curl(argv, core, 600)
    used = t.proc.cpu() - before
    cpu = used.user + used.system
    gb = moved / 1e9
    return {"bytes": moved, "seconds": round(seconds, 3), "mb_per_s": round(moved / 1e6 / seconds, 1),
            "cpu_s": round(cpu, 3), "cpu_s_per_gb": round(cpu / gb, 3), "user_s_per_gb": round(used.user / gb, 3),
            "sys_s_per_gb": round(used.system / gb, 3)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("download", "upload"):
        med[kind] = {}
        for name in ("turnout", "haproxy"):
            rs = sorted((r for r in runs if r["kind"] == kind and r["proxy"] == name), key=lambda r: r["cpu_s_per_gb"])
            if rs:
                mid = rs[len(rs) // 2]
                med[kind][name] = {k: mid[k] for k in ("mb_per_s", "cpu_s_per_gb", "user_s_per_gb", "sys_s_per_gb")}
    ratios = {kind: {"cpu_per_gb": round(m["turnout"]["cpu_s_per_gb"] / m["haproxy"]["cpu_s_per_gb"], 3),
                     "mb_per_s": round(m["turnout"]["mb_per_s"] / m["haproxy"]["mb_per_s"], 3)}
              for kind, m in med.items() if "turnout" in m and "haproxy" in m}
    return {"medians": med, "turnout_over_haproxy": ratios,
            "target": {"cpu_per_gb_max": TARGET,
                       "met": {k: v["cpu_per_gb"] <= TARGET for k, v in ratios.items()}}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [f"# 1 GB bodies through the proxy, turnout vs HAProxy ({doc['date']}{', quick' if doc['quick'] else ''})",
             "", f"Command: `{doc['command']}`. Compiled data plane: {doc['machine']['compiled_dataplane']}. "
             f"Machine load at start {doc['load_start']}, at end {doc['load_end']}.", "",
             "| direction | proxy | MB/s | CPU s per GB (user+sys) |", "|---|---|---:|---:|"]
    for kind, m in s["medians"].items():
        for name, v in m.items():
            lines.append(f"| {kind} | {name} | {v['mb_per_s']:.0f} | {v['cpu_s_per_gb']:.2f} "
                         f"({v['user_s_per_gb']:.2f}+{v['sys_s_per_gb']:.2f}) |")
    for kind, r in s["turnout_over_haproxy"].items():
        lines.append(f"\n{kind}: turnout/HAProxy CPU per GB **{r['cpu_per_gb']:.2f}x** (target <= {TARGET}x: "
                     f"{'met' if s['target']['met'][kind] else 'NOT met'}), MB/s {r['mb_per_s']:.2f}x")
    lines += ["", "| round | direction | proxy | bytes | s | MB/s | CPU s/GB |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        lines.append(f"| {r['round']} | {r['kind']} | {r['proxy']} | {r['bytes']:,} | {r['seconds']:.2f} | "
                     f"{r['mb_per_s']:.0f} | {r['cpu_s_per_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = doc["summary"]["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "cpu_s_per_gb", "CPU seconds per GB"), (axes[1], "mb_per_s", "MB/s")):
        labels, vals, colors = [], [], []
        for kind in med:
            for name in med[kind]:
                labels.append(f"{kind}\n{name}")
                vals.append(med[kind][name][key])
                colors.append("#2a7ab0" if name == "turnout" else "#999999")
        ax.bar(labels, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}" if v < 100 else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"1 GB bodies, {doc['date']} (load {doc['load_start'][0]} -> {doc['load_end'][0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gb", type=float, default=1.0, help="upload size; downloads are 100 MB times 10*gb")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sink", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink is not None:
        await sink(args.sink)
        return
    if args.quick:
        args.rounds, args.gb = 1, 0.1
    require_tools("curl", "haproxy", "nginx", "taskset")
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-bodies-"))
    runs: list[dict[str, Any]] = []
    upload = work / "upload.bin"
    upload.touch()
    os.truncate(upload, int(args.gb * 1e9))  # sparse: reads as zeros, costs no disk
    times = max(1, round(args.gb * 1e9 / BIG_FILE_BYTES))
    started = time.monotonic()
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        sink_port = start_sink(lab)
        targets = [start_turnout(lab, b, sink_port), start_haproxy(lab, b, sink_port)]
        for r in range(args.rounds):
            for kind in ("download", "upload"):
                for t in targets if r % 2 == 0 else targets[::-1]:
                    m = await measure(t, kind, upload, times, load_core)
                    runs.append({"round": r, "kind": kind, "proxy": t.name, **m})
                    print(f"round {r} {kind:8s} {t.name:8s} {m['bytes'] / 1e6:8.0f} MB {m['mb_per_s']:7.0f} MB/s "
                          f"cpu {m['cpu_s_per_gb']:.2f} s/GB (user {m['user_s_per_gb']:.2f} "
                          f"sys {m['sys_s_per_gb']:.2f})", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-bodies/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.bodies", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "compiled_dataplane": compiled()},
           "plan": {"rounds": args.rounds, "upload_bytes": int(args.gb * 1e9), "downloads": times,
                    "download_bytes_each": BIG_FILE_BYTES},
           "load_start": load_start, "load_end": load_end, "summary": summarize(runs), "runs": runs,
           "total_seconds": round(time.monotonic() - started, 1)}
    folder = args.out / f"bodies-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bodies.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "bodies.md").write_text(markdown(doc))
    chart(doc, folder / "bodies.png")
    print(markdown(doc))
    print(f"wrote {folder}/bodies.json, .md, .png")


if __name__ == "__main__":
    asyncio.run(main())
