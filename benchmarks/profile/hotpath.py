"""The data plane's Python request path alone: fake transports, no sockets, no system calls.

Runs the benchmark route (sticky 90/10 by X-Client-Id, 10,000 pins, 100 client ids of which 10 pinned)
through ClientConnection/UpstreamConnection callbacks and reports microseconds per request.

    .venv/bin/python -m benchmarks.profile.hotpath [-n 200000] [--profile] [--zone]

--zone: the proxy runs in zone "a" and every endpoint is in zone "a" (the zone-aware pick, proxy.zones).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

import uvloop

from proxy.dataplane.downstream import ClientConnection
from proxy.dataplane.listener import DataPlane
from proxy.dataplane.upstream import UpstreamConnection
from proxy.model import IdentitySource, Match, Route, State, Version, VersionSpec
from proxy.settings import Settings
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 06:00:00 GMT\r\n" \
           b"Content-Type: text/plain\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\nv1 0123456789\n"


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.out: list[bytes] = []
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: Any) -> None:
        self.out.extend(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


def bench_table(zone: str | None = None) -> RouteTable:
    pins = {f"c{i}": "v2" for i in range(10)}
    for i in range(10, 10_000):
        pins[f"p{i:06d}"] = "v1" if i % 2 else "v2"
    versions = {n: Version(name=n, spec=VersionSpec(kind="static", endpoints=(u,)), endpoints=(u,),
                           zones=((u, zone),) if zone else ())
                for n, u in (("v1", "http://127.0.0.1:9001"), ("v2", "http://127.0.0.1:9002"))}
    route = Route(name="bench", match=Match(path_prefix="/"), identity=(IdentitySource("header", "x-client-id"),),
                  split=(("v1", 90.0), ("v2", 10.0)), sticky=True, pins=pins, fallback=("v1",))
    return RouteTable(State(versions=versions, routes=(route,)), 1)


async def run(n: int, profile: bool, zone: str | None = None) -> float:
    dp = DataPlane(Settings(zone=zone), TableHolder(bench_table(zone)), Stats())
    dp.table_changed(dp.holder.table)
    client = ClientConnection(dp)
    ct = FakeTransport()
    client.connection_made(ct)  # type: ignore[arg-type]
    ups: dict[str, tuple[UpstreamConnection, FakeTransport]] = {}
    for name, b in dp.backends.items():
        ep = b.endpoints[0]
        u = UpstreamConnection(dp, ep)
        t = FakeTransport()
        u.connection_made(t)  # type: ignore[arg-type]
        assert ep.put_idle(u, dp.pool_size, False)
        ups[name] = (u, t)
    reqs = [b"GET / HTTP/1.1\r\nHost: bench\r\nX-Client-Id: c%d\r\n\r\n" % i for i in range(100)]
    by_ep = {id(u.endpoint): (u, t) for u, t in ups.values()}
    conn_of = {ep: by_ep[id(ep)] for ep in dp.endpoints.values()}

    def one(i: int) -> None:
        client.data_received(reqs[i % 100])
        ex = client.queue[0]
        u, t = conn_of[ex.endpoint]  # type: ignore[index]
        u.data_received(RESPONSE)
        t.out.clear()
        ct.out.clear()

    for i in range(2000):
        one(i)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    for i in range(n):
        one(i)
    dt = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    await dp.health.close()
    return dt / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--zone", action="store_true", help="zone-aware: proxy and endpoints in zone a")
    args = ap.parse_args()
    results = []
    for _ in range(1 if args.profile else args.repeat):
        results.append(uvloop.run(run(args.n, args.profile, "a" if args.zone else None)))
    results.sort()
    print(f"us/request (incl. harness): min {results[0]:.2f} median {results[len(results) // 2]:.2f} "
          f"over {len(results)} runs of {args.n}")


if __name__ == "__main__":
    main()
