"""`python -m benchmarks.pin_writes [--pins N] [--changes N] [--etcd]`: cost of one pin change on a large route.

Not a test: prints, per store, the milliseconds per pin/unpin (store.update, i.e. what the admin API waits
for), the bytes the store keeps per change, and what a watching worker pays to read the change and
recompile the route table. A weight change is measured the same way for comparison.

SQLite bytes: the database file after a TRUNCATE checkpoint (so the WAL is folded in), growth divided by the
number of changes; plus the bytes this process wrote (/proc/self/io wchar: WAL frames and checkpoints).
etcd bytes: the sum of key and value sizes under the store's prefix, growth divided by the number of changes
(etcd keeps one copy of each key once compacted; the MVCC history before compaction is the same amount).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from proxy import changes
from proxy.parse import parse_document
from proxy.store import SQLiteStore, Store
from proxy.table import RouteTable

DOC = {
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}}],
}


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


async def seed(store: Store, pins: int) -> None:
    base = parse_document(DOC)
    await store.update(lambda s: changes.apply_document(s, base), actor="bench")
    route = base.route("web")
    assert route is not None
    pinned = dataclasses.replace(route, pins={f"client-{i:06d}": "v2" for i in range(pins)})
    await store.update(lambda s: changes.put_route(s, pinned), actor="bench")


Times = tuple[list[float], list[float], list[float], list[float]]


async def run_changes(store: Store, reader: Store, changes: int, kind: str) -> Times:
    """-> ms per store.update (wall, CPU), ms per read-back + table recompile in a second store, as a
    worker does (wall, CPU). CPU time (all threads of this process) is what a loaded machine distorts least."""
    writes: list[float] = []
    reads: list[float] = []
    writes_cpu: list[float] = []
    reads_cpu: list[float] = []
    table = RouteTable((await reader.current()).state)
    for i in range(changes):
        change: Callable[[changes.State], changes.Change]
        if kind == "pin":
            # Alternate pinning a new client and unpinning a seeded one: every change makes a pin set never
            # stored before (pin then unpin of the same client would return to a stored one).
            change = ((lambda s, i=i: changes.pin(s, "web", f"new-{i}", "v1")) if i % 2 == 0
                      else (lambda s, i=i: changes.unpin(s, "web", f"client-{i:06d}")))
        else:
            change = lambda s, i=i: changes.set_split(s, "web", {"v2": 11 + i % 50})  # noqa: E731
        t0, c0 = time.perf_counter(), time.process_time()
        await store.update(change, actor="bench")
        writes.append((time.perf_counter() - t0) * 1000)
        writes_cpu.append((time.process_time() - c0) * 1000)
        t0, c0 = time.perf_counter(), time.process_time()
        rev = await reader.current()
        table = RouteTable(rev.state, rev.number, table)
        reads.append((time.perf_counter() - t0) * 1000)
        reads_cpu.append((time.process_time() - c0) * 1000)
    return writes, writes_cpu, reads, reads_cpu


def db_bytes(path: str) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return os.path.getsize(path)


async def timed(label: str, changes: int, measure: Callable[[], Awaitable[int]],
                work: Callable[[], Awaitable[Times]]) -> None:
    before, w0 = await measure(), wchar()
    writes, writes_cpu, reads, reads_cpu = await work()
    after, w1 = await measure(), wchar()
    med = statistics.median
    print(f"  {label:7s} {med(writes):6.1f} ms/change ({med(writes_cpu):5.1f} ms CPU; medians)"
          f"  worker read+compile {med(reads):6.1f} ms ({med(reads_cpu):5.1f} ms CPU)"
          f"  stored {(after - before) / changes / 1024:9.1f} KiB/change"
          f"  written {(w1 - w0) / changes / 1024:9.1f} KiB/change")


async def bench_sqlite(pins: int, changes: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "state.db")
        store, reader = SQLiteStore(path), SQLiteStore(path)
        t0 = time.perf_counter()
        await seed(store, pins)
        print(f"sqlite, {pins} pins (seeded in {time.perf_counter() - t0:.1f} s, db {db_bytes(path) / 1e6:.1f} MB)")

        async def size() -> int:
            return db_bytes(path)

        for kind in ("weight", "pin"):
            await timed(kind, changes, size, lambda kind=kind: run_changes(store, reader, changes, kind))  # type: ignore[misc]
        print(f"  after {2 * changes} changes: db {db_bytes(path) / 1e6:.1f} MB")
        await store.close()
        await reader.close()


async def bench_etcd(pins: int, changes: int) -> None:
    import aetcd

    from proxy.store.etcd import GRPC_OPTIONS, EtcdStore
    from tests.etcd.etcd_server import EtcdServer

    with EtcdServer() as server:
        server.start()
        url = server.url("bench")
        store, reader = EtcdStore.from_url(url), EtcdStore.from_url(url)
        client = aetcd.Client(host="127.0.0.1", port=server.client_port, timeout=30, options=GRPC_OPTIONS)
        await client.connect()

        async def size() -> int:
            return sum(len(kv.key) + len(kv.value) for kv in await client.get_prefix(b"/bench/"))

        t0 = time.perf_counter()
        await seed(store, pins)
        print(f"etcd, {pins} pins (seeded in {time.perf_counter() - t0:.1f} s, {await size() / 1e6:.1f} MB of keys)")
        for kind in ("weight", "pin"):
            await timed(kind, changes, size, lambda kind=kind: run_changes(store, reader, changes, kind))  # type: ignore[misc]
        await client.close()
        await store.close()
        await reader.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pins", type=int, default=100_000)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--etcd", action="store_true", help="also measure etcd (needs /usr/bin/etcd)")
    args = p.parse_args()
    asyncio.run(bench_sqlite(args.pins, args.changes))
    if args.etcd:
        asyncio.run(bench_etcd(args.pins, args.changes))


if __name__ == "__main__":
    main()
