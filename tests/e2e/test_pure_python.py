"""The pure-Python fallback (no C compiler at install, or TURNOUT_PURE_PYTHON=1) is the same source as the
compiled data plane; this runs `turnout serve` from the `.py` files even where `.so` files exist, and checks
that it says so and proxies, refuses and re-frames like the compiled build the rest of the suite runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.helpers import ROOT, backend, free_port, http, wait_until

LAUNCHER = '''
import importlib.abc, importlib.util, runpy, sys
from pathlib import Path

root = Path(sys.argv[1])


class PreferSource(importlib.abc.MetaPathFinder):
    """proxy.* modules from their .py files, never from a compiled .so next to them."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("proxy."):
            return None
        source = root.joinpath(*name.split(".")).with_suffix(".py")
        return importlib.util.spec_from_file_location(name, source) if source.exists() else None


sys.meta_path.insert(0, PreferSource())
sys.argv = ["turnout", *sys.argv[2:]]
runpy.run_module("proxy", run_name="__main__")
'''


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_pure_python_data_plane_serves_and_refuses(tmp_path: Path) -> None:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    with backend("v1") as p1:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"versions:\n  v1: {{endpoints: ['http://127.0.0.1:{p1}']}}\n"
                          "routes:\n  - name: web\n    split: {v1: 100}\n")
        port, admin = free_port(), free_port()
        log = tmp_path / "serve.log"
        env = {**os.environ, "TURNOUT_ADMIN_TOKEN": "t"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(launcher), str(ROOT), "serve", "--routes", str(routes),
                 "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                 "--state-dir", str(tmp_path / "state"), "--store", f"sqlite://{tmp_path}/state/state.db"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200)
            wait_until(lambda: "proxy listening on" in log.read_text())  # logged once the services are up
            assert "data plane pure Python" in log.read_text()
            status, _, body = http("GET", f"http://127.0.0.1:{port}/x")
            assert status == 200 and b'"v1"' in body
            # Absolute-form for its own host (the case the compiled build once got wrong), a chunked body,
            # and a refusal that never reaches the upstream.
            r = raw(port, b"GET http://127.0.0.1/y?z=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 200 ")
            r = raw(port, b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                          b"3\r\nabc\r\n0\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 200 ")
            r = raw(port, b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 400 ")
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
