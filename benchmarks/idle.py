"""Memory per idle keep-alive connection: turnout vs HAProxy vs nginx, up to 50,000 connections (#17).

    .venv/bin/python -m benchmarks.idle [--counts 10000,16000] [--processes K] [--reference N] [--rates 0,500]
                                        [--settle 3] [--out DIR] [--work DIR] [--quick]

Each proxy starts fresh per count (turnout: the benchmark route, sticky 90/10 and 10,000 pins; HAProxy and
nginx: the anchors rendered with room for the connections). Client processes open N connections (200 at a
time in all), make one request on each, and keep them open and silent. RSS of the proxy's processes
(/proc/PID/statm) is read before, 0.5 s after the last answer, and again after `--settle` seconds (turnout
gives an idle connection's parser back after 1 s: SHED_AFTER in proxy/dataplane/flow.py). KiB per connection
= (RSS after - RSS before) / connections held, the ones answered 200 and still open at the last reading.
How fast the connections open matters: turnout sheds an idle connection's parser, but memory freed after a
burst mostly stays resident, so `--rates` runs each count as a burst (0: as fast as 200 in flight allow)
and/or paced (R connections per second in all), which shows the cost of the connections held.
Every proxy gets the same 900 s client idle timeout: opening takes long enough that HAProxy's 30 s and
nginx's and turnout's 75 s would close the first connections before the last are open.

The open-file limit is per process: this machine's hard limit is 20,000 descriptors and an unprivileged
process cannot raise it, so one process cannot hold 50,000. `--processes K` has K processes of each proxy
share one port (turnout `--workers K`, nginx `worker_processes K` with `reuseport`, K HAProxy instances on
the port: HAProxy 2.6 has no nbproc) and at least K client processes, from distinct loopback source
addresses; benchmarks/idle_spread.py says how, and the report lists every process's descriptors and the
client connections it holds. `--reference N` adds a one-process run at N connections to the same run.
Counts whose share does not fit one process's limit are refused.
`--quick`: 500 connections, 1.5 s settle (with --processes too). Writes `idle-<date>/idle.{json,md,png}`.
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
from benchmarks.idle_spread import CLIENT_MAX, IDLE_TIMEOUT, Clients, client_count, share, start_group, stop_group
from benchmarks.peers import Backends, Lab
from benchmarks.procs import Processes, cores, machine_load, raise_nofile, require_tools
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_KIB = 2.0
PROXIES = ("turnout", "haproxy", "nginx")
OPEN_TIMEOUT = 30.0  # one connection: connect and answer
OPEN_DEADLINE = 300.0  # all of a count's connections; the rest count as failed


def label(n: int, k: int, rate: float) -> str:
    return (f"{n:,} idle connections" + (f", {k} processes" if k > 1 else ", 1 process")
            + (f", {rate:g}/s" if rate > 0 else ", burst"))


def key(n: int, k: int, rate: float) -> str:
    return f"{n}x{k}" + (f"@{rate:g}" if rate > 0 else "")


async def one(lab: Lab, b: Backends, name: str, n: int, k: int, rate: float, settle: float,
              nofile: int) -> dict[str, Any]:
    g = start_group(lab, b, name, n, k, nofile)
    clients = Clients(lab, g.port, n, client_count(n, k), OPEN_TIMEOUT, OPEN_DEADLINE, rate)
    try:
        await asyncio.sleep(0.5)
        base = g.rss()
        t0 = time.perf_counter()
        await clients.open()
        opened = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        early = g.rss()
        await asyncio.sleep(max(settle - 0.5, 0.0))
        late = g.rss()
        held = sum(await clients.held())
        spread = g.per_process()
        k_held = max(held, 1)
        return {"proxy": name, "connections": n, "processes": k, "open_rate": rate, "how": g.how,
                "client_processes": len(clients.procs), "answered": clients.answered, "failed": clients.failed,
                "held": held, "rss_before_mib": round(base / 2**20, 2), "rss_after_mib": round(late / 2**20, 2),
                "kib_per_connection_at_0_5s": round((early - base) / 1024 / k_held, 3),
                "kib_per_connection": round((late - base) / 1024 / k_held, 3), "open_seconds": round(opened, 2),
                "proxy_fds": sum(p["fds"] for p in spread), "max_process_fds": max(p["fds"] for p in spread),
                "client_connections_seen": sum(p["client_connections"] for p in spread), "per_process": spread}
    finally:
        await clients.close()
        stop_group(lab, g)


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Memory per idle keep-alive connection ({doc['date']}{', quick' if doc['quick'] else ''})", "",
             f"Command: `{doc['command']}`. One request per connection, then silent; RSS of the proxy's processes "
             f"before and {doc['plan']['settle']:g} s after the last answer (also 0.5 s after), divided by the "
             f"connections held (answered 200 and still open at the reading). Client idle timeout "
             f"{doc['plan']['idle_timeout']} s on all three proxies. Compiled data plane: "
             f"{doc['machine']['compiled_dataplane']}. Open-file limit: {doc['machine']['nofile_limit']:,} per "
             "process (hard; not raisable here), so more connections than that are held by several processes of "
             "each proxy and opened by several client processes (at most "
             f"{doc['plan']['client_max']:,} each, each from its own 127.0.0.x address).", "",
             f"Machine load (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']}.", "",
             "Opened: *burst* = as fast as 200 connections in flight allow; *N/s* = paced, connection i "
             "started at i/N s. turnout gives an idle connection's parser back after 1 s, but memory freed "
             "after a burst mostly stays resident (the allocator keeps it), so a burst shows the high-water "
             "mark and a paced open the cost of the connections held.", "",
             "| connections | processes | opened | proxy | answered | held | failed | RSS before → after (MiB) "
             "| KiB/conn at 0.5 s | KiB/conn settled | open s | client connections per process "
             "| most fds in one process |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in doc["runs"]:
        shares = " / ".join(f"{p['client_connections']:,}" for p in r["per_process"])
        opened = f"{r['open_rate']:g}/s" if r["open_rate"] > 0 else "burst"
        lines.append(f"| {r['connections']:,} | {r['processes']} | {opened} | {r['proxy']} | {r['answered']:,} | "
                     f"{r['held']:,} | {r['failed']:,} | {r['rss_before_mib']:.1f} → {r['rss_after_mib']:.1f} | "
                     f"{r['kib_per_connection_at_0_5s']:.2f} | **{r['kib_per_connection']:.2f}** | "
                     f"{r['open_seconds']:g} | {shares} | "
                     f"{r['max_process_fds']:,} |")
    lines += ["", "How each proxy ran (client connections per process: the group's processes in pid order, the "
              "leader first where it has one: turnout's supervisor, nginx's master):"]
    seen = set()
    for r in doc["runs"]:
        which = (r["proxy"], r["connections"], r["processes"])
        if which not in seen:
            seen.add(which)
            lines.append(f"- {r['proxy']}, {r['connections']:,} connections: {r['how']}")
    lines += ["", "turnout / HAProxy / nginx, settled KiB per connection:"]
    for k, row in doc["summary"]["kib"].items():
        ratio = doc["summary"]["turnout_over"][k]
        if not {"turnout", "haproxy", "nginx"} <= set(row):
            continue
        lines.append(f"- {row['label']}: turnout {row['turnout']:.2f}, HAProxy {row['haproxy']:.2f}, "
                     f"nginx {row['nginx']:.2f} (turnout/HAProxy {ratio['haproxy']:.2f}x, turnout/nginx "
                     f"{ratio['nginx']:.2f}x); target <= {TARGET_KIB} KiB: "
                     f"{'met' if row['turnout'] <= TARGET_KIB else 'NOT met'}")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kib = doc["summary"]["kib"]
    keys = list(kib)
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 2.4 * len(keys))), 4.0))
    colors = {"turnout": "#2a7ab0", "haproxy": "#999999", "nginx": "#5a9e5a"}
    for i, name in enumerate(PROXIES):
        xs = [j + (i - 1) * 0.27 for j, k in enumerate(keys) if name in kib[k]]
        vals = [kib[k][name] for k in keys if name in kib[k]]
        ax.bar(xs, vals, width=0.27, color=colors[name], label=name)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_KIB, color="#c0392b", linestyle="--", linewidth=1, label=f"target {TARGET_KIB} KiB")
    ax.set_xticks(range(len(keys)), [str(kib[k]["label"]).replace(" idle connections, ", "\n").replace(", ", "\n")
                                     for k in keys], fontsize=8)
    ax.set_ylabel("KiB RSS per connection")
    ax.legend(fontsize=8)
    ax.set_title(f"Idle keep-alive connections, {doc['date']} (load {doc['load_start'][0]} -> {doc['load_end'][0]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    kib: dict[str, dict[str, Any]] = {}
    for r in runs:
        n, k, rate = r["connections"], r["processes"], r["open_rate"]
        row = kib.setdefault(key(n, k, rate), {"label": label(n, k, rate)})
        row[r["proxy"]] = r["kib_per_connection"]
    over = {k: {p: round(row["turnout"] / row[p], 3) if "turnout" in row and row.get(p) else None
                for p in ("haproxy", "nginx")} for k, row in kib.items()}
    return {"kib": kib, "turnout_over": over}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--counts", default="10000,16000")
    ap.add_argument("--processes", type=int, default=1, metavar="K",
                    help="processes of each proxy sharing the port (default 1)")
    ap.add_argument("--reference", type=int, default=None, metavar="N",
                    help="also run N connections with one process of each proxy, first (ignored by --quick)")
    ap.add_argument("--rates", default="0", metavar="R,R",
                    help="open rates to run each count at, connections per second in all (0: burst, as fast as "
                    "200 in flight allow; default 0)")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="work folder for configs and logs (default: a new "
                    "temporary one, removed at the end)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--tree", type=Path, default=None,
                    help="run turnout from this source tree (a build of another commit, for before/after)")
    args = ap.parse_args()
    if args.tree is not None:
        peers.REPO = args.tree.resolve()
    if args.processes < 1:
        sys.exit(f"--processes: {args.processes} is not a positive number")
    proxies = args.proxies.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    if any(r < 0 for r in rates):
        sys.exit(f"--rates: {args.rates}: a rate is a number of connections per second, >= 0")
    plan = [(n, args.processes, r) for r in rates for n in counts]
    if args.reference is not None:
        plan[:0] = [(args.reference, 1, r) for r in rates]
    if args.quick:
        plan, args.settle = [(500, args.processes, r) for r in rates], 1.5
    too_slow = [f"{n:,} at {r:g}/s" for n, _, r in plan if r > 0 and n / r > OPEN_DEADLINE - 30]
    if too_slow:
        sys.exit(f"{', '.join(too_slow)}: would not be open within the {OPEN_DEADLINE:g} s deadline")
    require_tools("haproxy", "nginx", "taskset")
    nofile = raise_nofile()
    too_many = [f"{n:,} over {k} process{'es' if k > 1 else ''}" for n, k, _ in plan
                if share(n, k) + 1000 > nofile]
    if too_many:
        sys.exit(f"{', '.join(too_many)}: one process's share does not fit the open-file limit {nofile} "
                 "(hard limit; setrlimit cannot raise it): use more --processes")
    proxy_core, load_core = cores()
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    load_start = machine_load("start")
    procs = Processes()
    work = args.work if args.work is not None else Path(tempfile.mkdtemp(prefix="turnout-idle-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        for n, k, rate in plan:
            for name in proxies:
                r = await one(lab, b, name, n, k, rate, args.settle, nofile)
                runs.append(r)
                print(f"{n:6d} x{k} @{rate:g}/s {name:8s} answered {r['answered']:6d} held {r['held']:6d} failed "
                      f"{r['failed']:4d}  {r['kib_per_connection_at_0_5s']:5.2f} KiB/conn at 0.5 s, "
                      f"{r['kib_per_connection']:5.2f} settled; fds per process "
                      f"{[p['fds'] for p in r['per_process']]}, opened in {r['open_seconds']} s", flush=True)
    finally:
        procs.stop_all()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-idle-benchmark/2", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.idle", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "compiled_dataplane": compiled(),
                       "nofile_limit": nofile},
           "plan": {"runs": [{"connections": n, "processes": k, "open_rate": r} for n, k, r in plan],
                    "settle": args.settle,
                    "idle_timeout": IDLE_TIMEOUT, "client_max": CLIENT_MAX, "open_timeout": OPEN_TIMEOUT,
                    "open_deadline": OPEN_DEADLINE, "turnout_tree": str(peers.REPO)},
           "load_start": load_start, "load_end": load_end, "summary": summarize(runs), "runs": runs}
    folder = args.out / f"idle-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "idle.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "idle.md").write_text(markdown(doc))
    chart(doc, folder / "idle.png")
    print(markdown(doc))
    print(f"wrote {folder}/idle.json, .md, .png")


if __name__ == "__main__":
    asyncio.run(main())
