"""System calls per proxied request, turnout vs HAProxy, counted with `strace -f -c` on the same wrk run (#17).

    .venv/bin/python -m benchmarks.syscalls [--seconds 3] [--rounds 2] [--out DIR] [--quick]

Setup of the benchmark harness (nginx backends and wrk on core 0, the proxy under `taskset -c 1`, turnout
with the benchmark route: sticky 90/10 and 10,000 pins; HAProxy with the anchor config). For each proxy,
strace attaches to every process of its group (`-f -C`, the summary and every call of the traced kinds)
before wrk starts, so the accepted connections' setsockopt calls show too; then `wrk -t1 -c32` runs for
`--seconds`, and strace is detached. Calls per request = calls / requests wrk completed. strace slows the
traced process (several times): more requests share an event-loop wake-up than without it, so epoll_wait
per request is lower than untraced; the calls each request makes on its own (read, write, epoll_ctl) are
not. Also reported: the socket options each proxy sets on accepted and upstream sockets, and the sizes of
its reads. Writes `syscalls-<date>/syscalls.{json,md}` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.load import run_wrk
from benchmarks.peers import Lab, Target
from benchmarks.procs import Processes, _group_pids, cores, machine_load, raise_nofile, require_tools
from benchmarks.profile.tls import compiled

RESULTS = Path(__file__).resolve().parent / "results"
TRACED = ("epoll_ctl", "epoll_wait", "epoll_pwait", "read", "write", "readv", "writev", "recvfrom", "sendto",
          "recvmsg", "sendmsg", "setsockopt", "accept4", "connect", "close", "getsockopt", "getpeername",
          "getsockname", "fcntl", "ioctl", "socket")
_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)$")


def parse(log: str) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(calls by name from strace's summary, read sizes asked -> count, distinct setsockopt lines)."""
    calls: dict[str, int] = {}
    sizes: collections.Counter[str] = collections.Counter()
    opts: set[str] = set()
    in_summary = False
    for line in log.splitlines():
        if line.startswith("% time"):
            in_summary = True
            continue
        if in_summary:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                name = parts[-1]
                calls[name] = int(parts[3])
            continue
        m = _CALL.match(line)
        if m is None:
            continue
        name, rest = m.groups()
        if name in ("read", "recvfrom"):
            args = rest.split(", ")
            if len(args) >= 3:
                sizes[args[2].split(")")[0]] += 1
        elif name == "setsockopt":
            opts.add(re.sub(r"^\d+, ", "", rest.split(")")[0]))
    return calls, dict(sizes.most_common(6)), sorted(opts)


async def traced_run(t: Target, seconds: float, work: Path, core: int | None, tag: str) -> dict[str, Any]:
    assert t.proc is not None
    pids = _group_pids(t.proc.pgid)
    log = work / f"strace-{tag}.log"
    argv = ["strace", "-f", "-C", "-o", str(log), "-e", "trace=" + ",".join(TRACED)]
    for p in pids:
        argv += ["-p", str(p)]
    st = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                              stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)  # attached (strace prints nothing when it is; a second is ample)
    try:
        w = await run_wrk(t.port, seconds, work, core)
    finally:
        st.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(st.communicate(), 30)
    calls, sizes, opts = parse(log.read_text(errors="replace"))
    n = max(w.requests, 1)
    return {"requests": w.requests, "rps_traced": round(w.rps, 1), "non_2xx": w.non_2xx,
            "socket_errors": w.socket_errors, "calls": calls,
            "per_request": {k: round(v / n, 3) for k, v in sorted(calls.items())},
            "read_sizes": sizes, "setsockopt": opts, "strace_stderr": err.decode(errors="replace")[-300:]}


def markdown(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    names = sorted({k for r in runs for k in r["per_request"]})
    lines = [f"# System calls per request, turnout vs HAProxy ({doc['date']}{', quick' if doc['quick'] else ''})",
             "", f"Command: `{doc['command']}`. `strace -f -C` attached to the proxy's process group during "
             f"`wrk -t1 -c32` of {doc['plan']['seconds']:g} s; calls / requests. Compiled data plane: "
             f"{doc['machine']['compiled_dataplane']}. Machine load at start {doc['load_start']}, at end "
             f"{doc['load_end']}.", "",
             "| call | " + " | ".join(f"{r['proxy']} (round {r['round']})" for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['per_request'].get(name, 0):.3f}" for r in runs) + " |")
    lines.append("| requests (traced) | " + " | ".join(f"{r['requests']:,}" for r in runs) + " |")
    lines += ["", "Read sizes asked (bytes: calls), first round:", ""]
    for r in runs:
        if r["round"] == 0:
            lines.append(f"- {r['proxy']}: " + ", ".join(f"{k}: {v:,}" for k, v in r["read_sizes"].items()))
    lines += ["", "setsockopt calls seen (distinct; the fd stripped), first round:", ""]
    for r in runs:
        if r["round"] == 0:
            lines.append(f"- {r['proxy']}: " + ("; ".join(f"`{o}`" for o in r["setsockopt"]) or "none"))
    return "\n".join(lines) + "\n"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    require_tools("wrk", "haproxy", "nginx", "taskset", "strace")
    raise_nofile()
    proxy_core, load_core = cores()
    load_start = machine_load("start")
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-syscalls-"))
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        targets = [lab.start_turnout(b), lab.start_haproxy(b)]
        for t in targets:
            await run_wrk(t.port, 1, work, load_core)
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                res = await traced_run(t, args.seconds, work, load_core, f"{t.name}-{r}")
                runs.append({"round": r, "proxy": t.name, **res})
                pr = res["per_request"]
                print(f"round {r} {t.name:8s} {res['requests']:7d} req  " + "  ".join(
                    f"{k} {pr.get(k, 0):.2f}" for k in ("epoll_ctl", "epoll_wait", "read", "recvfrom", "write",
                                                          "sendto", "writev")), flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    load_end = machine_load("end")
    now = dt.datetime.now(dt.UTC)
    doc = {"schema": "turnout-syscalls/1", "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "command": " ".join(["python -m benchmarks.syscalls", *sys.argv[1:]]),
           "machine": {"cores": os.cpu_count(), "compiled_dataplane": compiled()},
           "plan": {"seconds": args.seconds, "rounds": args.rounds, "connections": 32},
           "load_start": load_start, "load_end": load_end, "runs": runs}
    folder = args.out / f"syscalls-{now.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "syscalls.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (folder / "syscalls.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {folder}/syscalls.json, .md")


if __name__ == "__main__":
    asyncio.run(main())
