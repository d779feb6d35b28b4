"""`turnout serve --workers N`: SIGHUP replaces every worker under load without failing a request, and a
worker that dies is started again on its slot's socket (real processes, real sockets)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import Turnout, backend, free_port, http, wait_until

pytestmark = pytest.mark.slow

WORKERS = 2


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces; the fields after its closing parenthesis do not.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.add(int(entry))
    return out


def replaced(now: set[int], before: set[int]) -> bool:
    return len(now) == WORKERS and now.isdisjoint(before)


def restarted(now: set[int], victim: int) -> set[int] | None:
    return now if len(now) == WORKERS and victim not in now else None


def metrics(t: Turnout) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, body = http("GET", t.admin + "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def served(t: Turnout) -> float:
    return sum(v for (name, _), v in metrics(t).items() if name == "turnout_requests_total")


class Load:
    """Clients on keep-alive connections, each sending one GET after another and counting every failure:
    an exception, a status other than 200, or a wrong body. Nothing is retried."""

    def __init__(self, port: int, clients: int = 6) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        conn = HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read()
                good = r.status == 200 and b'"v1"' in body
                closing = r.will_close
            except Exception as e:  # every kind of failure is what this counts
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                continue
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failures.append(f"status {r.status}: {body[:80]!r}")
                if closing:
                    self.reconnects += 1  # http.client opens a new connection for the next request
        conn.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Turnout]:
    with backend("v1") as port:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{port}"]}}
routes:
  - name: web
    split: {{v1: 100}}
""")
        t = Turnout(tmp_path, str(routes), "--workers", str(WORKERS))
        with t:
            wait_until(lambda: len(children(t.proc.pid)) == WORKERS)  # type: ignore[union-attr]
            yield t
            assert t.stop() == 0


def test_sighup_replaces_every_worker_under_load_without_failing_a_request(proxy: Turnout) -> None:
    assert proxy.proc is not None
    before = children(proxy.proc.pid)
    with Load(proxy.port) as load:
        wait_until(lambda: load.ok > 200)
        ok_before = load.ok
        proxy.proc.send_signal(signal.SIGHUP)
        # Every worker replaced: new pids only, as many as before, and the old ones gone.
        wait_until(lambda: replaced(children(proxy.proc.pid), before), timeout=60)
        at_switch = load.ok
        wait_until(lambda: load.ok > at_switch + 200)
    assert load.failures == []
    assert ok_before > 0 and load.ok > at_switch > ok_before
    # The old workers closed their keep-alive connections after a response, which is how clients moved.
    assert load.reconnects >= 1
    # Counters of the replaced workers are kept: nothing served disappears from /metrics.
    wait_until(lambda: served(proxy) >= load.ok, timeout=5)
    m = metrics(proxy)
    assert m[("turnout_workers", frozenset({("state", "live")}))] == WORKERS
    assert m[("turnout_workers", frozenset({("state", "stale")}))] == 0


def test_a_killed_worker_is_started_again_and_its_queued_connections_are_served(proxy: Turnout) -> None:
    assert proxy.proc is not None
    before = children(proxy.proc.pid)
    victim = min(before)
    wait_until(lambda: served(proxy) >= 0)
    for _ in range(20):
        assert http("GET", proxy.url + "/")[0] == 200
    counted = served(proxy)
    os.kill(victim, signal.SIGKILL)
    # New connections land on both slots' sockets, including the dead worker's: they wait for its
    # successor instead of being refused or reset.
    statuses = [http("GET", proxy.url + "/", timeout=15)[0] for _ in range(40)]
    assert statuses == [200] * 40
    now = wait_until(lambda: restarted(children(proxy.proc.pid), victim), timeout=30)
    assert len(now & before) == WORKERS - 1
    # The dead worker's counters still count (it published before it died); it is not reported stale.
    wait_until(lambda: served(proxy) >= counted + 40 - 1, timeout=5)
    m = metrics(proxy)
    assert m[("turnout_workers", frozenset({("state", "stale")}))] == 0
    assert m[("turnout_workers", frozenset({("state", "live")}))] == WORKERS


def test_sighup_to_a_single_process_proxy_is_ignored_not_fatal(tmp_path: Path) -> None:
    with backend("v1") as port:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"versions:\n  v1: {{endpoints: ['http://127.0.0.1:{port}']}}\n"
                          "routes:\n  - name: web\n    split: {v1: 100}\n")
        with Turnout(tmp_path, str(routes)) as t:
            assert t.proc is not None
            t.proc.send_signal(signal.SIGHUP)
            for _ in range(10):
                assert http("GET", t.url + "/")[0] == 200
            assert t.proc.poll() is None
            assert t.stop() == 0


def test_the_readiness_gate_sees_the_workers_health_without_their_metrics_files(tmp_path: Path) -> None:
    """Workers tell the supervisor their endpoint health over their report pipe: the gate on a split does
    not depend on the statistics files in the state directory (here made unwritable and gone)."""
    with backend("v1") as port:
        dead = free_port()  # nothing listens there: v2's only endpoint fails its health check
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{port}"]}}
  v2: {{endpoints: ["http://127.0.0.1:{dead}"], health: {{interval: 0.2, timeout: 0.2}}}}
routes:
  - name: web
    split: {{v1: 100}}
""")
        t = Turnout(tmp_path, str(routes), "--workers", str(WORKERS))
        with t:
            def v2_down() -> bool:
                v2 = t.api("GET", "/api/v1/health")[1]["versions"].get("v2")
                return v2 is not None and (v2["healthy"], v2["total"]) == (0, 1)

            wait_until(v2_down)
            published = t.state_dir / "run" / f"metrics-{t.port}"
            shutil.rmtree(published)
            published.write_text("")  # a file where the directory was: nothing can be published any more
            status, body = t.api("PATCH", "/api/v1/routes/web/split", {"v1": 50, "v2": 50})
            assert status == 409, body
            assert t.stop() == 0
