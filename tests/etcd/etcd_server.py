"""A real single-member etcd on loopback, for tests and benchmarks.

Usable without pytest: `server = EtcdServer(); server.start(); ...; server.stop()` (or `with EtcdServer() as s:`).
`stop()` followed by `start()` restarts on the same ports and data directory, which is how tests simulate an
outage that loses nothing. Run this module to check the binary: `python -m tests.etcd.etcd_server`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ETCD_BINARY = "etcd"
# etcd is usually ready in ~0.1 s; a loaded CI machine with fsync can take a few seconds.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class EtcdMissingError(RuntimeError):
    """The etcd binary is not installed (Debian package etcd-server)."""


def find_etcd() -> str | None:
    return shutil.which(ETCD_BINARY) or (str(p) if (p := Path("/usr/bin/etcd")).exists() else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: str | None = None, *, max_request_bytes: int | None = None) -> None:
        binary = find_etcd()
        if binary is None:
            raise EtcdMissingError("etcd not found on PATH or at /usr/bin/etcd (Debian package etcd-server)")
        self.binary = binary
        self._own_dir = data_dir is None
        self.base_dir = data_dir or tempfile.mkdtemp(prefix="turnout-etcd-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.client_port = free_port()
        self.peer_port = free_port()
        # None keeps etcd's default (1.5 MiB) so tests prove that the store chunks large values itself.
        self.max_request_bytes = max_request_bytes
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.base_dir, "etcd.log")

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running else "stopped"
        return f"<EtcdServer {self.endpoint} [{state}]>"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    def url(self, prefix: str = "turnout") -> str:
        """The store URL turnout takes: etcd://127.0.0.1:PORT/prefix."""
        return f"etcd://{self.endpoint}/{prefix.lstrip('/')}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            self.binary,
            "--name", "turnout-test",
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"turnout-test={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-level", "error",
        ]
        if self.max_request_bytes is not None:
            argv += ["--max-request-bytes", str(self.max_request_bytes)]
        return argv

    def start(self) -> EtcdServer:
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; log: {self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {START_TIMEOUT} s; log: {self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop etcd (SIGTERM, or SIGKILL for a crash); the data directory is kept for start()."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":
    with EtcdServer() as s:
        print(f"{s!r} healthy; store URL {s.url()}")
