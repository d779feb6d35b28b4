"""Memory per idle keep-alive connection: turnout vs HAProxy vs nginx, at 10,000 and 16,000 connections (#17).

    .venv/bin/python -m benchmarks.idle [--counts 10000,16000] [--settle 3] [--out DIR] [--quick]

Each proxy starts fresh per count (turnout: the benchmark route, sticky 90/10 and 10,000 pins; HAProxy and
nginx: the anchors rendered with room for the connections, as the harness's memory scenario does). The
harness opens N connections (200 at a time), makes one request on each, and keeps them open and silent.
RSS of the proxy's process group (/proc/PID/statm) is read before, 0.5 s after the last answer, and again
after `--settle` seconds (turnout gives an idle connection's parser back after 1 s: SHED_AFTER in
proxy/dataplane/flow.py). KiB per connection = (RSS after - RSS before) / answered connections.

The count is bounded by the open-file limit: this machine's hard limit is 20,000 descriptors per process
and an unprivileged process cannot raise it (setrlimit refuses), so 50,000 cannot be opened here; the
script raises the soft limit to the hard one and refuses counts that do not fit.
`--quick`: 500 connections, 1.5 s settle. Writes `idle-<date>/idle.{json,md,png}` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.peers as peers
from benchmarks.load import IdleClients
from benchmarks.peers import Backends, Lab, Target
from benchmarks.procs import Processes, cores, machine_load, raise_nofile, require_tools
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_KIB = 2.0
PROXIES = ("turnout", "haproxy", "nginx")


def start(lab: Lab, b: Backends, name: str, n: int) -> Target:
    if name == "turnout":
        return lab.start_turnout(b, name=f"turnout-{n}")
    if name == "haproxy":
        return lab.start_haproxy(b, max_conns=n)
    return lab.start_nginx(b, max_conns=n)


async def one(lab: Lab, b: Backends, name: str, n: int, settle: float) -> dict[str, Any]:
    t = start(lab, b, name, n)
    assert t.proc is not None
    clients = IdleClients(t.port)
    try:
        await asyncio.sleep(0.5)
        base = t.proc.rss()
        t0 = time.perf_counter()
        await clients.open(n, timeout=30.0)
        opened = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        early = t.proc.rss()
        await asyncio.sleep(max(settle - 0.5, 0.0))
        late = t.proc.rss()
        k = max(clients.answered, 1)
        return {"proxy": name, "connections": n, "answered": clients.answered, "failed": clients.failed,
                "rss_before_mib": round(base / 2**20, 2), "rss_after_mib": round(late / 2**20, 2),
                "kib_per_connection_at_0_5s": round((early - base) / 1024 / k, 3),
                "kib_per_connection": round((late - base) / 1024 / k, 3), "open_seconds": round(opened, 2),
                "proxy_fds": t.proc.fds()}
    finally:
        clients.close()
        lab.procs.stop(t.proc)


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Memory per idle keep-alive connection ({doc['date']}{', quick' if doc['quick'] else ''})", "",
             f"Command: `{doc['command']}`. One request per connection, then silent; RSS of the proxy's process "
             f"group before and {doc['plan']['settle']:g} s after the last answer (also 0.5 s after). "
             f"Compiled data plane: {doc['machine']['compiled_dataplane']}. Open-file limit: "
             f"{doc['machine']['nofile_limit']:,} (hard; not raisable here).", "",
             f"Machine load (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']}.", "",
             "| connections | proxy | answered | RSS before → after (MiB) | KiB/conn at 0.5 s | KiB/conn settled |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        lines.append(f"| {r['connections']:,} | {r['proxy']} | {r['answered']:,} | {r['rss_before_mib']:.1f} → "
                     f"{r['rss_after_mib']:.1f} | {r['kib_per_connection_at_0_5s']:.2f} | "
                     f"**{r['kib_per_connection']:.2f}** |")
    lines += ["", "turnout / HAProxy / nginx, settled KiB per connection:"]
    for n, row in doc["summary"]["kib"].items():
        ratio = doc["summary"]["turnout_over"][n]
        lines.append(f"- {int(n):,} connections: turnout {row['turnout']:.2f}, HAProxy {row['haproxy']:.2f}, "
                     f"nginx {row['nginx']:.2f} (turnout/HAProxy {ratio['haproxy']:.2f}x, turnout/nginx "
                     f"{ratio['nginx']:.2f}x); target <= {TARGET_KIB} KiB: "
                     f"{'met' if row['turnout'] <= TARGET_KIB else 'NOT met'}")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kib = doc["summary"]["kib"]
    counts = list(kib)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = {"turnout": "#2a7ab0", "haproxy": "#999999", "nginx": "#5a9e5a"}
    for i, name in enumerate(PROXIES):
        xs = [j + (i - 1) * 0.27 for j in range(len(counts))]
        vals = [kib[n][name] for n in counts]
        ax.bar(xs, vals, width=0.27, color=colors[name], label=name)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_KIB, color="#c0392b", linestyle="--", linewidth=1, label=f"target {TARGET_KIB} KiB")
    ax.set_xticks(range(len(counts)), [f"{int(n):,} idle connections" for n in counts])
    ax.set_ylabel("KiB RSS per connection")
    ax.legend(fontsize=8)
    ax.set_title(f"Idle keep-alive connections, {doc['date']} (load {doc['load_start'][0]} -> {doc['load_end'][0]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    kib: dict[str, dict[str, float]] = {}
    for r in runs:
        kib.setdefault(str(r["connections"]), {})[r["proxy"]] = r["kib_per_connection"]
    over = {n: {p: round(row["turnout"] / row[p], 3) if "turnout" in row and p in row else None
                for p in ("haproxy", "nginx")} for n, row in kib.items()}
    return {"kib": kib, "turnout_over": over}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--counts", default="10000,16000")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--tree", type=Path, default=None,
                    help="run turnout from this source tree (a build of another commit, for before/after)")
    args = ap.parse_args()
    if args.tree is not None:
        peers.REPO = args.tree.resolve()
    proxies = args.proxies.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        counts, args.settle = [500], 1.5
    require_tools("haproxy", "nginx", "taskset")
    nofile = raise_nofile()
    too_many = [n for n in counts if n + 1000 > nofile]
    if too_many:
        sys.exit(f"counts {too_many} do not fit the open-file limit {nofile} (hard limit; setrlimit cannot raise it)")
    proxy_core, load_core = cores()
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    load_start = machine_load("start")
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-idle-"))
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        for n in counts:
            for name in proxies:
                r = await one(lab, b, name, n, args.settle)
                runs.append(r)
                print(f"{n:6d} {name:8s} answered {r['answered']:6d} failed {r['failed']:4d}  "
                      f"{r['kib_per_connection_at_0_5s']:5.2f} KiB/conn at 0.5 s, {r['kib_per_connection']:5.2f} "
                      f"settled", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-idle-benchmark/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.idle", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "compiled_dataplane": compiled(),
                       "nofile_limit": nofile},
           "plan": {"counts": counts, "settle": args.settle,
                    "turnout_tree": str(peers.REPO)}, "load_start": load_start, "load_end": load_end,
           "summary": summarize(runs), "runs": runs}
    folder = args.out / f"idle-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "idle.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "idle.md").write_text(markdown(doc))
    chart(doc, folder / "idle.png")
    print(markdown(doc))
    print(f"wrote {folder}/idle.json, .md, .png")


if __name__ == "__main__":
    asyncio.run(main())
