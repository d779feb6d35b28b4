"""`turnout demo`: three versions behind the proxy; Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from proxy.commands.demo import DEMO_VERSIONS
from tests.e2e.helpers import ROOT, free_port, http, wait_until


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    env = {**os.environ, "TURNOUT_ADMIN_TOKEN": "t"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
         "--state-dir", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200, timeout=30)

        def version(client: str) -> str:
            status, headers, body = http("GET", f"http://127.0.0.1:{listen}/", headers={"X-Client-Id": client})
            assert status == 200
            data = json.loads(body)
            assert data["client"] == client
            assert headers["X-Turnout-Version"] == data["version"]  # the demo route exposes the version
            return str(data["version"])

        assert version("acme") == "acme"
        seen = {version(f"user-{i}") for i in range(200)}
        assert seen == {"v1", "v2"}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "curl" in out
    assert proc.returncode == 0  # Ctrl-C once serving is the graceful stop, not an interrupted command
    for _, port in DEMO_VERSIONS:
        assert not port_open(port), f"demo version on {port} still running"
    assert not port_open(listen) and not port_open(admin)
