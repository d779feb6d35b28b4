"""`python -m benchmarks [--quick] [--out DIR]`: turnout vs direct vs HAProxy vs nginx, in one run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.peers import Lab, Target, turnout_missing
from benchmarks.procs import Processes, cores, raise_nofile
from benchmarks.report import SCHEMA, chart, markdown, validate, write
from benchmarks.scenarios import FULL, QUICK, SCENARIOS, Context, Plan, Skip

# command -> Debian package that provides it
TOOLS = {"wrk": "wrk", "haproxy": "haproxy", "nginx": "nginx", "taskset": "util-linux"}


# Their rates are fractions of turnout's measured maximum.
NEEDS_THROUGHPUT = {"latency", "change_safety"}


def missing_tools() -> dict[str, str]:
    return {cmd: pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None
            and not Path(f"/usr/sbin/{cmd}").exists()}


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine(proxy_core: int | None, load_core: int | None, nofile: int) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "haproxy": _version(["haproxy", "-v"]).split(" - ")[0], "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]).split(" [")[0], "proxy_core": proxy_core, "load_core": load_core,
        "nofile_limit": nofile, "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def run(plan: Plan, work: Path, procs: Processes, log: Any, only: set[str] | None = None) -> dict[str, Any]:
    proxy_core, load_core = cores()
    nofile = raise_nofile()
    # The harness's own clients (pollers, open-loop generator, idle connections) share core 0 with wrk and
    # the backends, so the proxies alone own core 1.
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    if plan.idle_connections + 200 > nofile:
        plan = _replace(plan, idle_connections=max(100, nofile - 1000))
    lab = Lab(work, procs, proxy_core, load_core)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": plan.quick,
        "machine": machine(proxy_core, load_core, nofile), "plan": _plan_dict(plan), "scenarios": {},
    }
    started = time.perf_counter()
    log("starting backends and proxies")
    backends = lab.start_backends()
    direct = Target("direct", backends.v1)
    proxies = []
    turnout_skip = turnout_missing()
    turnout_status = "skipped"
    if turnout_skip is None:
        try:
            proxies.append(lab.start_turnout(backends))
        except Exception as e:
            turnout_skip, turnout_status = f"turnout serve failed to start: {e}", "failed"
    if turnout_skip:
        log(f"turnout: {turnout_skip}")
    proxies.append(lab.start_haproxy(backends))
    proxies.append(lab.start_nginx(backends))
    ctx = Context(plan, lab, work, log, backends, direct, proxies, turnout_skip, turnout_status)
    if only is not None and only & NEEDS_THROUGHPUT:
        only = only | {"throughput"}
    for name, scenario in SCENARIOS:
        if only is not None and name not in only:
            doc["scenarios"][name] = {"status": "skipped", "reason": "not selected (--only)"}
            continue
        log(f"{name}:")
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **await scenario(ctx)}
        except Skip as e:
            result = {"status": "skipped", "reason": str(e)}
            log(f"  skipped: {e}")
        except Exception as e:
            result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=4)}
            log(f"  failed: {type(e).__name__}: {e}")
        result["seconds"] = round(time.perf_counter() - t0, 1)
        doc["scenarios"][name] = result
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    # Another tenant's load shows here: compare with load_average_at_start before trusting a run.
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return doc


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {k: getattr(plan, k) for k in plan.__slots__}


def _replace(plan: Plan, **changes: Any) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


def _event_loop_runner() -> Any:
    # uvloop halves the harness's own per-request cost, leaving core 0 to the backends it shares it with.
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="every scenario briefly (under a minute): checks the harness, not the speed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (configs, logs)")
    parser.add_argument("--work", type=Path, help="work folder for configs and logs (default: a new temporary one)")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated scenarios to run (" + ", ".join(n for n, _ in SCENARIOS) + "); "
                        "latency and change_safety bring throughput along")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render the Markdown and PNG of a result")
    args = parser.parse_args(argv)

    if args.render is not None:
        doc = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(doc) + "\n")
        chart(doc, args.render.with_suffix(".png"))
        return 0

    missing = missing_tools()
    if missing:
        print("benchmarks: missing tools: " + ", ".join(sorted(missing)) + "\n"
              f"install them with: apt-get install -y {' '.join(sorted(set(missing.values())))}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = QUICK if args.quick else FULL
    only = None
    if args.only:
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = only - {n for n, _ in SCENARIOS}
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="turnout-bench-", dir=args.work))
    procs = Processes()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        doc = _event_loop_runner()(run(plan, work, procs, log, only))
    except KeyboardInterrupt:
        log("interrupted: stopping everything the benchmark started")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if args.keep_work:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    stem = doc["date"].replace(":", "").replace("-", "") + ("-quick" if plan.quick else "")
    if only is not None:
        stem += "-partial"
    paths = write(doc, args.out, stem, latest=not plan.quick and only is None)
    problems = validate(json.loads(paths[0].read_text()))
    for path in paths:
        log(f"wrote {path}")
    if problems:
        log("result is not well formed:\n  " + "\n  ".join(problems))
        return 1
    failed = [n for n, s in doc["scenarios"].items() if s["status"] == "failed"]
    if failed:
        log(f"failed scenarios: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
