"""`turnout serve` as a real process: proxies by the model, applies live changes, keeps them across
restarts, spreads changes to every worker, and stops gracefully."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

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
