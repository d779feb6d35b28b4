"""Profile a running turnout under wrk load with py-spy (installed anywhere; pass its path).

    .venv/bin/python -m benchmarks.profile.spy --py-spy /tmp/pyspy/bin/py-spy [--seconds 8] [--native]

Samples the event-loop thread only; prints the innermost Python function (or the system call when that
is the leaf) by share of samples, and inclusive shares. Wall-clock sampling: system calls look bigger than
their share of CPU time (a loopback write() also runs the receiver's side of TCP), so read it next to the
utime/stime split of benchmarks.profile.compare, and the Python-only numbers of benchmarks.profile.hotpath.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.load import run_wrk
from benchmarks.peers import Lab
from benchmarks.procs import Processes, cores, raise_nofile


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--py-spy", required=True)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    raise_nofile()
    proxy_core, load_core = cores()
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-spy-"))
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        t = lab.start_turnout(b)
        assert t.proc is not None
        await run_wrk(t.port, 1, work, load_core)
        out = work / "stacks.txt"
        argv = [args.py_spy, "record", "--pid", str(t.proc.popen.pid), "--duration", str(args.seconds),
                "--rate", "500", "--format", "raw", "--output", str(out)]
        if args.native:
            argv.append("--native")
        spy = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                   stderr=(work / "spy.log").open("w"))
        await run_wrk(t.port, args.seconds + 1, work, load_core)
        await asyncio.wait_for(spy.wait(), 60)
        if not out.exists():
            raise SystemExit("py-spy wrote nothing: " + (work / "spy.log").read_text()[-800:])
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            count = int(n)
            frames = stack.split(";")
            if not any("run_forever" in f for f in frames):
                continue  # other threads: idle waits
            # Own time by the innermost Python function, plus the system call when it is the leaf.
            py = [f for f in frames if ".py:" in f]
            leaf = frames[-1]
            frames = [*py, leaf.split(" (")[0] + " [native leaf]"] if py else frames
            total += count
            own[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
        print(f"{total} samples of the event loop thread; own time:")
        for f, n in own.most_common(args.top):
            print(f"  {n / total * 100:5.1f}%  {f}")
        print("inclusive:")
        for f, n in incl.most_common(args.top):
            print(f"  {n / total * 100:5.1f}%  {f}")
    finally:
        procs.stop_all()
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
