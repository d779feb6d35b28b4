"""Local `command` versions outlive the proxy: a restarted `turnout serve` (SIGTERM or kill -9) adopts the
running process instead of starting a new one, so the instance keeps its pid and never answers 502/503."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import Turnout, wait_until

# An instance that says which process answered.
INSTANCE = """
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def marked(mark: str) -> list[int]:
    """Pids of the processes started with TEST_MARK=mark in their environment."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if f"TEST_MARK={mark}".encode() in env.split(b"\0"):
            out.append(int(d.name))
    return out


@pytest.fixture
def mark() -> Iterator[str]:
    """A marker in the version's environment; every process carrying it is killed when the test ends, since
    the proxy leaves its local instances running when it stops."""
    m = uuid.uuid4().hex
    yield m
    for pid in marked(m):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


class Load:
    """New connection per request, ~100 req/s, bounded in count; counts answers and failed connections."""

    def __init__(self, port: int, limit: int = 3000) -> None:
        self.port = port
        self.limit = limit
        self.statuses: Counter[int] = Counter()
        self.pids: Counter[int] = Counter()
        self.down = 0
        self.other: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(self.limit):
            if self._stop.is_set():
                return
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read()
                self.statuses[r.status] += 1
                if r.status == 200:
                    self.pids[int(json.loads(body)["pid"])] += 1
            except ConnectionError:
                # The proxy itself is down: refused, or reset when it is killed mid-request or closes its
                # listener with connections queued. Expected while it restarts, and never an instance's doing.
                self.down += 1
            except OSError as e:
                self.other.append(repr(e))
            finally:
                conn.close()
            time.sleep(0.01)

    def served(self) -> int:
        return sum(self.pids.values())

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def pid_of(url: str) -> int:
    """The pid that answered, 0 for an HTTP error (the instance is still starting)."""
    try:
        with urllib.request.urlopen(url + "/", timeout=5) as r:
            return int(json.loads(r.read())["pid"])
    except urllib.error.HTTPError as e:
        e.close()
        return 0


def test_a_restarted_proxy_adopts_its_running_local_instance(tmp_path: Path, mark: str) -> None:
    script = tmp_path / "instance.py"
    script.write_text(INSTANCE)
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
versions:
  lv: {{command: ["{sys.executable}", "{script}"], env: {{TEST_MARK: "{mark}"}}}}
routes:
  - name: web
    split: {{lv: 100}}
""")
    t = Turnout(tmp_path, str(routes))
    try:
        t.start()
        pid = wait_until(lambda: pid_of(t.url))
        assert marked(mark) == [pid]
        _, before = t.api("GET", "/api/v1/versions/lv")
        with Load(t.port) as load:
            wait_until(lambda: load.served() >= 20)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                served = load.served()
                assert t.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
                # The instance serves on while the proxy is down...
                assert pid_of(before["instances"][0]) == pid
                t.start()
                wait_until(lambda s=served: load.served() >= s + 20)
        # ...and after each restart the same process is the instance: nothing was started or stopped.
        assert marked(mark) == [pid]
        _, after = t.api("GET", "/api/v1/versions/lv")
        assert after["instances"] == before["instances"]
        print(f"answers {dict(load.statuses)}, failed while the proxy was down: {load.down}")
        assert (set(load.statuses), set(load.pids), load.other) == ({200}, {pid}, [])
    finally:
        if t.proc is not None and t.proc.poll() is None:
            t.stop()
