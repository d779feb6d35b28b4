"""`turnout serve` as a real process: proxies by the model, applies live changes, keeps them across
restarts, spreads changes to every worker, and stops gracefully."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from proxy.cli import build_parser
from proxy.commands.serve import settings_from_args
from proxy.settings import Limits, Timeouts
from tests.e2e.helpers import ROOT, Turnout, backend, http, wait_until


def routes_file(tmp: Path, p1: int, p2: int, p3: int) -> str:
    f = tmp / "routes.yaml"
    f.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{p1}"]}}
  v2: {{endpoints: ["http://127.0.0.1:{p2}"]}}
  acme: {{endpoints: ["http://127.0.0.1:{p3}"]}}
routes:
  - name: web
    identity: [{{header: X-Client-Id}}]
    split: {{v1: 90, v2: 10}}
    pins: {{acme: acme}}
    fallback: [v1]
""")
    return str(f)


def version_of(url: str, client: str | None = None) -> str:
    status, _, body = http("GET", url + "/", headers={"X-Client-Id": client} if client else {})
    assert status == 200, body
    return str(json.loads(body)["version"])


def test_serve_routes_changes_and_restart(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2, backend("acme") as p3:
        routes = routes_file(tmp_path, p1, p2, p3)
        t = Turnout(tmp_path, routes)
        with t:
            assert version_of(t.url, "acme") == "acme"
            assert Counter(version_of(t.url) for _ in range(20)) == {"v1": 18, "v2": 2}
            sticky = {c: version_of(t.url, c) for c in ("a", "b", "c", "d", "e")}
            assert sticky == {c: version_of(t.url, c) for c in sticky}
            status, body = t.api("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100})
            assert status == 200, body
            # Single process: the change is served as soon as the admin call returned.
            assert version_of(t.url, "a") == "v2"
            assert t.stop() == 0
        # Restart with the same file: the live change is kept.
        with Turnout(tmp_path, routes, state_dir=t.state_dir) as t2:
            assert Counter(version_of(t2.url) for _ in range(10)) == {"v2": 10}


def test_workers_apply_changes_quickly(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2, backend("acme") as p3, \
            Turnout(tmp_path, routes_file(tmp_path, p1, p2, p3), "--workers", "2") as t:
        wait_until(lambda: version_of(t.url, "acme") == "acme")
        status, _ = t.api("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100})
        assert status == 200
        t0 = time.monotonic()
        # Every worker serves the new table: new connections land on either worker.
        wait_until(lambda: all(version_of(t.url) == "v2" for _ in range(20)), timeout=5, interval=0.005)
        elapsed = time.monotonic() - t0
        print(f"workers converged after {elapsed * 1000:.1f} ms")


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess

    with backend("v1") as p1, backend("v2") as p2, backend("acme") as p3:
        t = Turnout(tmp_path, routes_file(tmp_path, p1, p2, p3), "--workers", "2")
        with t:
            assert t.proc is not None
            wait_until(lambda: version_of(t.url, "acme") == "acme")
            out = subprocess.run(["pgrep", "-P", str(t.proc.pid)], capture_output=True, text=True, check=False).stdout
            workers = [int(p) for p in out.split()]
            assert len(workers) == 2
            t.proc.send_signal(signal.SIGKILL)
            t.proc.wait()

            def gone() -> bool:
                for pid in workers:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        continue
                    return False
                return True

            wait_until(gone, timeout=40)


def _token_lines(tmp: Path) -> list[str]:
    t = Turnout(tmp, None)
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
    t.proc = subprocess.Popen(t.args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: http("GET", t.admin + "/readyz")[0] == 200)
    finally:
        t.proc.send_signal(signal.SIGTERM)
        _, err = t.proc.communicate(timeout=30)
    return [line for line in err.splitlines() if "admin token" in line]


def test_serve_says_written_only_when_it_writes_the_token(tmp_path: Path) -> None:
    path = tmp_path / "state" / "admin-token"
    assert _token_lines(tmp_path) == [f"turnout: admin token written to {path} (mode 0600)"]
    assert _token_lines(tmp_path) == [f"turnout: admin token read from {path}"]


class _HangingHandler(BaseHTTPRequestHandler):
    """Answers the health check; holds every other request open, never answering."""

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.hold.wait(30)  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def hung_upstream() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _HangingHandler)
    srv.daemon_threads = True
    srv.hold = threading.Event()  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.hold.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()


def one_route(tmp: Path, port: int, health: str = "/") -> str:
    f = tmp / "routes.yaml"
    f.write_text(f'versions:\n  v1: {{endpoints: ["http://127.0.0.1:{port}"], health: {{path: {health}}}}}\n'
                 "routes:\n  - name: web\n    split: {v1: 100}\n")
    return str(f)


def test_timeout_flag_reaches_every_worker(tmp_path: Path) -> None:
    # Default upstream_response is 60 s; with the flag both workers answer 504 within about 0.3 s.
    with hung_upstream() as port, Turnout(tmp_path, one_route(tmp_path, port, "/healthz"), "--workers", "2",
                                          "--timeout-upstream-response", "0.3") as t:
        wait_until(lambda: t.api("GET", "/api/v1/health")[1]["revision"] == 1)
        for _ in range(6):  # new connections: SO_REUSEPORT spreads them over both workers
            start = time.monotonic()
            status, _, _ = http("GET", t.url + "/", headers={"Connection": "close"}, timeout=10)
            elapsed = time.monotonic() - start
            assert status == 504
            assert 0.3 <= elapsed < 2.0


def test_max_connections_flag_refuses_the_second_connection(tmp_path: Path) -> None:
    with (backend("v1") as port, Turnout(tmp_path, one_route(tmp_path, port), "--max-connections", "1") as t,
          socket.create_connection(("127.0.0.1", t.port), timeout=5) as first):
        first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as second:
            # Sends nothing: the refusal is written at once, and unread input would turn the close into a reset.
            reply = b""
            while chunk := second.recv(65536):
                reply += chunk
            assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 503 Service Unavailable"
        first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 200 ")


def _serve_error(*flags: str) -> tuple[int, str]:
    # Loopback port 0 and a state dir of its own: a flag that is wrongly accepted must not serve anywhere real.
    with tempfile.TemporaryDirectory() as state:
        argv = [sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--state-dir", state, "--store", f"sqlite://{state}/state.db", *flags]
        try:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)
        except subprocess.TimeoutExpired:
            return 0, "serve started: the flag was accepted"
    return proc.returncode, proc.stderr.splitlines()[-1]


def test_limit_and_timeout_flags_are_validated() -> None:
    assert _serve_error("--timeout-upstream-response", "0") == (
        2, "turnout serve: error: argument --timeout-upstream-response: expected a number of seconds > 0, got '0'")
    assert _serve_error("--timeout-header-read", "nan") == (
        2, "turnout serve: error: argument --timeout-header-read: expected a number of seconds > 0, got 'nan'")
    assert _serve_error("--max-connections", "-1") == (
        2, "turnout serve: error: argument --max-connections: expected a whole number >= 1, got '-1'")
    assert _serve_error("--max-body-bytes", "1.5") == (
        2, "turnout serve: error: argument --max-body-bytes: expected a whole number >= 1, got '1.5'")
    assert _serve_error("--shutdown-grace", "-1") == (
        2, "turnout serve: error: argument --shutdown-grace: expected a number of seconds >= 0, got '-1'")
    assert _serve_error("--low-water", "300000") == (
        2, "turnout serve: error: --low-water (300000) must not exceed --high-water (262144)")


def test_every_limit_and_timeout_has_a_serve_flag() -> None:
    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["serve"]), None)
    assert settings.limits == Limits() and settings.timeouts == Timeouts()
    argv = ["serve"]
    for f in dataclasses.fields(Limits):
        argv += [f"--{f.name.replace('_', '-')}", str(getattr(Limits(), f.name) + 1)]
    for f in dataclasses.fields(Timeouts):
        flag = "--shutdown-grace" if f.name == "shutdown_grace" else f"--timeout-{f.name.replace('_', '-')}"
        argv += [flag, str(getattr(Timeouts(), f.name) + 0.5)]
    got = settings_from_args(parser.parse_args(argv), None)
    assert got.limits == Limits(**{f.name: getattr(Limits(), f.name) + 1 for f in dataclasses.fields(Limits)})
    assert got.timeouts == Timeouts(**{f.name: getattr(Timeouts(), f.name) + 0.5
                                       for f in dataclasses.fields(Timeouts)})
