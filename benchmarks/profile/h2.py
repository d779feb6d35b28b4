"""HTTP/2 downstream, turnout vs HAProxy: h2load over TLS (ALPN h2), requests/s and CPU per request (#18).

    .venv/bin/python -m benchmarks.profile.h2 [--rounds 3] [--requests 20000] [--out benchmarks/results] [--quick]

Same lab as benchmarks.profile.tls: nginx backends (14-byte answers) and the client on core 0, each proxy
under `taskset -c 1`; turnout with the benchmark route (sticky 90/10, 10,000 pins) on a TLS listener with
`protocols: [h2, http/1.1]`, HAProxy with `benchmarks/configs/haproxy-tls.cfg.tmpl` and `alpn h2,http/1.1`.
Both talk HTTP/1.1 to the backends. The client is `h2load -c 10 -m 100` (10 connections x 100 concurrent
streams), bounded in requests (`-n`); CPU per request = utime+stime of the proxy's process group over the
requests h2load completed. Rounds are interleaved (the order flips every round); medians are reported.
Nothing here runs in the test suite. Writes `h2-<date>/result.json` and `result.md` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.peers as peers
from benchmarks.load import run_tool
from benchmarks.peers import Backends, Lab, Target
from benchmarks.procs import Processes, cores, free_port, pinned, raise_nofile, require_tools
from benchmarks.profile.tls import compiled, machine, wait_https, write_certificate

RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGET_CPU_RATIO = 2.0  # turnout's CPU per h2 request <= 2x HAProxy's


def start_haproxy_h2(lab: Lab, b: Backends, pem: Path) -> Target:
    run = lab.work / "haproxy-h2"
    run.mkdir()
    port = free_port()
    text = peers.render("haproxy-tls.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                        V2=f"127.0.0.1:{b.v2}", RUN=str(run), PEM=str(pem), ALPN="h2,http/1.1")
    conf = run / "haproxy.cfg"
    conf.write_text(text)
    proc = lab.procs.start("haproxy", pinned(["haproxy", "-f", str(conf)], lab.proxy_core), run / "stdout.log")
    wait_https(proc, port, 10.0)
    return Target("haproxy", port, proc)


def start_turnout_h2(lab: Lab, b: Backends, cert: Path, key: Path) -> Target:
    run = lab.work / "turnout-h2"
    run.mkdir()
    port, admin = free_port(), free_port()
    routes = lab.write_routes(b, 10_000, run)
    config = run / "turnout.yaml"
    config.write_text(json.dumps({"listeners": [{"name": "public", "address": f"127.0.0.1:{port}",
                                                 "protocols": ["h2", "http/1.1"],
                                                 "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]}}]}))
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--routes", str(routes),
            "--store", f"sqlite:///{run / 'state.db'}", "--admin", f"127.0.0.1:{admin}", "--workers", "1",
            "--shutdown-grace", "1", "--state-dir", str(run)]
    env = dict(os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN="bench-h2", PYTHONPATH=str(peers.REPO))
    proc = lab.procs.start("turnout", pinned(argv, lab.proxy_core), run / "stdout.log", env=env, cwd=peers.REPO)
    wait_https(proc, port, 90.0)
    return Target("turnout", port, proc)


async def run_h2load(port: int, requests: int, core: int | None) -> dict[str, float]:
    argv = pinned(["h2load", "-n", str(requests), "-c", "10", "-m", "100", f"https://127.0.0.1:{port}/"], core)
    code, text = await run_tool(argv, 300)
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
    rate = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    proto = re.search(r"Application protocol: (\S+)", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if os.environ.get("H2_BENCH_VERBOSE"):
        print(text, flush=True)
    if code != 0 or done is None or rate is None:
        raise RuntimeError(f"h2load exited {code}: {text[-800:]}")
    return {"requests": int(done.group(4)), "failed": int(done.group(5)), "rps": float(rate.group(3)),
            "h2": float(proto is not None and proto.group(1) == "h2"),
            "status_5xx": float(codes.group(4)) if codes else -1.0}


async def measure(t: Target, requests: int, load_core: int | None) -> dict[str, float]:
    assert t.proc is not None
    before, wall = t.proc.cpu(), time.monotonic()
    r = await run_h2load(t.port, requests, load_core)
    after, wall = t.proc.cpu(), time.monotonic() - wall
    n = max(r["requests"], 1)
    cpu = (after.user - before.user) + (after.system - before.system)
    return {**r, "cpu_us": cpu / n * 1e6, "user_us": (after.user - before.user) / n * 1e6,
            "sys_us": (after.system - before.system) / n * 1e6, "proxy_core_busy": cpu / wall}


def markdown(doc: dict[str, Any]) -> str:
    med, ratio = doc["summary"]["medians"], doc["summary"]["cpu_ratio"]
    quick = ", quick" if doc["quick"] else ""
    lines = [f"# HTTP/2 downstream (h2 over TLS), turnout vs HAProxy ({doc['date']}{quick})",
             "", f"Command: `{doc['command']}`. h2load -c 10 -m 100 (10 connections x 100 concurrent streams), "
             f"{doc['plan']['requests']} requests per run, {doc['plan']['rounds']} interleaved rounds, medians. "
             "Both proxies speak HTTP/1.1 to the same nginx backends (14-byte answers); proxy on core 1, h2load "
             "and nginx on core 0.", "",
             f"Machine load (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']}; compiled data plane: "
             f"{doc['machine']['compiled_dataplane']}.", "",
             "| proxy | req/s | CPU µs/req (user+sys) | proxy core busy |", "|---|---:|---:|---:|"]
    for name in ("turnout", "haproxy"):
        m = med[name]
        lines.append(f"| {name} | {m['rps']:.0f} | {m['cpu_us']:.1f} ({m['user_us']:.1f}+{m['sys_us']:.1f}) | "
                     f"{m['proxy_core_busy']:.2f} |")
    lines += [f"| turnout/HAProxy | {med['turnout']['rps'] / med['haproxy']['rps']:.2f}x | {ratio:.2f}x (target "
              f"<= {TARGET_CPU_RATIO}x: {'met' if ratio <= TARGET_CPU_RATIO else 'NOT met'}) | |", "", "Every run:", "",
              "| round | proxy | req/s | CPU µs/req | busy | failed |", "|---:|---|---:|---:|---:|---:|"]
    for run in doc["runs"]:
        lines.append(f"| {run['round']} | {run['proxy']} | {run['rps']:.0f} | {run['cpu_us']:.1f} | "
                     f"{run['proxy_core_busy']:.2f} | {run['failed']:.0f} |")
    return "\n".join(lines) + "\n"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="1 round of 2,000 requests: checks the script")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests = 1, 2000
    require_tools("h2load", "haproxy", "nginx", "taskset")
    if not compiled():
        print("warning: the data plane is not compiled; the numbers do not describe a release", flush=True)
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = [round(x, 2) for x in os.getloadavg()]
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-h2-"))
    runs: list[dict[str, Any]] = []
    by_proxy: dict[str, list[dict[str, float]]] = {"turnout": [], "haproxy": []}
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        cert, key, both = write_certificate(work)
        b = lab.start_backends()
        targets = [start_turnout_h2(lab, b, cert, key), start_haproxy_h2(lab, b, both)]
        for t in targets:  # warm-up
            await run_h2load(t.port, 2000, load_core)
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                m = await measure(t, args.requests, load_core)
                by_proxy[t.name].append(m)
                runs.append({"round": r, "proxy": t.name, **m})
                print(f"round {r} {t.name:8s} {m['rps']:8.0f} req/s  cpu {m['cpu_us']:6.1f} us  "
                      f"busy {m['proxy_core_busy']:.2f}  failed {m['failed']:.0f}  h2 {m['h2']:.0f}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = [round(x, 2) for x in os.getloadavg()]
    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in by_proxy.items()}
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-h2-benchmark/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.profile.h2", *sys.argv[1:]]),
           "machine": {**machine(), "proxy_core": proxy_core, "load_core": load_core},
           "plan": {"rounds": args.rounds, "requests": args.requests, "connections": 10, "streams": 100,
                    "haproxy_alpn": "h2,http/1.1"},
           "load_start": load_start, "load_end": load_end,
           "summary": {"medians": med, "cpu_ratio": round(med["turnout"]["cpu_us"] / med["haproxy"]["cpu_us"], 3),
                       "target_cpu_ratio_max": TARGET_CPU_RATIO}, "runs": runs}
    folder = args.out / f"h2-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "result.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {folder}")


if __name__ == "__main__":
    asyncio.run(main())
