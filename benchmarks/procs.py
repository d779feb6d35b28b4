"""Processes the harness starts: pinning, readiness, accounting, and stopping them whatever happens.

Design rule: every process is started in its own session (so its process group id is its pid), and every
group is registered with a `Processes` registry whose `stop_all()` runs in a `finally`. A Ctrl-C, an
exception or a failed scenario therefore never leaves a server behind; children of a server (nginx's
worker, turnout's workers) share its group and are stopped with it, and are counted with it for CPU/RSS.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A proxy gets this long to exit after SIGTERM before SIGKILL; turnout's own grace is shortened too.
STOP_GRACE = 5.0


def require_tools(*tools: str) -> None:
    """Exit with one line naming every tool the run needs and this machine lacks."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}")


def machine_load(when: str) -> list[float]:
    """The 1/5/15-minute load, printed and returned: every figure is stored with the load it was taken under."""
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"machine load at {when}: {load}", flush=True)
    return load


def cores() -> tuple[int | None, int | None]:
    """(proxy core, load core): proxies on core 1, generators and backends on core 0, when both exist."""
    allowed = os.sched_getaffinity(0)
    if {0, 1} <= allowed:
        return 1, 0
    return None, None


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if core is not None else list(argv)


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one (inherited by children); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class CpuTimes:
    user: float  # seconds
    system: float

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces): state is [0]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def group_cpu(pgid: int) -> CpuTimes:
    """utime+stime of every live process in the group (reaped children would need cutime: none here)."""
    user = system = 0
    for pid in _group_pids(pgid):
        f = _stat_fields(pid)
        if f is not None:
            user += int(f[11])
            system += int(f[12])
    return CpuTimes(user / CLK_TCK, system / CLK_TCK)


def group_rss(pgid: int) -> int:
    """Resident bytes of the whole group (nginx master + worker; turnout supervisor + workers)."""
    total = 0
    for pid in _group_pids(pgid):
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += pages * PAGE_SIZE
    return total


def group_fds(pgid: int) -> int:
    total = 0
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


class Proc:
    """One started server: its argv, log file and process group."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns this file for its whole life
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=env, cwd=cwd)
        finally:
            log.close()
        self.pgid = self.popen.pid

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.popen.returncode}"
        return f"<Proc {self.name} pid {self.popen.pid} [{state}]>"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu(self) -> CpuTimes:
        return group_cpu(self.pgid)

    def rss(self) -> int:
        return group_rss(self.pgid)

    def fds(self) -> int:
        return group_fds(self.pgid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_GRACE)
        # The leader may have exited while a child (a worker) lingers: the group is killed either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_GRACE)


class Processes:
    """Registry of everything started; `stop_all()` belongs in a finally."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._cleanups: list[Callable[[], object]] = []

    def start(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        p = Proc(name, argv, log_path, env, cwd)
        self._procs.append(p)
        return p

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def add_cleanup(self, fn: Callable[[], object]) -> None:
        """For servers started by other code (EtcdServer): `fn` stops them; calling it twice is harmless."""
        self._cleanups.append(fn)

    def stop_all(self) -> None:
        while self._procs:
            self._procs.pop().stop()
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()


class StartError(RuntimeError):
    """A server did not become ready; the message carries the end of its log."""


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise StartError(f"{proc.name} did not listen on port {port} within {timeout:g} s:\n{proc.log_tail()}")


def http_get(port: int, path: str = "/", headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """One blocking request on a fresh connection (readiness checks only; not on any measured path)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}Connection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def wait_http(proc: Proc, port: int, timeout: float, path: str = "/",
              headers: dict[str, str] | None = None, answer_timeout: float = 15.0) -> None:
    """Wait until a request answers 200 (a proxy may listen before its route table is loaded).

    `timeout` bounds the start (a 100,000-pin route file takes seconds to load); once the port listens,
    a server that keeps failing requests for `answer_timeout` is broken rather than slow.
    """
    wait_port(proc, port, timeout)
    deadline = time.monotonic() + answer_timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive:
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status, body = http_get(port, path, headers)
            if status == 200:
                return
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise StartError(f"{proc.name} listens on port {port} but did not answer 200 within {answer_timeout:g} s "
                     f"({last}):\n{proc.log_tail()}")
