"""Workers: turnout `--workers 1` and `--workers 2` vs HAProxy `nbthread 1` and `nbthread 2` (#17).

    .venv/bin/python -m benchmarks.workers [--rounds 3] [--seconds 5] [--out DIR] [--quick]

The machine has 2 cores and the load generator (wrk) and the nginx backends need one of them, so the
2-worker runs are not pinned (they share both cores with wrk): their throughput says little about scaling.
What carries to N cores is the model this script measures: CPU per request of each process of the group
(turnout: the supervisor, which also aggregates and publishes metrics, and each worker), so per-worker
throughput on a core of its own = 1 / (worker CPU per request), and the share of CPU spent outside the
data plane (the supervisor's) bounds the scaling from the other side. `wrk -t1 -c64`, the benchmark route
(sticky 90/10, 10,000 pins, metrics on). Writes `workers-<date>/workers.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.load import run_wrk
from benchmarks.peers import Backends, Lab, Target, render
from benchmarks.procs import (
    CLK_TCK,
    Processes,
    _group_pids,
    _stat_fields,
    cores,
    free_port,
    machine_load,
    pinned,
    raise_nofile,
    require_tools,
    wait_http,
)
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"


def per_process(pgid: int) -> dict[int, float]:
    out = {}
    for pid in _group_pids(pgid):
        f = _stat_fields(pid)
        if f is not None:
            out[pid] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def start_haproxy(lab: Lab, b: Backends, threads: int) -> Target:
    t = lab.start_haproxy(b) if threads == 1 else None
    if t is not None:
        t.name = "haproxy-1"
        return t
    run = lab.work / f"haproxy-nbthread{threads}"
    run.mkdir()
    port = free_port()
    text = render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}", V2=f"127.0.0.1:{b.v2}",
                  RUN=str(run)).replace("nbthread 1", f"nbthread {threads}")
    (run / "haproxy.cfg").write_text(text)
    proc = lab.procs.start(f"haproxy-{threads}", pinned(["haproxy", "-f", str(run / "haproxy.cfg")], None),
                           run / "stdout.log")
    wait_http(proc, port, 10.0)
    return Target(f"haproxy-{threads}", port, proc)


async def measure(t: Target, seconds: float, work: Path, core: int | None) -> dict[str, Any]:
    assert t.proc is not None
    before = per_process(t.proc.pgid)
    w = await run_wrk(t.port, seconds, work, core, connections=64)
    after = per_process(t.proc.pgid)
    n = max(w.requests, 1)
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    total = sum(used.values())
    leader = used.get(t.proc.pgid, 0.0)
    others = [v for pid, v in sorted(used.items()) if pid != t.proc.pgid]
    return {"rps": round(w.rps, 1), "requests": w.requests, "cpu_us": round(total / n * 1e6, 3),
            "leader_cpu_us": round(leader / n * 1e6, 3), "children_cpu_us": [round(v / n * 1e6, 3) for v in others],
            "leader_share": round(leader / total, 4) if total else 0.0, "non_2xx": w.non_2xx,
            "socket_errors": w.socket_errors}


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = doc["medians"]
    names = list(med)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = ["#2a7ab0" if n.startswith("turnout") else "#999999" for n in names]
    for ax, key, title in ((axes[0], "rps", "req/s (wrk -c64; 2-worker runs share cores with wrk)"),
                           (axes[1], "cpu_us", "CPU µs per request (hatched: supervisor)")):
        vals = [med[n][key] for n in names]
        ax.bar(names, vals, color=colors)
        if key == "cpu_us":
            ax.bar(names, [med[n]["leader_cpu_us"] if n == "turnout-2" else 0 for n in names], color="none",
                   hatch="///", edgecolor="black")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"Workers, {doc['date']} (load {doc['load_start'][0]} -> {doc['load_end'][0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", type=Path, default=None, help="redraw the PNG of a workers.json")
    args = ap.parse_args()
    if args.render is not None:
        chart(json.loads(args.render.read_text()), args.render.with_suffix(".png"))
        return
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    require_tools("wrk", "haproxy", "nginx", "taskset")
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-workers-"))
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        t1 = lab.start_turnout(b, name="turnout-1")
        t2 = lab.start_turnout(b, name="turnout-2", workers=2, pin_core=False)
        targets = [t1, t2, start_haproxy(lab, b, 1), start_haproxy(lab, b, 2)]
        for t in targets:
            await run_wrk(t.port, 1, work, None, connections=64)
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                # wrk shares the cores with the unpinned 2-worker proxies; pinned with the 1-worker ones.
                m = await measure(t, args.seconds, work, load_core if t in (t1, targets[2]) else None)
                runs.append({"round": r, "proxy": t.name, **m})
                print(f"round {r} {t.name:10s} {m['rps']:8.0f} req/s  cpu {m['cpu_us']:6.1f} us/req  leader "
                      f"{m['leader_cpu_us']:5.2f} us/req ({m['leader_share']:.1%})  children {m['children_cpu_us']}",
                      flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    med: dict[str, dict[str, float]] = {}
    for name in sorted({r["proxy"] for r in runs}):
        rs = [r for r in runs if r["proxy"] == name]
        med[name] = {k: round(statistics.median(r[k] for r in rs), 4)
                     for k in ("rps", "cpu_us", "leader_cpu_us", "leader_share")}
    tw = {n: med[n] for n in med if n.startswith("turnout")}
    # turnout: the leader is the supervisor; per worker on its own core: 1e6 / worker CPU per request.
    model = {"turnout_worker_cpu_us": round(med["turnout-2"]["cpu_us"] - med["turnout-2"]["leader_cpu_us"], 3),
             "turnout_supervisor_share": med["turnout-2"]["leader_share"]}
    model["per_worker_rps_on_own_core"] = round(1e6 / model["turnout_worker_cpu_us"], 0)
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-workers/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.workers", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "compiled_dataplane": compiled()},
           "plan": {"rounds": args.rounds, "seconds": args.seconds, "connections": 64},
           "load_start": load_start, "load_end": load_end, "medians": med, "turnout": tw, "model": model,
           "scaling_rps_2_over_1": {"turnout": round(med["turnout-2"]["rps"] / med["turnout-1"]["rps"], 3),
                                    "haproxy": round(med["haproxy-2"]["rps"] / med["haproxy-1"]["rps"], 3)},
           "runs": runs}
    folder = args.out / f"workers-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "workers.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    lines = [f"# Workers, turnout vs HAProxy ({doc['date']})", "", f"Command: `{doc['command']}`; load at start "
             f"{load_start}, at end {load_end}; compiled: {doc['machine']['compiled_dataplane']}.", "",
             "| target | req/s | CPU µs/req (whole group) | supervisor / master µs/req | its share |",
             "|---|---:|---:|---:|---:|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['rps']:.0f} | {m['cpu_us']:.1f} | {m['leader_cpu_us']:.2f} | "
                     f"{m['leader_share']:.1%} |")
    sc = doc["scaling_rps_2_over_1"]
    lines += ["", f"Scaling 1 -> 2 (req/s, cores shared with wrk): turnout {sc['turnout']:.2f}x, "
              f"HAProxy {sc['haproxy']:.2f}x.", "",
              f"Model: a turnout worker costs {model['turnout_worker_cpu_us']:.1f} µs CPU per request (2-worker run, "
              f"supervisor excluded): about {model['per_worker_rps_on_own_core']:,.0f} req/s per core of its own; "
              f"the supervisor takes {model['turnout_supervisor_share']:.1%} of the group's CPU."]
    (folder / "workers.md").write_text("\n".join(lines) + "\n")
    chart(doc, folder / "workers.png")
    print("\n".join(lines))
    print(f"wrote {folder}/workers.json, .md")


if __name__ == "__main__":
    asyncio.run(main())
