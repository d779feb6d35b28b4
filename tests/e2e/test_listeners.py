"""`turnout serve` listening sockets as real processes see them: restarts on a port with connections in
TIME_WAIT, a second proxy on a port already served, a port taken before start, new connections during a
SIGTERM drain, and admin writes acknowledged only once every worker routes with them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest

from .helpers import ROOT, Turnout, backend, http, wait_until

pytestmark = pytest.mark.slow


def routes_file(tmp: Path, **versions: int) -> str:
    f = tmp / "routes.yaml"
    lines = [f"  {name}: {{endpoints: ['http://127.0.0.1:{port}']}}" for name, port in versions.items()]
    first = next(iter(versions))
    f.write_text("versions:\n" + "\n".join(lines) + f"\nroutes:\n  - name: web\n    split: {{{first}: 100}}\n")
    return str(f)


def on_port(t: Turnout, port: int) -> Turnout:
    t.args[t.args.index("--listen") + 1] = f"127.0.0.1:{port}"
    t.port = port
    return t


def start_expecting_exit(t: Turnout) -> tuple[int, list[str]]:
    """Run `t`; -> (its exit code, its stderr lines). A proxy that serves instead of exiting is killed (-9)."""
    env = {**os.environ, "TURNOUT_ADMIN_TOKEN": t.token}
    proc = subprocess.Popen(t.args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or http("GET", t.admin + "/readyz")[0] == 200, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    return proc.returncode, err.splitlines()


def time_wait_on(port: int) -> int:
    """TCP connections in TIME_WAIT whose local port is `port` (Linux /proc/net/tcp, state 06)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "06")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def stored_revision(tmp: Path, state_dir: Path) -> int:
    """The store's revision, read by a proxy started on free ports without a route file."""
    with Turnout(tmp, None, state_dir=state_dir) as t:
        status, body = t.api("GET", "/api/v1/state")
        assert status == 200
        t.stop()
    return int(body["revision"])


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 2)])
def test_restart_on_the_same_port_with_connections_in_time_wait(tmp_path: Path, before: int, after: int) -> None:
    with backend("v1") as p1:
        routes = routes_file(tmp_path, v1=p1)
        with Turnout(tmp_path, routes, "--workers", str(before)) as t:
            for _ in range(4):
                # urllib sends `Connection: close`: the proxy closes first, so its end waits in TIME_WAIT.
                assert http("GET", t.url + "/")[0] == 200
            assert t.stop() == 0
        assert time_wait_on(t.port) >= 1
        with on_port(Turnout(tmp_path, routes, "--workers", str(after), state_dir=t.state_dir), t.port) as t2:
            assert http("GET", t2.url + "/")[0] == 200
            assert t2.stop() == 0


def test_a_second_multi_worker_proxy_on_a_served_port_does_not_start(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with Turnout(tmp_path / "a", routes_file(tmp_path / "a", v1=p1), "--workers", "2") as t1:
            other = on_port(Turnout(tmp_path / "b", routes_file(tmp_path / "b", v2=p2), "--workers", "2"), t1.port)
            code, err = start_expecting_exit(other)
            assert (code, err) == (1, [f"turnout: cannot listen on 127.0.0.1:{t1.port} (--listen): "
                                       "Address already in use"])
            # Every new connection still lands on the first proxy's workers.
            assert [http("GET", t1.url + "/")[2].count(b'"v1"') for _ in range(16)] == [1] * 16
            assert t1.stop() == 0
        assert stored_revision(tmp_path, other.state_dir) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_data_port_fails_before_the_route_file_is_committed(tmp_path: Path, workers: int) -> None:
    with backend("v1") as p1, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        t = on_port(Turnout(tmp_path, routes_file(tmp_path, v1=p1), "--workers", str(workers)), port)
        code, err = start_expecting_exit(t)
        assert (code, err) == (1, [f"turnout: cannot listen on 127.0.0.1:{port} (--listen): Address already in use"])
    assert stored_revision(tmp_path, t.state_dir) == 0


def test_a_taken_admin_port_fails_before_the_route_file_is_committed(tmp_path: Path) -> None:
    with backend("v1") as p1, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        t = Turnout(tmp_path, routes_file(tmp_path, v1=p1), "--workers", "2")
        t.args[t.args.index("--admin") + 1] = f"127.0.0.1:{port}"
        t.admin_port = port
        code, err = start_expecting_exit(t)
        assert (code, err) == (1, [f"turnout: cannot listen on 127.0.0.1:{port} (--admin): Address already in use"])
    assert stored_revision(tmp_path, t.state_dir) == 0


class HeldUpstream:
    """An upstream that answers a request for /held only once `release` is set, and others (the proxy's health
    checks) at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if conn.recv(65536).startswith(b"GET /held "):
                self.arrived.set()
                self.release.wait(30)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nheld")

    def close(self) -> None:
        self.release.set()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


@pytest.fixture
def held() -> Iterator[HeldUpstream]:
    up = HeldUpstream()
    yield up
    up.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_new_connections_are_refused_during_a_sigterm_drain(tmp_path: Path, held: HeldUpstream,
                                                            workers: int) -> None:
    with Turnout(tmp_path, routes_file(tmp_path, v1=held.port), "--workers", str(workers)) as t:
        assert t.proc is not None
        inflight: list[tuple[int, bytes]] = []
        client = threading.Thread(target=lambda: inflight.append(http("GET", t.url + "/held", timeout=30)[::2]))
        client.start()
        assert held.arrived.wait(10)
        t.proc.send_signal(signal.SIGTERM)
        # The drain lasts as long as the held request: meanwhile a new connection is refused at once
        # instead of being queued on a socket that no process accepts from any more.
        wait_until(lambda: refused(t.port), timeout=5)
        assert [refused(t.port) for _ in range(10)] == [True] * 10
        held.release.set()
        client.join(10)
        assert inflight == [(200, b"held")]
        assert t.proc.wait(timeout=30) == 0


def test_an_admin_write_returns_once_every_worker_routes_with_it(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2, \
            Turnout(tmp_path, routes_file(tmp_path, v1=p1, v2=p2), "--workers", "2") as t:
        # Keep-alive connections opened first, so requests go out the moment the write returns; with 8 of them
        # both workers hold some (the kernel spreads new connections over the workers' sockets).
        conns = [HTTPConnection("127.0.0.1", t.port, timeout=5) for _ in range(8)]

        def versions() -> list[str]:
            out = []
            for c in conns:
                c.request("GET", "/")
                r = c.getresponse()
                out.append(r.getheader("X-Served-By") or "")
                r.read()
            return out

        assert versions() == ["v1"] * 8
        seen: list[list[str]] = []
        expected: list[list[str]] = []
        took: list[float] = []
        for i in range(15):
            target = "v2" if i % 2 == 0 else "v1"
            t0 = time.perf_counter()
            split = {"v1": 0, "v2": 0, target: 100}
            status, _ = t.api("PATCH", "/api/v1/routes/web/split?force=true", split)
            took.append(time.perf_counter() - t0)
            assert status == 200
            seen.append(versions())
            expected.append([target] * 8)
        for c in conns:
            c.close()
        took.sort()
        print(f"admin write with 2 workers: median {took[len(took) // 2] * 1000:.1f} ms, "
              f"max {took[-1] * 1000:.1f} ms")
        assert seen == expected
        assert t.stop() == 0


def test_an_admin_write_waits_for_a_stuck_worker_only_a_bounded_time(tmp_path: Path) -> None:
    with backend("v1") as p1, backend("v2") as p2, \
            Turnout(tmp_path, routes_file(tmp_path, v1=p1, v2=p2), "--workers", "2") as t:
        assert t.proc is not None
        out = subprocess.run(["pgrep", "-P", str(t.proc.pid)], capture_output=True, text=True, check=False).stdout
        stuck = min(int(p) for p in out.split())
        os.kill(stuck, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            status, body = t.api("PATCH", "/api/v1/routes/web/split?force=true", {"v1": 0, "v2": 100})
            took = time.monotonic() - t0
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert (status, body["changed"]) == (200, True)
        # WORKER_ROUTED_TIMEOUT (1 s), then the answer; the stuck worker catches up once it runs again.
        assert 1.0 <= took < 2.5
        wait_until(lambda: all(http("GET", t.url + "/")[1].get("X-Served-By") == "v2" for _ in range(8)))
        assert t.stop() == 0
