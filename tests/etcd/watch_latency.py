"""Measure how long a commit on one EtcdStore takes to arrive in another's watch (two "replicas").

Not a test (speed lives outside assertions):
`python -m tests.etcd.watch_latency [--trials 200] [--pins N] [--loop uvloop|asyncio]`.
Starts its own etcd on loopback, runs a bounded number of trials one after another, prints p50/p90/p99/max.
A trial: writer.commit() starts -> reader's watch yields that revision. Also reported: the commit alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import sys
import time

import uvloop

from proxy import changes
from proxy.parse import parse_document
from proxy.store.etcd import EtcdStore

from .etcd_server import EtcdServer

DOC = {
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}}],
}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return (f"{name}: n={len(ms)} p50={pct(ms, 50):.2f} ms p90={pct(ms, 90):.2f} ms p99={pct(ms, 99):.2f} ms "
            f"max={max(ms):.2f} ms mean={statistics.fmean(ms):.2f} ms")


async def follow(url: str, after: int) -> None:
    """Reader side in its own process: print "number perf_counter" per revision the watch delivers.

    perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine, so times compare.
    """
    reader = EtcdStore.from_url(url)
    print("ready", flush=True)
    async for r in reader.watch(after):
        print(r.number, time.perf_counter(), flush=True)


async def measure(server: EtcdServer, trials: int, pins: int, separate: bool) -> tuple[list[float], list[float]]:
    url = server.url("latency")
    writer = EtcdStore.from_url(url)
    base = parse_document(DOC)
    if pins:
        route = base.route("web")
        assert route is not None
        base = changes.put_route(base, dataclasses.replace(route, pins={f"c{i}": "v2" for i in range(pins)}))[0]
    rev = await writer.update(lambda s: changes.apply_document(s, base), actor="bench")
    arrivals: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    reader: EtcdStore | None = None
    if separate:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.etcd.watch_latency", "--follow", url, "--after", str(rev.number),
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        out = proc.stdout
        assert (await asyncio.wait_for(out.readline(), 30)).strip() == b"ready"

        async def pump() -> None:
            while line := await out.readline():
                number, t = line.split()
                arrivals.put_nowait((int(number), float(t)))

        task = asyncio.create_task(pump())
    else:
        reader = EtcdStore.from_url(url)

        async def watch_here() -> None:
            assert reader is not None
            async for r in reader.watch(rev.number):
                arrivals.put_nowait((r.number, time.perf_counter()))

        task = asyncio.create_task(watch_here())
    await asyncio.sleep(0.5)  # let the watch stream be established before the first trial
    delivery: list[float] = []
    commit_only: list[float] = []
    state = rev.state
    try:
        for i in range(trials):
            state = changes.set_split(state, "web", {"v1": 100 - (i % 50), "v2": i % 50 + 1})[0]
            t0 = time.perf_counter()
            rev = await writer.commit(state, expected=rev.number, actor="bench", reason="", summary="bench",
                                      routes=("web",))
            commit_only.append((time.perf_counter() - t0) * 1000)
            number, arrived = await asyncio.wait_for(arrivals.get(), 10)
            assert number == rev.number, (number, rev.number)
            delivery.append((arrived - t0) * 1000)
    finally:
        task.cancel()
        if proc is not None:
            proc.terminate()
            await proc.wait()
        if reader is not None:
            await reader.close()
        await writer.close()
    return delivery, commit_only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--pins", type=int, default=0, help="pins in the route (unchanged by the trials)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="uvloop is what serve runs on")
    p.add_argument("--reader", choices=("process", "same"), default="process",
                   help="watch from another process (like another replica) or from this one")
    p.add_argument("--follow", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--after", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            run(follow(args.follow, args.after))
        return
    with EtcdServer() as server:
        delivery, commit_only = run(measure(server, args.trials, args.pins, args.reader == "process"))
    print(f"{args.trials} trials, reader in {'another' if args.reader == 'process' else 'the same'} process, "
          f"{args.loop}, {args.pins} pins")
    print(summary("commit start -> other replica's watch yields it", delivery))
    print(summary("commit alone (durable)", commit_only))


if __name__ == "__main__":
    main()
