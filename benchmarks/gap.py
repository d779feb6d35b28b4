"""Where turnout's CPU gap to HAProxy is: CPU per request, user and kernel apart, for turnout, HAProxy, nginx
and the floor of a Python proxy on uvloop, interleaved in one run (#17).

    .venv/bin/python -m benchmarks.gap [--seconds 5] [--rounds 3] [--targets ...] [--out DIR] [--quick]

The harness's closed-loop setup (`python -m benchmarks`, section 1): nginx backends and `wrk -t1 -c32` on core 0,
the proxy under `taskset -c 1`, the benchmark request (X-Client-Id over 100 client ids; turnout with the
benchmark route, sticky 90/10 and 10,000 pins, metrics on). Targets run round-robin, `--rounds` times each,
and the medians are reported. Besides user and system CPU seconds per request (/proc/PID/stat of the
process group), each run records per request: minor page faults (a kernel cost that no system call count
shows), voluntary and involuntary context switches (/proc/PID/status), and TCP segments sent on the whole
machine (/proc/net/snmp OutSegs: client, proxy and backends together; other work on the machine adds to it,
so read it as an upper bound).
The floor targets are benchmarks.profile.floor (bytes through, nothing else; `-parse`: llhttp on both
sides; `-buffered`: asyncio.BufferedProtocol): what uvloop and CPython cost per request before a proxy
does anything of its own. benchmarks.profile.instructions counts the same targets' user-space instructions.
Ratios to HAProxy are also taken round by round (each target's run over HAProxy's run of the same round) and
their median is the verdict: this machine's speed drifts over minutes, and neighbouring runs share it.
Writes `gap-<date>/gap.{json,md,png}` under `--out`.
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
from benchmarks.peers import REPO, Backends, Lab, Target
from benchmarks.procs import (
    Proc,
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
from benchmarks.profile import floor
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("haproxy", "nginx", "turnout", *floor.VARIANTS)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def counters(proc: Proc) -> dict[str, float]:
    """CPU seconds, minor faults and context switches of the process group, and the machine's TCP OutSegs."""
    c = {"user": 0.0, "sys": 0.0, "minflt": 0.0, "vcsw": 0.0, "ivcsw": 0.0}
    for pid in _group_pids(proc.pgid):
        f = _stat_fields(pid)
        if f is None:
            continue
        c["minflt"] += int(f[7])
        c["user"] += int(f[11]) / CLK_TCK
        c["sys"] += int(f[12]) / CLK_TCK
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    c["vcsw"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    c["ivcsw"] += int(line.split()[1])
        except OSError:
            pass
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Tcp:")]
    c["outsegs"] = float(lines[1][lines[0].index("OutSegs")])
    return c


def start(lab: Lab, b: Backends, name: str) -> Target:
    if name == "turnout":
        return lab.start_turnout(b)
    if name == "haproxy":
        return lab.start_haproxy(b)
    if name == "nginx":
        return lab.start_nginx(b)
    port = free_port()
    argv = floor.command(name, port, b.v1)
    run = lab.work / name
    run.mkdir(exist_ok=True)
    proc = lab.procs.start(name, pinned(argv, lab.proxy_core), run / "stdout.log", cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    wait_http(proc, port, 30.0)
    return Target(name, port, proc)


async def one_run(t: Target, seconds: float, work: Path, core: int | None) -> dict[str, Any]:
    assert t.proc is not None
    before = counters(t.proc)
    r = await run_wrk(t.port, seconds, work, core)
    after = counters(t.proc)
    n = max(r.requests, 1)
    d = {k: (after[k] - before[k]) / n for k in before}
    return {"requests": r.requests, "rps": round(r.requests / r.seconds), "errors": r.socket_errors + r.non_2xx,
            "cpu_us": round((d["user"] + d["sys"]) * 1e6, 2), "user_us": round(d["user"] * 1e6, 2),
            "sys_us": round(d["sys"] * 1e6, 2), "minflt": round(d["minflt"], 4), "vcsw": round(d["vcsw"], 4),
            "ivcsw": round(d["ivcsw"], 4), "outsegs": round(d["outsegs"], 3)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "cpu_us", "user_us", "sys_us", "minflt", "vcsw", "ivcsw", "outsegs")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}
    out["cpu_us_all"] = [r["cpu_us"] for r in runs]
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def paired(runs: dict[str, list[dict[str, Any]]], name: str, key: str = "cpu_us") -> list[float]:
    """`name`'s figure over HAProxy's, round by round: neighbours in time share the machine's state of the
    moment (this VM's speed drifts by a third over minutes), so their ratio is steadier than a ratio of
    medians taken over all rounds."""
    ha = runs.get("haproxy", [])
    return [round(r[key] / h[key], 3) for r, h in zip(runs[name], ha, strict=True) if h[key]]


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    ha = s.get("haproxy")
    lines = [f"# CPU per request, user and kernel: turnout, HAProxy, nginx and the Python floor ({doc['date']}"
             f"{', quick' if doc['quick'] else ''})", "",
             f"Command: `{doc['command']}`. wrk -t1 -c32, {doc['plan']['seconds']:g} s per run, "
             f"{doc['plan']['rounds']} rounds interleaved, medians. Proxy on core {doc['machine']['proxy_core']}, "
             f"wrk and backends on core {doc['machine']['load_core']}. Compiled data plane: "
             f"{doc['machine']['compiled_dataplane']}. Machine load at start {doc['machine']['load_start']}, "
             f"at end {doc['machine']['load_end']}.", "",
             "| target | req/s | CPU µs/req | user | sys | vs HAProxy (CPU, medians) | vs HAProxy, round by "
             "round: median (range) | minor faults/req | vol. cs/req | invol. cs/req | TCP segs/req (machine) | "
             "errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = doc["runs"]
    for name, r in s.items():
        ratio = f"{r['cpu_us'] / ha['cpu_us']:.2f}x" if ha else "-"
        pr = paired(runs, name) if ha else []
        rounds = f"{statistics.median(pr):.2f}x ({min(pr):.2f}-{max(pr):.2f})" if pr else "-"
        lines.append(f"| {name} | {r['rps']:,.0f} | {r['cpu_us']:.1f} | {r['user_us']:.1f} | {r['sys_us']:.1f} | "
                     f"{ratio} | {rounds} | {r['minflt']:.3f} | {r['vcsw']:.3f} | {r['ivcsw']:.3f} | "
                     f"{r['outsegs']:.2f} | {r['errors']} |")
    if ha and "turnout" in s:
        t = s["turnout"]
        pr = paired(runs, "turnout")
        verdict = statistics.median(pr)
        lines += ["", f"turnout/HAProxy: CPU per request {t['cpu_us'] / ha['cpu_us']:.2f}x as a ratio of medians, "
                  f"{verdict:.2f}x as the median of the {len(pr)} round-by-round ratios (user "
                  f"{statistics.median(paired(runs, 'turnout', 'user_us')):.2f}x, sys "
                  f"{statistics.median(paired(runs, 'turnout', 'sys_us')):.2f}x); throughput "
                  f"{statistics.median(paired(runs, 'turnout', 'rps')):.2f}x. Target CPU <= 1.25x (judged on "
                  f"the round-by-round median): {'met' if verdict <= 1.25 else 'not met'}."]
        for f in ("floor", "floor-parse"):
            if f in s:
                lines.append(f"- {f}: CPU per request {s[f]['cpu_us'] / ha['cpu_us']:.2f}x HAProxy's "
                             f"(user {s[f]['user_us']:.1f} µs, sys {s[f]['sys_us']:.1f} µs).")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    names = list(s)
    user = [s[n]["user_us"] for n in names]
    sys_ = [s[n]["sys_us"] for n in names]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    ax.barh(names, user, label="user", color="#4c72b0")
    ax.barh(names, sys_, left=user, label="kernel", color="#dd8452")
    for i in range(len(names)):
        ax.text(user[i] + sys_[i], i, f"  {user[i] + sys_[i]:.1f} µs", va="center", fontsize=9)
    if "haproxy" in s:
        ax.axvline(1.25 * s["haproxy"]["cpu_us"], color="grey", ls="--", lw=1, label="1.25x HAProxy")
    ax.invert_yaxis()
    ax.set_xlabel("CPU µs per proxied request (median of interleaved wrk runs)")
    ax.set_title("CPU per request: user and kernel")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, max(u + k for u, k in zip(user, sys_, strict=True)) * 1.2)
    # Every run: the kernel's time per request against the rate the proxy sustained. One curve for all
    # proxies means the kernel's share follows the rate (wake-ups per request), not the proxy's code.
    for n in names:
        rs = doc["runs"][n]
        bx.scatter([r["rps"] / 1000 for r in rs], [r["sys_us"] for r in rs], label=n, s=22)
    bx.set_xlabel("requests per second sustained in the run (thousands)")
    bx.set_ylabel("kernel µs per request")
    bx.set_title("Kernel µs per request against the rate: one trend for every proxy")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    require_tools("wrk", "nginx", "haproxy", "taskset")
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    work = Path(tempfile.mkdtemp(prefix="turnout-gap-"))
    procs = Processes()
    names = args.targets.split(",")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        targets = {n: start(lab, b, n) for n in names}
        for t in targets.values():  # warm-up: pools filled, code paths warm
            await run_wrk(t.port, 1, work, load_core)
        for rnd in range(args.rounds):
            for n in names:
                r = await one_run(targets[n], args.seconds, work, load_core)
                runs[n].append(r)
                print(f"gap: round {rnd + 1} {n}: {r['rps']:,} req/s, {r['cpu_us']} µs CPU/req "
                      f"(user {r['user_us']}, sys {r['sys_us']})", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    date = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {"date": date, "quick": args.quick, "command": "python -m benchmarks.gap " + " ".join(sys.argv[1:]),
           "plan": {"seconds": args.seconds, "rounds": args.rounds},
           "machine": {"compiled_dataplane": compiled(), "proxy_core": proxy_core, "load_core": load_core,
                       "load_start": load_start, "load_end": machine_load("end")},
           "runs": runs, "summary": {n: summarize(rs) for n, rs in runs.items()}}
    out = args.out / f"gap-{date}{'-quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gap.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "gap.md").write_text(markdown(doc))
    chart(doc, out / "gap.png")
    print(markdown(doc))
    print(f"gap: wrote {out}")
    return 1 if any(s["errors"] for s in doc["summary"].values()) else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="1 s, 1 round: checks the harness, not comparable")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
