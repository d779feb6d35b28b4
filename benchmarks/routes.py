"""CPU per request against the number of routes: turnout vs HAProxy with 1, 100 and 10,000 routes (#17).

    .venv/bin/python -m benchmarks.routes [--rounds 3] [--seconds 5] [--counts 1,100,10000] [--out DIR] [--quick]

Route i matches host `h<i>.bench` and path prefix `/p<i>` (distinct hosts and prefixes), with the benchmark
split (sticky 90/10 over v1/v2 by X-Client-Id, no pins). Every request matches the LAST route
(`Host: h<N-1>.bench`, `GET /p<N-1>/x`), so a table that scans its routes pays for all of them. HAProxy
gets the equivalent config generated from the anchor (benchmarks/configs/haproxy.cfg.tmpl): one
`use_backend be if { hdr(host) -i h<i>.bench } { path_beg /p<i>/ }` rule per route, in order, all to the
anchor's backend (weights 90/10); HAProxy evaluates them in order. `haproxy-map` is the idiomatic form for
many routes: one `use_backend %[base,map_beg(routes.map)]` rule and a map of `h<i>.bench/p<i>/` entries,
which HAProxy looks up in a prefix tree.

Same method as the benchmark harness: nginx backends (14-byte answers) and wrk on core 0, each proxy under
`taskset -c 1`, `wrk -t1 -c32`, CPU per request = utime+stime of the proxy's process group from /proc
before and after, divided by the requests wrk completed. All proxies run at once (an idle one costs no
CPU) and are measured interleaved, the order flipping every round; medians are reported. In the same
process the harness also times `RouteTable.match` itself (the index) and `match_linear` (the scan it
replaced) on the same tables: ns per match.

`--quick` (1 round of 1 s, 1 and 100 routes) checks the script. Writes
`routes-<date>/routes.{json,md,png}` under `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.peers as peers
from benchmarks.load import run_tool
from benchmarks.peers import Backends, Lab, Target
from benchmarks.procs import (
    Proc,
    Processes,
    StartError,
    cores,
    free_port,
    machine_load,
    pinned,
    raise_nofile,
    require_tools,
    wait_port,
)
from benchmarks.profile.tls import compiled
from proxy.model import Match, Route, State, Version, VersionSpec
from proxy.table import RouteTable

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.10  # turnout's CPU per request with the most routes <= 1.1x its CPU with one route
NAMES = ("turnout", "haproxy", "haproxy-map")

WRK_SCRIPT = """
local reqs = {}
local i = 0
init = function(args)
  for n = 0, 99 do
    reqs[n] = wrk.format("GET", "%(path)s", {["Host"] = "%(host)s", ["X-Client-Id"] = "c" .. n})
  end
end
request = function()
  i = (i + 1) %% 100
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "status": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def last(n: int) -> tuple[str, str]:
    """(host, path) of the request: it matches route n-1 only."""
    return f"h{n - 1}.bench", f"/p{n - 1}/x"


def routes_doc(b: Backends, n: int) -> dict[str, Any]:
    return {"versions": {"v1": {"endpoints": [f"http://127.0.0.1:{b.v1}"]},
                         "v2": {"endpoints": [f"http://127.0.0.1:{b.v2}"]}},
            "routes": [{"name": f"r{i}", "match": {"host": f"h{i}.bench", "path_prefix": f"/p{i}"},
                        "identity": [{"header": "X-Client-Id"}], "split": {"v1": 90, "v2": 10}, "sticky": True,
                        "fallback": ["v1"]} for i in range(n)]}


def haproxy_config(b: Backends, n: int, port: int, run: Path) -> str:
    text = peers.render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                        V2=f"127.0.0.1:{b.v2}", RUN=str(run))
    rules = "".join(f"  use_backend be if {{ hdr(host) -i h{i}.bench }} {{ path_beg /p{i}/ }}\n" for i in range(n))
    # No default: a request no rule takes is answered 503, as turnout answers one no route takes with 404.
    return text.replace("  default_backend be\n", rules)


def haproxy_map_config(b: Backends, n: int, port: int, run: Path) -> str:
    text = peers.render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                        V2=f"127.0.0.1:{b.v2}", RUN=str(run))
    (run / "routes.map").write_text("".join(f"h{i}.bench/p{i}/ be\n" for i in range(n)))
    return text.replace("  default_backend be\n", f"  use_backend %[base,map_beg({run / 'routes.map'})]\n")


def probe(port: int, host: str, path: str) -> int:
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Client-Id: ready\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(req)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def wait_ready(proc: Proc, port: int, n: int, timeout: float) -> None:
    wait_port(proc, port, timeout)
    deadline, last_error = time.monotonic() + 30.0, ""
    while time.monotonic() < deadline:
        if not proc.alive:
            raise StartError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status = probe(port, *last(n))
            if status == 200:
                return
            last_error = f"status {status}"
        except OSError as e:
            last_error = str(e)
        time.sleep(0.1)
    raise StartError(f"{proc.name} never answered 200 for {last(n)} ({last_error}):\n{proc.log_tail()}")


def start_haproxy(lab: Lab, b: Backends, n: int, name: str = "haproxy") -> Target:
    run = lab.work / f"{name}-{n}"
    run.mkdir()
    port = free_port()
    make = haproxy_map_config if name == "haproxy-map" else haproxy_config
    (run / "haproxy.cfg").write_text(make(b, n, port, run))
    proc = lab.procs.start(f"{name}-{n}", pinned(["haproxy", "-f", str(run / "haproxy.cfg")], lab.proxy_core),
                           run / "stdout.log")
    wait_ready(proc, port, n, 30.0)
    return Target(name, port, proc)


def start_turnout(lab: Lab, b: Backends, n: int) -> Target:
    run = lab.work / f"turnout-{n}"
    run.mkdir()
    port, admin = free_port(), free_port()
    (run / "routes.yaml").write_text(json.dumps(routes_doc(b, n)))
    argv = [sys.executable, "-m", "proxy", "serve", "--routes", str(run / "routes.yaml"),
            "--store", f"sqlite:///{run / 'state.db'}", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--workers", "1", "--shutdown-grace", "1", "--state-dir", str(run)]
    env = dict(os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN="bench-routes",
               PYTHONPATH=str(peers.REPO))
    proc = lab.procs.start(f"turnout-{n}", pinned(argv, lab.proxy_core), run / "stdout.log", env=env,
                           cwd=peers.REPO)
    wait_ready(proc, port, n, 120.0)
    return Target("turnout", port, proc)


async def wrk(port: int, n: int, seconds: float, work: Path, core: int | None) -> tuple[int, float, int, int]:
    """(requests, seconds, socket errors, non-2xx) of one `wrk -t1 -c32` run at the last route."""
    host, path = last(n)
    script = work / f"routes-{n}.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % {"host": host, "path": path})
    argv = pinned(["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "-s", str(script),
                   f"http://127.0.0.1:{port}/"], core)
    returncode, text = await run_tool(argv, seconds + 30)
    m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.M)
    if returncode != 0 or m is None:
        raise RuntimeError(f"wrk exited {returncode}: {text[-500:]}")
    d = json.loads(m.group(1))
    return d["requests"], d["duration_us"] / 1e6, d["errors"], d["status"]


async def measure(t: Target, n: int, seconds: float, work: Path, core: int | None) -> dict[str, float]:
    assert t.proc is not None
    before = t.proc.cpu()
    requests, wall, errors, non_2xx = await wrk(t.port, n, seconds, work, core)
    used = t.proc.cpu() - before
    k = max(requests, 1)
    return {"rps": round(requests / wall, 1), "requests": requests, "user_us": round(used.user / k * 1e6, 3),
            "sys_us": round(used.system / k * 1e6, 3), "cpu_us": round((used.user + used.system) / k * 1e6, 3),
            "socket_errors": errors, "non_2xx": non_2xx}


def match_cost(counts: list[int], iterations: int) -> dict[str, dict[str, float]]:
    """ns per RouteTable.match (the index) and per match_linear (the scan it replaced), last route hit."""
    out: dict[str, dict[str, float]] = {}
    v = {"v1": Version("v1", VersionSpec("static", ("http://127.0.0.1:9",)), ())}
    for n in counts:
        table = RouteTable(State(versions=v, routes=tuple(
            Route(f"r{i}", match=Match(host=f"h{i}.bench", path_prefix=f"/p{i}"), split=(("v1", 1),))
            for i in range(n))), 1)
        host, path = last(n)
        headers: dict[str, str] = {}
        assert table.match(host, path, headers) is table.match_linear(host, path, headers) is not None
        row: dict[str, float] = {}
        for name, fn in (("index_ns", table.match), ("linear_ns", table.match_linear)):
            reps = iterations if name == "index_ns" else max(20, iterations * 10 // max(n, 10))
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(host, path, headers)
            row[name] = round((time.perf_counter() - t0) / reps * 1e9, 1)
        out[str(n)] = row
    return out


def summarize(runs: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    med: dict[str, dict[str, dict[str, float]]] = {}
    for name in NAMES:
        med[name] = {}
        for n in counts:
            rs = [r for r in runs if r["proxy"] == name and r["routes"] == n]
            med[name][str(n)] = {k: round(statistics.median(r[k] for r in rs), 3)
                                 for k in ("rps", "cpu_us", "user_us", "sys_us")}
    lo, hi = str(counts[0]), str(counts[-1])
    growth = {name: round(med[name][hi]["cpu_us"] / med[name][lo]["cpu_us"], 3) for name in med}
    vs = {n: round(med["turnout"][n]["cpu_us"] / med["haproxy"][n]["cpu_us"], 3) for n in med["turnout"]}
    vs_map = {n: round(med["turnout"][n]["cpu_us"] / med["haproxy-map"][n]["cpu_us"], 3) for n in med["turnout"]}
    # Per round, the most routes over one route for the same proxy, measured in the same round.
    paired = {}
    for name in med:
        per_round = []
        for r in sorted({x["round"] for x in runs}):
            a = [x for x in runs if x["proxy"] == name and x["round"] == r and x["routes"] == counts[0]]
            b = [x for x in runs if x["proxy"] == name and x["round"] == r and x["routes"] == counts[-1]]
            if a and b:
                per_round.append(b[0]["cpu_us"] / a[0]["cpu_us"])
        paired[name] = round(statistics.median(per_round), 3)
    return {"medians": med, "growth_cpu_us": growth, "paired_growth_cpu_us": paired, "turnout_over_haproxy": vs,
            "turnout_over_haproxy_map": vs_map,
            "target": {"growth_max": TARGET, "met": growth["turnout"] <= TARGET}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    counts = doc["plan"]["counts"]
    med, g, pg, vs = s["medians"], s["growth_cpu_us"], s["paired_growth_cpu_us"], s["turnout_over_haproxy"]
    lines = [f"# CPU per request vs number of routes, turnout vs HAProxy ({doc['date']}"
             f"{', quick' if doc['quick'] else ''})", "",
             f"Command: `{doc['command']}`. {doc['plan']['rounds']} interleaved rounds of {doc['plan']['seconds']:g} s "
             "per proxy and route count, `wrk -t1 -c32`, medians. Route i: host `h<i>.bench`, prefix `/p<i>`; every "
             "request matches the last route. HAProxy: one `use_backend` rule per route (host and path_beg ACLs). "
             f"Compiled data plane: {doc['machine']['compiled_dataplane']}.", "",
             f"Machine load (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']} (shared machine: "
             "read the ratios).", "",
             "| routes | turnout req/s | turnout CPU µs/req (user+sys) | HAProxy rules: req/s | CPU µs/req | "
             "HAProxy map: req/s | CPU µs/req | turnout/HAProxy rules CPU | turnout/HAProxy map CPU |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    vm = s["turnout_over_haproxy_map"]
    for n in counts:
        t, h, hm = med["turnout"][str(n)], med["haproxy"][str(n)], med["haproxy-map"][str(n)]
        lines.append(f"| {n:,} | {t['rps']:.0f} | {t['cpu_us']:.1f} ({t['user_us']:.1f}+{t['sys_us']:.1f}) | "
                     f"{h['rps']:.0f} | {h['cpu_us']:.1f} | {hm['rps']:.0f} | {hm['cpu_us']:.1f} | "
                     f"{vs[str(n)]:.2f}x | {vm[str(n)]:.2f}x |")
    met = "met" if s["target"]["met"] else "NOT met"
    lines += ["", f"CPU per request with {counts[-1]:,} routes over 1 route: turnout **{g['turnout']:.2f}x** "
              f"(target <= {s['target']['growth_max']}x: {met}; median of per-round ratios {pg['turnout']:.2f}x), "
              f"HAProxy rules {g['haproxy']:.2f}x (per-round {pg['haproxy']:.2f}x), HAProxy map "
              f"{g['haproxy-map']:.2f}x (per-round {pg['haproxy-map']:.2f}x).", "",
              "`RouteTable.match` alone, in the harness process (ns per call, last route hit):", "",
              "| routes | index (match) | linear scan (match_linear, before) |", "|---:|---:|---:|"]
    for n, row in doc["match_ns"].items():
        lines.append(f"| {int(n):,} | {row['index_ns']:.0f} | {row['linear_ns']:.0f} |")
    lines += ["", "Every run:", "", "| round | routes | proxy | req/s | CPU µs/req | non-2xx | socket errors |",
              "|---:|---:|---|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        lines.append(f"| {r['round']} | {r['routes']:,} | {r['proxy']} | {r['rps']:.0f} | {r['cpu_us']:.1f} | "
                     f"{r['non_2xx']} | {r['socket_errors']} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, counts = doc["summary"]["medians"], doc["plan"]["counts"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(counts))
    for i, (name, color) in enumerate((("turnout", "#2a7ab0"), ("haproxy", "#999999"), ("haproxy-map", "#cccccc"))):
        vals = [med[name][str(n)]["cpu_us"] for n in counts]
        axes[0].bar([j + (i - 1) * 0.27 for j in x], vals, width=0.27, color=color, label=name)
        for j, v in zip(x, vals, strict=True):
            axes[0].text(j + (i - 1) * 0.27, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_xticks(list(x), [f"{n:,}" for n in counts])
    axes[0].set_xlabel("routes (request matches the last)")
    axes[0].set_title("CPU µs per request (wrk -c32, log scale)", fontsize=10)
    axes[0].legend(fontsize=8)
    ns = doc["match_ns"]
    axes[1].plot(counts, [ns[str(n)]["index_ns"] for n in counts], "o-", label="index (now)", color="#2a7ab0")
    axes[1].plot(counts, [ns[str(n)]["linear_ns"] for n in counts], "o--", label="linear scan (before)",
                 color="#c0392b")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("routes")
    axes[1].set_title("RouteTable.match, ns per call", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Cost vs number of routes, {doc['date']} (load {doc['load_start'][0]} -> {doc['load_end'][0]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(doc: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "routes.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "routes.md").write_text(markdown(doc))
    chart(doc, folder / "routes.png")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--counts", default="1,100,10000")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s, 1 and 100 routes: checks the script")
    ap.add_argument("--render", type=Path, default=None, help="redraw the Markdown and PNG of a routes.json")
    args = ap.parse_args()
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        write(doc, args.render.parent)
        print(markdown(doc))
        return
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        args.rounds, args.seconds, counts = 1, 1.0, [1, 100]
    require_tools("wrk", "haproxy", "nginx", "taskset")
    if not compiled():
        print("warning: the data plane is not compiled (pure Python build)", flush=True)
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    started = time.monotonic()
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-routes-"))
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        targets: list[tuple[int, Target]] = []
        for n in counts:
            targets += [(n, start_turnout(lab, b, n)), (n, start_haproxy(lab, b, n)),
                        (n, start_haproxy(lab, b, n, "haproxy-map"))]
        for n, t in targets:  # warm-up
            await wrk(t.port, n, 1, work, load_core)
        for r in range(args.rounds):
            for n, t in (targets if r % 2 == 0 else targets[::-1]):
                m = await measure(t, n, args.seconds, work, load_core)
                runs.append({"round": r, "routes": n, "proxy": t.name, **m})
                print(f"round {r} routes {n:6d} {t.name:8s} {m['rps']:8.0f} req/s  cpu {m['cpu_us']:6.1f} us "
                      f"(user {m['user_us']:5.1f} sys {m['sys_us']:5.1f})  non2xx {m['non_2xx']} "
                      f"errors {m['socket_errors']}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    match_ns = match_cost(counts, 20_000 if args.quick else 200_000)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-routes-benchmark/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.routes", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "compiled_dataplane": compiled(),
                       "proxy_core": proxy_core, "load_core": load_core},
           "plan": {"rounds": args.rounds, "seconds": args.seconds, "counts": counts, "connections": 32},
           "load_start": load_start, "load_end": load_end, "summary": summarize(runs, counts), "match_ns": match_ns,
           "runs": runs, "total_seconds": round(time.monotonic() - started, 1)}
    folder = args.out / f"routes-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    write(doc, folder)
    print(markdown(doc))
    print(f"wrote {folder}/routes.json, .md, .png")


if __name__ == "__main__":
    asyncio.run(main())
