"""Interleaved CPU-per-request comparison: turnout trees (e.g. a baseline checkout and the work tree) vs HAProxy.

    .venv/bin/python -m benchmarks.profile.compare [--base DIR] [--rounds 3] [--seconds 5]

Same method as the benchmark harness (README, "The benchmark harness"): nginx backends and wrk on core 0, each proxy
under `taskset -c 1`, the benchmark route (sticky 90/10, 10,000 pins); per run, utime+stime of the proxy's
process group from /proc before and after, divided by the requests wrk completed. Prints every run and the
medians. `--base DIR` adds a second turnout started from another source tree (`git archive HEAD | tar -x`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import benchmarks.peers as peers
from benchmarks.load import run_wrk
from benchmarks.peers import Lab, Target
from benchmarks.procs import Processes, cores, raise_nofile


def start_turnout_from(lab: Lab, b: peers.Backends, tree: Path, name: str) -> Target:
    saved = peers.REPO
    peers.REPO = tree  # start_turnout runs `python -m proxy` with PYTHONPATH and cwd set to REPO
    try:
        return lab.start_turnout(b, name=name)
    finally:
        peers.REPO = saved


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    raise_nofile()
    proxy_core, load_core = cores()
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="turnout-compare-"))
    try:
        lab = Lab(work, procs, proxy_core, load_core)
        b = lab.start_backends()
        targets = [lab.start_haproxy(b), start_turnout_from(lab, b, peers.REPO, "turnout")]
        if args.base is not None:
            targets.append(start_turnout_from(lab, b, args.base.resolve(), "base"))
        results: dict[str, list[tuple[float, float, float, float]]] = {t.name: [] for t in targets}
        for t in targets:  # warm-up
            await run_wrk(t.port, 1, work, load_core)
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for t in order:
                assert t.proc is not None
                before = t.proc.cpu()
                w = await run_wrk(t.port, args.seconds, work, load_core)
                after = t.proc.cpu()
                n = max(w.requests, 1)
                user = (after.user - before.user) / n * 1e6
                system = (after.system - before.system) / n * 1e6
                results[t.name].append((w.rps, user, system, user + system))
                print(f"round {r} {t.name:8s} {w.rps:8.0f} req/s  user {user:5.1f}  sys {system:5.1f}  "
                      f"total {user + system:5.1f} us/req  non2xx {w.non_2xx} errors {w.socket_errors}", flush=True)
        print("medians:")
        hap = statistics.median(x[3] for x in results["haproxy"])
        hap_rps = statistics.median(x[0] for x in results["haproxy"])
        for name, rs in results.items():
            rps, user, system, total = (statistics.median(x[i] for x in rs) for i in range(4))
            print(f"  {name:8s} {rps:8.0f} req/s ({rps / hap_rps:.2f}x)  user {user:5.1f}  sys {system:5.1f}  "
                  f"total {total:5.1f} us/req ({total / hap:.2f}x HAProxy)")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    asyncio.run(main())
