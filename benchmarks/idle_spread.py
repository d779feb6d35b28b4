"""Idle connections held by K processes of each proxy and opened by K client processes (#17: 50,000 of them).

The open-file limit of this machine is per process (hard 20,000, and setrlimit cannot raise it), so 50,000
idle connections are shared out instead: K processes of each proxy listen on one port and K (or more)
client subprocesses open the connections.
- turnout: `--workers K`; its supervisor binds one SO_REUSEPORT socket per worker and the kernel spreads
  new connections over them. The group measured includes the supervisor.
- nginx: `worker_processes K` and `listen ... reuseport` (one socket per worker, spread by the kernel as for
  turnout; a socket shared by all workers lets whichever worker wakes first take most connections),
  worker_connections and worker_rlimit_nofile sized for one worker's share.
- HAProxy 2.6 has no nbproc and its threads share one descriptor table, so K separate HAProxy instances bind
  the same port (HAProxy sets SO_REUSEPORT on Linux unless told `noreuseport`), each with maxconn for its
  share; their RSS is summed.
- clients: `python -m benchmarks.idle_spread client ...`, each connecting from its own loopback address
  (127.0.0.2, 127.0.0.3, ...), at most CLIENT_MAX connections each, so neither its descriptors nor the
  ~28,000 ephemeral ports of one (source, destination) pair run out.
All three proxies get the same long client idle timeout (IDLE_TIMEOUT): at a few hundred connections a
second, their defaults (HAProxy 30 s, nginx and turnout 75 s) would close the first connections before the
last are open. Which process holds which connection is read from /proc (each process's socket inodes
against /proc/net/tcp), so the report shows every process's share and descriptor count.

Design rule: every process started here is registered with the run's `Processes` before anything can fail
(clients through add_cleanup), and a client also stops by itself (EOF on its stdin, or its lifetime), so a
crashed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import IdleClients
from benchmarks.peers import Backends, Lab, render
from benchmarks.procs import (
    PAGE_SIZE,
    Proc,
    StartError,
    _group_pids,
    free_port,
    pinned,
    raise_nofile,
    wait_http,
)

CLIENT_MAX = 15_000  # connections per client process (its own descriptors: 20,000 here)
IDLE_TIMEOUT = 900  # seconds, the client idle timeout given to every proxy (longer than any run)
# Spare room over a process's even share: SO_REUSEPORT hashes the 4-tuple, so shares differ by a few %.
SHARE_ROOM = 1.25
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"
_runs = 0


def _run_dir(lab: Lab, name: str) -> Path:
    global _runs
    _runs += 1
    d = lab.work / f"spread-{_runs:02d}-{name}"
    d.mkdir(parents=True)
    return d


def share(n: int, k: int) -> int:
    """Connections one of k processes must be able to hold: its even share plus room for the hash's spread."""
    if k == 1:
        return n + 100
    return math.ceil(math.ceil(n / k) * SHARE_ROOM) + 100


# -- who holds which connection (/proc)

def tcp_sockets() -> dict[int, tuple[int, str]]:
    """inode -> (local port, state) of every IPv4 TCP socket (this network namespace)."""
    out: dict[int, tuple[int, str]] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            out[int(parts[9])] = (int(parts[1].rsplit(":", 1)[1], 16), parts[3])
    return out


def socket_inodes(pid: int) -> tuple[int, list[int]]:
    """(open descriptors, inodes of the sockets among them) of one process."""
    fd_dir = f"/proc/{pid}/fd"
    count, inodes = 0, []
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            count += 1
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
    return count, inodes


def listeners_on(port: int) -> int:
    return sum(1 for p, state in tcp_sockets().values() if p == port and state == TCP_LISTEN)


def process_rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


# -- the proxies

@dataclass
class Group:
    """The K processes of one proxy serving one port (one process group, or K of them for HAProxy)."""

    name: str
    port: int
    procs: list[Proc] = field(default_factory=list)
    how: str = ""  # how the processes were run, for the report

    def pids(self) -> list[tuple[int, bool]]:
        """(pid, is the group leader) of every live process."""
        return [(pid, pid == p.pgid) for p in self.procs for pid in sorted(_group_pids(p.pgid))]

    def rss(self) -> int:
        return sum(p.rss() for p in self.procs)

    def per_process(self) -> list[dict[str, Any]]:
        """Each process: its descriptors, RSS, and the client connections (established on the port) it holds."""
        socks = tcp_sockets()
        out = []
        for pid, leader in self.pids():
            fds, inodes = socket_inodes(pid)
            clients = sum(1 for i in inodes if socks.get(i) == (self.port, TCP_ESTABLISHED))
            out.append({"pid": pid, "leader": leader, "fds": fds, "client_connections": clients,
                        "rss_mib": round(process_rss(pid) / 2**20, 2)})
        return out


def _wait_listeners(g: Group, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in g.procs:
            if not p.alive:
                raise StartError(f"{p.name} exited with status {p.popen.returncode}:\n{p.log_tail()}")
        if listeners_on(g.port) >= want:
            return
        time.sleep(0.05)
    raise StartError(f"{g.name}: {listeners_on(g.port)} of {want} sockets listen on port {g.port} "
                     f"after {timeout:g} s")


def start_turnout(lab: Lab, b: Backends, n: int, k: int) -> Group:
    t = lab.start_turnout(b, name=f"turnout-{n}-x{k}", workers=k,
                          extra=["--timeout-keepalive-idle", str(IDLE_TIMEOUT),
                                 "--max-connections", str(max(16_384, share(n, k)))])
    assert t.proc is not None
    g = Group("turnout", t.port, [t.proc], f"--workers {k}" + (" (supervisor + workers, all counted)" if k > 1
                                                               else " (one process)"))
    _wait_listeners(g, k, 30.0)
    return g


def start_nginx(lab: Lab, b: Backends, n: int, k: int, nofile: int) -> Group:
    run = _run_dir(lab, f"nginx-{n}-x{k}")
    port = free_port()
    per = min(share(n, k) + 1000, nofile - 500)  # client and upstream connections both count
    text = render("nginx.conf.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                  V2=f"127.0.0.1:{b.v2}", RUN=str(run))
    text = text.replace("worker_processes 1;", f"worker_processes {k};\nworker_rlimit_nofile {per + 200};")
    text = text.replace("worker_connections 4096;", f"worker_connections {per};")
    text = text.replace("keepalive_requests 1000000;",
                        f"keepalive_requests 1000000;\n  keepalive_timeout {IDLE_TIMEOUT}s;")
    if k > 1:
        text = text.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{port} reuseport;")
    (run / "nginx.conf").write_text(text)
    proc = lab.procs.start(f"nginx-{n}-x{k}", pinned(["nginx", "-c", str(run / "nginx.conf"), "-e",
                                                      str(run / "nginx.err")], lab.proxy_core), run / "stdout.log")
    g = Group("nginx", port, [proc], f"worker_processes {k}" + (", listen reuseport" if k > 1 else "")
              + f", worker_connections {per} (master + workers counted)")
    _wait_listeners(g, k if k > 1 else 1, 10.0)
    wait_http(proc, port, 10.0)
    return g


def start_haproxy(lab: Lab, b: Backends, n: int, k: int) -> Group:
    port = free_port()
    maxconn = share(n, k)
    g = Group("haproxy", port, [], f"{k} HAProxy instance{'s' if k > 1 else ''} on one port (SO_REUSEPORT), "
              f"maxconn {maxconn} each" + (", RSS summed" if k > 1 else ""))
    for i in range(k):
        run = _run_dir(lab, f"haproxy-{n}-x{k}-{i}")
        text = render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                      V2=f"127.0.0.1:{b.v2}", RUN=str(run))
        # HAProxy reserves two descriptors per connection and refuses a maxconn the hard limit cannot cover
        # unless told the limit is advisory (an idle client holds one descriptor).
        text = text.replace("maxconn 4000", f"maxconn {maxconn}\n  no strict-limits")
        text = text.replace("timeout client 30s", f"timeout client {IDLE_TIMEOUT}s")
        (run / "haproxy.cfg").write_text(text)
        g.procs.append(lab.procs.start(f"haproxy-{n}-x{k}-{i}", pinned(["haproxy", "-f", str(run / "haproxy.cfg")],
                                                                       lab.proxy_core), run / "stdout.log"))
        # One at a time: a request on the shared port cannot tell which instance answered it.
        _wait_listeners(g, i + 1, 10.0)
    wait_http(g.procs[0], port, 10.0)
    return g


def start_group(lab: Lab, b: Backends, name: str, n: int, k: int, nofile: int) -> Group:
    if name == "turnout":
        return start_turnout(lab, b, n, k)
    if name == "haproxy":
        return start_haproxy(lab, b, n, k)
    return start_nginx(lab, b, n, k, nofile)


def stop_group(lab: Lab, g: Group) -> None:
    for p in g.procs:
        lab.procs.stop(p)


# -- the clients

def client_count(n: int, k: int) -> int:
    return max(k, math.ceil(n / CLIENT_MAX))


def source_address(i: int) -> str:
    return f"127.0.{(i + 2) // 256}.{(i + 2) % 256}"


class Clients:
    """K client subprocesses holding n connections between them; each answers `held` and stops at EOF."""

    def __init__(self, lab: Lab, port: int, n: int, k: int, timeout: float, deadline: float,
                 rate: float = 0.0) -> None:
        self.lab, self.port, self.n, self.k = lab, port, n, k
        self.timeout, self.deadline = timeout, deadline
        self.rate = rate  # connections per second in all (0: as fast as 200 in flight allow)
        self.procs: list[asyncio.subprocess.Process] = []
        self.results: list[dict[str, Any]] = []

    def _kill(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)

    async def open(self) -> None:
        self.lab.procs.add_cleanup(self._kill)
        shares = [self.n // self.k + (1 if i < self.n % self.k else 0) for i in range(self.k)]
        lifetime = int(self.deadline + IDLE_TIMEOUT)
        for i, count in enumerate(shares):
            argv = [sys.executable, "-m", "benchmarks.idle_spread", "client", "--port", str(self.port),
                    "--source", source_address(i), "--count", str(count), "--timeout", str(self.timeout),
                    "--deadline", str(self.deadline), "--lifetime", str(lifetime),
                    "--concurrency", str(max(25, 200 // self.k)), "--rate", str(self.rate / self.k),
                    "--work", str(self.lab.work)]
            self.procs.append(await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent))
        self.results = [await self._line(p, self.deadline + 30.0) for p in self.procs]

    async def _line(self, p: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"a client process exited with status {await p.wait()} before reporting")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def held(self) -> list[int]:
        counts = []
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"held\n")
            await p.stdin.drain()
            counts.append(int((await self._line(p, 30.0))["held"]))
        return counts

    async def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None and p.returncode is None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 15.0)
            except TimeoutError:
                self._kill()
                await p.wait()

    @property
    def answered(self) -> int:
        return sum(int(r["answered"]) for r in self.results)

    @property
    def failed(self) -> int:
        return sum(int(r["failed"]) for r in self.results)


async def client_main(args: argparse.Namespace) -> None:
    # A backstop if the benchmark dies without closing our stdin: SIGALRM's default action ends the process.
    signal.alarm(args.lifetime)
    raise_nofile()
    clients = IdleClients(args.port, source=args.source)
    t0 = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(clients.open(args.count, timeout=args.timeout, concurrency=args.concurrency,
                                            rate=args.rate), args.deadline)
    # Connections still opening when the deadline struck were cancelled: they count as failed.
    failed = args.count - clients.answered
    print(json.dumps({"source": args.source, "answered": clients.answered, "failed": failed,
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "held":
            print(json.dumps({"held": clients.held()}), flush=True)
    clients.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="one client process of benchmarks.idle --processes")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("client", help="open COUNT idle connections from SOURCE, report, hold them until EOF")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--source", required=True, help="loopback address to connect from (127.0.0.0/8)")
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--timeout", type=float, default=30.0, help="per connection: connect and answer")
    c.add_argument("--deadline", type=float, default=300.0, help="for opening all of them")
    c.add_argument("--lifetime", type=int, default=1200, help="exit after this many seconds whatever happens")
    c.add_argument("--concurrency", type=int, default=50)
    c.add_argument("--rate", type=float, default=0.0, help="connections per second (0: as fast as possible)")
    c.add_argument("--work", help="the benchmark's work folder (names the run this client belongs to)")
    args = ap.parse_args()
    if not args.source.startswith("127."):
        sys.exit(f"--source: {args.source} is not a loopback address (127.0.0.0/8)")
    if args.count > CLIENT_MAX:
        sys.exit(f"--count: {args.count} is over {CLIENT_MAX} connections for one process")
    try:
        import uvloop
        uvloop.run(client_main(args))
    except ImportError:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
