"""User-space instructions per proxied request of the whole proxy process: turnout, HAProxy, nginx and the
floor of a Python proxy on uvloop, counted by callgrind on the same requests (#17).

    .venv/bin/python -m benchmarks.profile.instructions [--requests 20000] [--connections 8] [--out DIR] [--quick]

Seconds on a shared 2-core machine move with the load; instruction counts do not. benchmarks.profile.hotpath
counts turnout's Python path alone with fake transports; this counts everything a proxy process executes in
user space for a request, uvloop/libuv and libc included, so turnout and the C proxies are compared
like for like. For each target: nginx backends as in the harness (not traced); the proxy started under
`valgrind --tool=callgrind` (one process: turnout `--workers 1`, HAProxy's one thread, nginx with
`master_process off`); a warm-up of 2,000 requests; `callgrind_control -z` (counters to zero); `--requests`
requests from `--connections` keep-alive connections (the benchmark request: Host bench, X-Client-Id cycling
over the harness's 100 client ids, so turnout takes its sticky and pin paths as under wrk); a dump; then as
many seconds idle as the requests took, and a second dump. Instructions per request =
(Ir of the first dump - Ir of the second) / requests: what the process does per second whatever the
traffic (timers, the sweeper, metrics upkeep) cancels out, since under callgrind the requests take ~50x longer
than they would and that would otherwise be charged to them. The breakdown is by object file (the
interpreter, uvloop, httptools' llhttp, turnout's compiled modules, libc) and the top functions by self cost.
Kernel time is not here (callgrind sees user space only): benchmarks.syscalls counts the calls, benchmarks.gap
the CPU seconds. Targets: turnout, haproxy, nginx, floor (benchmarks.profile.floor: bytes through, nothing
else), floor-parse (the same with llhttp parsing both directions), and both again on
asyncio.BufferedProtocol (floor-buffered, floor-parse-buffered: reads into one shared buffer, no bytes object
per read).
Writes `instructions-<date>/instructions.{json,md,png}` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import benchmarks.peers as peers
from benchmarks.load import _connect, request_bytes
from benchmarks.peers import Backends, Lab
from benchmarks.procs import Proc, Processes, free_port, machine_load, require_tools, wait_http, wait_port
from benchmarks.profile import floor
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGETS = ("turnout", "haproxy", "nginx", *floor.VARIANTS)


class ExactLoad:
    """`n` requests over `c` keep-alive connections, each response checked: 200, or counted as an error."""

    def __init__(self, port: int, n: int, c: int, path: str = "/") -> None:
        self.port, self.n, self.c = port, n, c
        self.sent = self.ok = self.errors = 0
        self.reqs = [request_bytes(f"c{i}", path) for i in range(peers.TRAFFIC_CLIENTS)]
        self.done: asyncio.Future[None] | None = None

    def _next(self, conn: Any) -> None:
        if self.sent < self.n:
            conn.send(self.reqs[self.sent % len(self.reqs)], 0.0)
            self.sent += 1

    def on_response(self, conn: Any, status: int, body: bytes) -> None:
        if status == 200:
            self.ok += 1
        else:
            self.errors += 1
        if self.ok + self.errors >= self.n:
            if self.done is not None and not self.done.done():
                self.done.set_result(None)
            return
        self._next(conn)

    def on_lost(self, conn: Any) -> None:
        if conn.busy:
            self.errors += 1
            if self.ok + self.errors >= self.n and self.done is not None and not self.done.done():
                self.done.set_result(None)

    async def run(self, timeout: float) -> float:
        self.done = asyncio.get_running_loop().create_future()
        conns = [await _connect(self, self.port) for _ in range(self.c)]
        t0 = time.perf_counter()
        for conn in conns:
            self._next(conn)
        try:
            await asyncio.wait_for(self.done, timeout)
        finally:
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        return time.perf_counter() - t0


def callgrind(out: Path, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--collect-atstart=yes", *argv]


def control(proc: Proc, *flags: str) -> None:
    subprocess.run(["callgrind_control", *flags, str(proc.popen.pid)], check=True, capture_output=True,
                   timeout=120)


def start(lab: Lab, b: Backends, name: str, work: Path) -> tuple[Proc, int]:
    run = work / name
    run.mkdir()
    port = free_port()
    out = run / "callgrind.out"
    if name == "turnout":
        routes = lab.write_routes(b, 10_000, run)
        # Under callgrind the loop runs ~50x slower: a 100 MB body keeps it busy past the default 1 s check
        # timeout, and a failed check would take the endpoint out (503s). The checks keep their interval.
        doc = json.loads(routes.read_text())
        for v in doc["versions"].values():
            v["health"] = {"timeout": 120}
        routes.write_text(json.dumps(doc))
        admin = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
                "--store", f"sqlite:///{run / 'state.db'}", "--listen", f"127.0.0.1:{port}",
                "--admin", f"127.0.0.1:{admin}", "--workers", "1", "--shutdown-grace", "1",
                "--state-dir", str(run)]
        env = dict(peers.os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN="x" * 32,
                   PYTHONPATH=str(peers.REPO))
        proc = lab.procs.start(name, callgrind(out, argv), run / "stdout.log", env=env, cwd=peers.REPO)
        wait_http(proc, port, 300.0, headers={"X-Client-Id": "ready"})
        wait_port(proc, admin, 300.0)
    elif name == "haproxy":
        text = peers.render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                            V2=f"127.0.0.1:{b.v2}", RUN=str(run))
        (run / "haproxy.cfg").write_text(text)
        proc = lab.procs.start(name, callgrind(out, ["haproxy", "-db", "-f", str(run / "haproxy.cfg")]),
                               run / "stdout.log")
        wait_http(proc, port, 120.0)
    elif name == "nginx":
        text = peers.render("nginx.conf.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                            V2=f"127.0.0.1:{b.v2}", RUN=str(run))
        # One process, in the foreground, so callgrind traces the process that serves.
        text = "master_process off;\n" + text.replace("daemon on;", "").replace("daemon off;", "")
        text = "daemon off;\n" + text
        (run / "nginx.conf").write_text(text)
        proc = lab.procs.start(name, callgrind(out, ["nginx", "-c", str(run / "nginx.conf"),
                                                     "-e", str(run / "nginx.err")]), run / "stdout.log")
        wait_http(proc, port, 120.0)
    else:
        proc = lab.procs.start(name, callgrind(out, floor.command(name, port, b.v1)), run / "stdout.log",
                               cwd=peers.REPO, env=dict(peers.os.environ, PYTHONPATH=str(peers.REPO)))
        wait_http(proc, port, 120.0)
    return proc, port


def dumps(run: Path) -> list[Path]:
    """The dump files of one run, in order (callgrind numbers them .1, .2, ...; the exit dump has none)."""
    numbered = [p for p in run.glob("callgrind.out*") if re.search(r"\.\d+$", p.name)]
    return sorted(numbered, key=lambda p: int(p.name.rsplit(".", 1)[1]))


def _name(table: dict[str, str], value: str) -> str:
    """A compressed callgrind name: "(7) name" defines id 7, "(7)" refers back to it."""
    if value.startswith("("):
        ref, _, rest = value.partition(")")
        if rest.strip():
            table[ref] = rest.strip()
        return table.get(ref, value)
    return value


def costs(path: Path) -> tuple[int, dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(total Ir, {(object, function): self Ir}, {(object, function): inclusive Ir}) read from a callgrind
    file itself. The cost line after a `calls=` line is the callee's inclusive cost: it counts toward the
    caller's inclusive cost, not its self cost (callgrind_annotate also shows the functions still on the
    stack at a mid-run dump with their inclusive cost as if it were their own, which this avoids)."""
    obs: dict[str, str] = {}
    fns: dict[str, str] = {}
    ob = fn = "?"
    total = 0
    own: dict[tuple[str, str], int] = defaultdict(int)
    incl: dict[tuple[str, str], int] = defaultdict(int)
    call = False
    with open(path, errors="replace") as f:
        for line in f:
            c = line[0] if line else ""
            if c.isdigit() or c in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    ir = int(parts[1])
                    incl[(ob, fn)] += ir
                    if not call:
                        own[(ob, fn)] += ir
                call = False
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key == "ob":
                ob = Path(_name(obs, value)).name
            elif key == "fn":
                fn = _name(fns, value)
            elif key == "cob":
                _name(obs, value)
            elif key == "cfn":
                _name(fns, value)
            elif key == "calls":
                call = True
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split(":")[1].split()[0])
    return total, dict(own), dict(incl)


def family(obj: str) -> str:
    """An object file's part of the stack, for the breakdown."""
    if obj.startswith("python3") or obj.startswith("libpython"):
        return "CPython (interpreter, objects, allocator)"
    if obj.startswith("loop.cpython"):
        return "uvloop + libuv"
    if obj.startswith("parser.cpython") or obj.startswith("url_parser"):
        return "httptools (llhttp + callbacks)"
    if "__mypyc" in obj or obj.startswith(("proxy", "dataplane")) or "mypyc" in obj:
        return "turnout (mypyc-compiled)"
    if obj.startswith(("libc.so", "libc-", "ld-linux", "libm.so")):
        return "libc"
    if obj in ("haproxy", "nginx"):
        return obj
    if obj.startswith(("libssl", "libcrypto")):
        return "OpenSSL"
    return "other"


async def measure(lab: Lab, b: Backends, name: str, work: Path, n: int, c: int, path: str) -> dict[str, Any]:
    proc, port = start(lab, b, name, work)
    run = work / name
    try:
        await ExactLoad(port, 2000, c).run(600.0)
        control(proc, "-z")
        load = ExactLoad(port, n, c, path)
        took = await load.run(1800.0)
        control(proc, "-d")
        await asyncio.sleep(took)
        control(proc, "-d")
    finally:
        lab.procs.stop(proc)
    files = dumps(run)
    if len(files) < 2:
        raise RuntimeError(f"{name}: expected two callgrind dumps in {run}, found {[p.name for p in files]}")
    busy_total, busy, busy_incl = costs(files[-2])
    idle_total, idle, idle_incl = costs(files[-1])
    per = (busy_total - idle_total) / n
    fns = {k: (busy.get(k, 0) - idle.get(k, 0)) / n for k in set(busy) | set(idle)}
    # turnout's own functions (mypyc names them CPyDef_<module>___<Class>___<method>) with what they call:
    # the request's steps, each with its whole cost.
    steps = {k: (busy_incl.get(k, 0) - idle_incl.get(k, 0)) / n for k in busy_incl
             if k[1].startswith("CPyDef_") and "__mypyc" in k[0]}
    top_steps = sorted(steps.items(), key=lambda kv: -kv[1])[:25]
    fam: dict[str, float] = defaultdict(float)
    for (obj, _fn), ir in fns.items():
        fam[family(obj)] += ir
    top = sorted(fns.items(), key=lambda kv: -kv[1])[:20]
    return {"target": name, "requests": n, "ok": load.ok, "errors": load.errors, "seconds_traced": round(took, 2),
            "ir_busy": busy_total, "ir_idle": idle_total, "ir_per_request": round(per, 1),
            "by_family": {k: round(v, 1) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
            "top": [{"object": o, "function": f, "ir_per_request": round(v, 1)} for (o, f), v in top],
            "steps": [{"function": f.removeprefix("CPyDef_"), "inclusive_ir_per_request": round(v, 1)}
                      for (_o, f), v in top_steps]}


def markdown(doc: dict[str, Any]) -> str:
    rows = {r["target"]: r for r in doc["results"]}
    ha = rows.get("haproxy", {}).get("ir_per_request")
    lines = [f"# User-space instructions per request, whole proxy process ({doc['date']}"
             f"{', quick' if doc['quick'] else ''})", "",
             f"Command: `{doc['command']}`. callgrind on each proxy process; {doc['plan']['requests']:,} "
             f"requests for `{doc['plan'].get('path', '/')}` over {doc['plan']['connections']} keep-alive connections "
             "after a 2,000-request warm-up; "
             "the same seconds idle subtracted (the method is in benchmarks/profile/instructions.py). "
             f"Compiled data plane: {doc['machine']['compiled_dataplane']}. Machine load at start "
             f"{doc['machine']['load_start']}, at end {doc['machine']['load_end']} (counts do not depend on it).",
             "", "| target | instructions/request | vs HAProxy | answered 200 | errors |",
             "|---|---:|---:|---:|---:|"]
    for r in doc["results"]:
        ratio = f"{r['ir_per_request'] / ha:.2f}x" if ha else "-"
        lines.append(f"| {r['target']} | {r['ir_per_request']:,.0f} | {ratio} | {r['ok']:,} | {r['errors']} |")
    families = sorted({f for r in doc["results"] for f in r["by_family"]})
    lines += ["", "## By part of the stack (instructions per request)", "",
              "| part | " + " | ".join(r["target"] for r in doc["results"]) + " |",
              "|---|" + "---:|" * len(doc["results"])]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(f"{r['by_family'].get(f, 0):,.0f}" for r in doc["results"]) + " |")
    for r in doc["results"]:
        lines += ["", f"## {r['target']}: top functions (self cost per request)", "",
                  "| # | Ir/request | object | function |", "|---:|---:|---|---|"]
        for i, t in enumerate(r["top"], 1):
            lines.append(f"| {i} | {t['ir_per_request']:,.0f} | `{t['object']}` | `{t['function'][:90]}` |")
        if r.get("steps"):
            lines += ["", f"## {r['target']}: its compiled functions with everything they call (inclusive, per "
                      "request; nested, so they do not add up)", "", "| # | Ir/request | function |", "|---:|---:|---|"]
            for i, t in enumerate(r["steps"], 1):
                lines.append(f"| {i} | {t['inclusive_ir_per_request']:,.0f} | `{t['function'][:100]}` |")
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    families = sorted({f for r in results for f in r["by_family"]},
                      key=lambda f: -max(r["by_family"].get(f, 0) for r in results))
    fig, ax = plt.subplots(figsize=(11.5, 4.8))
    left = [0.0] * len(results)
    for f in families:
        vals = [max(r["by_family"].get(f, 0), 0) for r in results]
        ax.barh([r["target"] for r in results], vals, left=left, label=f)
        left = [a + v for a, v in zip(left, vals, strict=False)]
    for i, r in enumerate(results):
        ax.text(left[i], i, f"  {r['ir_per_request']:,.0f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("user-space instructions per proxied request (callgrind)")
    ax.set_title("Where a request's instructions go: turnout, the Python floor, HAProxy, nginx")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlim(0, max(left) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    require_tools("valgrind", "callgrind_control", "nginx", "haproxy")
    start_load = machine_load("start")
    work = Path(tempfile.mkdtemp(prefix="turnout-instr-"))
    procs = Processes()
    results = []
    try:
        lab = Lab(work, procs, None, None)
        b = lab.start_backends()
        for name in args.targets.split(","):
            print(f"instructions: {name} under callgrind, {args.requests:,} requests ...", flush=True)
            r = await measure(lab, b, name, work, args.requests, args.connections, args.path)
            print(f"instructions: {name}: {r['ir_per_request']:,.0f} per request "
                  f"({r['ok']:,} answered 200, {r['errors']} errors, {r['seconds_traced']} s)", flush=True)
            results.append(r)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    date = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {"date": date, "quick": args.quick, "command": "python -m benchmarks.profile.instructions "
           + " ".join(sys.argv[1:]), "plan": {"requests": args.requests, "connections": args.connections,
                                                       "path": args.path},
           "machine": {"compiled_dataplane": compiled(), "load_start": start_load,
                       "load_end": machine_load("end")},
           "results": results}
    out = args.out / f"instructions-{date}{'-quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "instructions.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "instructions.md").write_text(markdown(doc))
    chart(doc, out / "instructions.png")
    print(f"instructions: wrote {out}")
    bad = [r["target"] for r in results if r["errors"]]
    if bad:
        print(f"instructions: errors answered by {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--path", default="/", help="what the measured requests ask for (the backends also serve "
                    "/big, 100 MB of zeros; the warm-up always asks for /)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="500 requests: checks the harness, not comparable")
    args = ap.parse_args()
    if args.quick:
        args.requests = 500
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
