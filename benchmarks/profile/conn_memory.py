"""What one idle keep-alive client connection holds in turnout's Python heap, by allocation site.

    .venv/bin/python -m benchmarks.profile.conn_memory [-n 5000] [--top 15]

Fake transports (as benchmarks.profile.hotpath), so this counts the data plane's own objects: the
connection, its parser, its queue and caches after one request was answered. uvloop's transport and
libuv handle (allocated by uvloop, not here) are measured separately with `--uvloop`: n real loopback
connections accepted by a protocol that holds nothing, the tracemalloc difference per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import socket
import tracemalloc
from typing import Any

import uvloop

from benchmarks.profile.hotpath import RESPONSE, FakeTransport, bench_table
from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.listener import DataPlane
from proxy.dataplane.upstream import UpstreamConnection
from proxy.settings import Settings
from proxy.table import TableHolder
from proxy.telemetry.stats import Stats


async def dataplane_bytes(n: int, top: int) -> float:
    dp = DataPlane(Settings(), TableHolder(bench_table()), Stats())
    dp.table_changed(dp.holder.table)
    ups: dict[int, UpstreamConnection] = {}
    for b in dp.backends.values():
        ep = b.endpoints[0]
        u = UpstreamConnection(dp, ep)
        u.connection_made(FakeTransport())  # type: ignore[arg-type]
        assert ep.put_idle(u, dp.pool_size, False)
        ups[id(ep)] = u
    conns: list[ClientConnection] = []

    def one(i: int) -> None:
        c = ClientConnection(dp)
        c.connection_made(FakeTransport(("127.0.0.1", 40000 + i % 20000)))  # type: ignore[arg-type]
        c.data_received(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Client-Id: c%d\r\n\r\n" % (i % 100))
        ex = c.queue[0]
        ups[id(ex.endpoint)].data_received(RESPONSE)
        c.transport.out.clear()  # type: ignore[union-attr]
        conns.append(c)

    for i in range(200):  # warm caches that do not grow with connections
        one(i)
    gc.collect()
    tracemalloc.start(8)
    before = tracemalloc.take_snapshot()
    for i in range(n):
        one(i)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"data plane objects: {total / n:.0f} bytes per connection over {n} connections")
    for s in stats[:top]:
        frames = [f for f in s.traceback if "/proxy/" in f.filename or "/benchmarks/" in f.filename] or list(
            s.traceback)
        f = frames[-1]
        print(f"  {s.size_diff / n:7.1f} B/conn  {f.filename.split('/wt/perf/')[-1]}:{f.lineno}")
    await dp.health.close()
    return total / n


class Holder(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


async def uvloop_bytes(n: int) -> float:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Holder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients: list[socket.socket] = []
    gc.collect()
    tracemalloc.start(4)
    before = tracemalloc.take_snapshot()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        clients.append(s)
        if len(clients) % 100 == 0:
            await asyncio.sleep(0.01)
    for _ in range(50):
        await asyncio.sleep(0.02)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # The client sockets are the harness's: take them out by their allocation site.
    stats = [s for s in after.compare_to(before, "traceback") if "conn_memory" not in s.traceback[-1].filename
             or "Holder" in str(s.traceback)]
    total = sum(s.size_diff for s in stats)
    print(f"uvloop accepted transport + protocol: {total / n:.0f} bytes per connection over {n}")
    for s in stats[:8]:
        print(f"  {s.size_diff / n:7.1f} B/conn  {s.traceback[-1].filename}:{s.traceback[-1].lineno}")
    for s in clients:
        s.close()
    server.close()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    result: Any = uvloop.run(uvloop_bytes(args.n) if args.uvloop else dataplane_bytes(args.n, args.top))
    del result


if __name__ == "__main__":
    main()
