"""Helpers for end-to-end tests that run turnout as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: object | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc})")


@contextmanager
def backend(name: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.commands.demo_backend", "--name", name, "--port", str(port)],
                            cwd=ROOT)
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/")[0] == 200)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Turnout:
    def __init__(self, tmp: Path, routes: str | None, *extra: str, state_dir: Path | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.state_dir = state_dir or tmp / "state"
        self.token = "test-token"
        self.args = [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{self.port}",
                     "--admin", f"127.0.0.1:{self.admin_port}", "--state-dir", str(self.state_dir),
                     "--store", f"sqlite://{self.state_dir}/state.db", *extra]
        if routes:
            self.args += ["--routes", routes]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Turnout:
        env = {**os.environ, "TURNOUT_ADMIN_TOKEN": self.token}
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env)
        wait_until(lambda: http("GET", self.admin + "/readyz")[0] == 200)
        return self

    def api(self, method: str, path: str, body: object | None = None, **headers: str) -> tuple[int, Any]:
        h = {"Authorization": f"Bearer {self.token}", **{k.replace("_", "-"): v for k, v in headers.items()}}
        status, _, data = http(method, self.admin + path, body, h)
        return status, json.loads(data) if data else None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def __enter__(self) -> Turnout:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
