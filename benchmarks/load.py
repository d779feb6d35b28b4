"""Load generators and clients: wrk (closed loop), a constant-rate open-loop generator, idle keep-alive
connections, a slow reader, and pollers that notice which version serves them.

Why an own open-loop generator instead of `hey -q`: hey prints latencies in whole 0.1 ms steps (too coarse
for a loopback proxy that adds tens of microseconds), its per-worker rate limit waits for the previous
response before the next tick (a slow response silently delays the following requests: coordinated
omission), and its CSV output drops failed requests. This one schedules request i at t0 + i/rate on a
fixed pool of keep-alive connections, queues a request when every connection is busy, and measures each
latency from the *intended* send time (like wrk2), so queueing shows up in the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools

from benchmarks.peers import TRAFFIC_CLIENTS
from benchmarks.procs import pinned

WRK_SCRIPT = """
-- Cycles through %(n)d prebuilt requests with distinct client ids (turnout's sticky split and pins see
-- real clients; HAProxy, nginx and the backend ignore the header). done() prints one JSON line.
local reqs = {}
local i = 0
init = function(args)
  for n = 0, %(n)d - 1 do
    reqs[n] = wrk.format("GET", "/", {["Host"] = "bench", ["X-Client-Id"] = "c" .. n})
  end
end
request = function()
  i = (i + 1) %% %(n)d
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def request_bytes(client: str, path: str = "/", close: bool = False) -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-Client-Id: {client}\r\n{conn}\r\n".encode()


TRAFFIC = tuple(request_bytes(f"c{i}") for i in range(TRAFFIC_CLIENTS))
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux; named in Python >= 3.12


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN for none."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


# wrk (closed loop)

@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    socket_errors: int
    non_2xx: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class WrkError(RuntimeError):
    pass


async def run_tool(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run a load tool to its end (killed after `timeout` s): its exit status and its output, stderr included."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(errors="replace")


async def run_wrk(port: int, seconds: float, work: Path, core: int | None, connections: int = 32,
                  scheme: str = "http") -> WrkResult:
    script = work / "bench.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % {"n": TRAFFIC_CLIENTS})
    argv = pinned(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script),
                   f"{scheme}://127.0.0.1:{port}/"], core)
    returncode, text = await run_tool(argv, seconds + 30)
    m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.M)
    if returncode != 0 or m is None:
        raise WrkError(f"wrk exited {returncode}: {text[-500:]}")
    d = json.loads(m.group(1))
    return WrkResult(requests=d["requests"], seconds=d["duration_us"] / 1e6,
                     socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"], non_2xx=d["status"],
                     p50_ms=d["p50_us"] / 1000, p99_ms=d["p99_us"] / 1000)


# HTTP/1.1 client protocol shared by the generators

class _Conn(asyncio.Protocol):
    """One keep-alive client connection; `owner.on_response/on_lost` decide what happens next."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.started = 0.0  # intended send time of the request in flight
        self.body = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, started: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.started = started
        self.body = b""
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.abort()

    def on_body(self, body: bytes) -> None:
        if len(self.body) < 16:
            self.body += body[:16]

    def on_message_complete(self) -> None:
        self.busy = False
        self.owner.on_response(self, self.parser.get_status_code(), self.body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.on_lost(self)


async def _connect(owner: Any, port: int, source: str | None = None) -> _Conn:
    loop = asyncio.get_running_loop()
    if source is None:
        _, proto = await loop.create_connection(lambda: _Conn(owner), "127.0.0.1", port)
        return proto
    # From another loopback address (127.0.0.2, ...): the ~28,000 ephemeral ports run out per (source,
    # destination) pair, not per machine. IP_BIND_ADDRESS_NO_PORT defers the port choice to connect().
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        _, proto = await loop.create_connection(lambda: _Conn(owner), sock=sock)
    except BaseException:
        sock.close()
        raise
    return proto


# Open loop at a constant rate

@dataclass
class OpenLoopResult:
    rate: float
    seconds: float
    sent: int = 0
    ok: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    latencies: list[float] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    achieved_rate: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "target_rate": round(self.rate, 1), "achieved_rate": round(self.achieved_rate, 1),
            "seconds": self.seconds, "sent": self.sent, "ok": self.ok, "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors, "timeouts": self.timeouts,
            "p50_ms": percentile(lat, 50) * 1000, "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000 if lat else math.nan,
            "versions": dict(sorted(self.versions.items())),
        }


class OpenLoop:
    def __init__(self, port: int, rate: float, seconds: float, connections: int = 32,
                 extend_until: asyncio.Event | None = None) -> None:
        self.port = port
        self.extend_until = extend_until
        self.result = OpenLoopResult(rate, seconds)
        self.connections = connections
        self.idle: deque[_Conn] = deque()
        self.backlog: deque[tuple[float, bytes]] = deque()
        self.in_flight = 0
        self.last_done = 0.0
        self.stopping = False
        self.measure_from = math.inf
        self._drained = asyncio.Event()

    def on_response(self, conn: _Conn, status: int, body: bytes) -> None:
        now = time.perf_counter()
        r = self.result
        if conn.started >= self.measure_from:
            r.latencies.append(now - conn.started)
        if 200 <= status < 300:
            r.ok += 1
        else:
            r.non_2xx += 1
        v = body[:2].decode(errors="replace")
        r.versions[v] = r.versions.get(v, 0) + 1
        self.last_done = now
        self.in_flight -= 1
        self._next(conn)

    def on_lost(self, conn: _Conn) -> None:
        if conn.busy:
            self.result.socket_errors += 1
            self.in_flight -= 1
            conn.busy = False
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if not self.stopping:
            asyncio.get_running_loop().create_task(self._replace())
        elif self.in_flight == 0:
            self._drained.set()

    async def _replace(self) -> None:
        try:
            conn = await _connect(self, self.port)
        except OSError:
            self.result.socket_errors += 1
            await asyncio.sleep(0.01)
            if not self.stopping:
                asyncio.get_running_loop().create_task(self._replace())
            return
        self._next(conn)

    def _next(self, conn: _Conn) -> None:
        if self.backlog and not conn.closed:
            started, data = self.backlog.popleft()
            conn.send(data, started)
        elif not conn.closed:
            self.idle.append(conn)
        if self.stopping and self.in_flight == 0:
            self._drained.set()

    def _submit(self, started: float, data: bytes) -> None:
        self.result.sent += 1
        self.in_flight += 1
        while self.idle:
            conn = self.idle.popleft()
            if not conn.closed:
                conn.send(data, started)
                return
        self.backlog.append((started, data))

    async def run(self) -> OpenLoopResult:
        conns = [await _connect(self, self.port) for _ in range(self.connections)]
        self.idle.extend(conns)
        r = self.result
        total = max(1, int(r.rate * r.seconds))
        t0 = time.perf_counter() + 0.01
        # The first 10% warm connections and caches on both sides; their latencies are not recorded (their
        # errors are). The harness's own garbage collector stays off while it measures.
        self.measure_from = t0 + 0.1 * r.seconds
        gc.disable()
        try:
            i = 0
            while i < total or (self.extend_until is not None and not self.extend_until.is_set()):
                now = time.perf_counter()
                due = int((now - t0) * r.rate) + 1
                if self.extend_until is None or self.extend_until.is_set():
                    due = min(total, due)
                while i < due:
                    self._submit(t0 + i / r.rate, TRAFFIC[i % len(TRAFFIC)])
                    i += 1
                await asyncio.sleep(max(0.0, t0 + i / r.rate - time.perf_counter()))
            r.seconds = round(i / r.rate, 3)
            self.stopping = True
            if self.in_flight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), 5.0)
        finally:
            self.stopping = True
            gc.enable()
            r.timeouts = self.in_flight + len(self.backlog)
            r.achieved_rate = (r.ok + r.non_2xx) / max(self.last_done - t0, 1e-9)
            for c in conns + list(self.idle):
                if c.transport is not None:
                    c.transport.close()
        return r


# Idle keep-alive connections

class IdleClients:
    """Opens n connections, makes one request on each, then keeps them open and silent."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.port = port
        self.source = source  # loopback address to connect from (None: the kernel's choice, 127.0.0.1)
        self.conns: list[_Conn] = []
        self.answered = 0
        self.failed = 0
        self._waiters: dict[_Conn, asyncio.Future[None]] = {}

    def held(self) -> int:
        """Connections still open (a proxy's idle timeout or connection limit closes them)."""
        return sum(1 for c in self.conns if not c.closed)

    def on_response(self, conn: _Conn, status: int, body: bytes) -> None:
        fut = self._waiters.pop(conn, None)
        if fut is not None and not fut.done():
            # A refusal (turnout's 503 past max_connections) is an answer, but not a connection held.
            if status == 200:
                fut.set_result(None)
            else:
                fut.set_exception(ConnectionError(f"status {status}"))

    def on_lost(self, conn: _Conn) -> None:
        fut = self._waiters.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("closed before the response"))

    async def _one(self, sem: asyncio.Semaphore, i: int, timeout: float) -> None:
        async with sem:
            try:
                conn = await asyncio.wait_for(_connect(self, self.port, self.source), timeout)
            except (OSError, TimeoutError):
                self.failed += 1
                return
            self.conns.append(conn)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters[conn] = fut
            conn.send(TRAFFIC[i % len(TRAFFIC)], 0.0)
            try:
                await asyncio.wait_for(fut, timeout)
                self.answered += 1
            except (ConnectionError, TimeoutError):
                self.failed += 1

    async def open(self, n: int, timeout: float = 10.0, concurrency: int = 200, rate: float = 0.0) -> None:
        """Open n connections, `concurrency` at a time; with `rate` > 0, connection i starts at t0 + i / rate."""
        # Bounded concurrency keeps the listen backlogs (511 for nginx) from overflowing into SYN retries.
        sem = asyncio.Semaphore(concurrency)
        if rate <= 0:
            await asyncio.gather(*(self._one(sem, i, timeout) for i in range(n)))
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(n):
                delay = t0 + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(loop.create_task(self._one(sem, i, timeout)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        self.conns.clear()


# Slow reader (blocking; run it in a thread)

@dataclass(frozen=True, slots=True)
class SlowReadResult:
    body_bytes: int
    seconds: float
    status: int


def slow_read(port: int, path: str, bytes_per_second: float, timeout: float = 120.0) -> SlowReadResult:
    """Download `path` through a small receive window at a paced rate, so the proxy must hold back."""
    start = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(request_bytes("slow-reader", path, close=True))
        head = b""
        total = 0
        chunk = 64 * 1024
        while True:
            data = s.recv(chunk)
            if not data:
                break
            if not head:
                head = data[:512]
            total += len(data)
            ahead = total / bytes_per_second - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    head_end = head.find(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    body = total - (head_end + 4 if head_end >= 0 else 0)
    return SlowReadResult(body, time.perf_counter() - start, int(m.group(1)) if m else 0)


# Pollers: which version serves a client right now?

class Poller:
    """Closed-loop requests on one keep-alive connection; records when `want` first answers."""

    def __init__(self, port: int, client: str) -> None:
        self.port = port
        self.request = request_bytes(client)
        self.conn: _Conn | None = None
        self.want: bytes | None = None
        self.seen_at: float | None = None
        self.current = b""
        self.responses = 0
        self.errors = 0
        self.running = False
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self.conn = await _connect(self, self.port)
        self.running = True
        self.conn.send(self.request, 0.0)

    def expect(self, want: bytes) -> None:
        self.want = want
        self.seen_at = None
        self.changed.clear()

    def on_response(self, conn: _Conn, status: int, body: bytes) -> None:
        self.responses += 1
        self.current = body[:2]
        if status != 200:
            self.errors += 1
        elif self.want is not None and self.seen_at is None and body.startswith(self.want):
            self.seen_at = time.perf_counter()
            self.changed.set()
        if self.running:
            conn.send(self.request, 0.0)

    def on_lost(self, conn: _Conn) -> None:
        if self.running:
            self.errors += 1
            asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        await asyncio.sleep(0.01)
        if self.running:
            with contextlib.suppress(OSError):
                await self.start()

    def stop(self) -> None:
        self.running = False
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()
