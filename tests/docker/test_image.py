"""The project's own image: built from the locally made base (nothing pulled), run with host network on
loopback ports; its HEALTHCHECK passes, it runs as a non-root user and it proxies."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .engine import Dockerd
from .helpers import free_port, http, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TAG = "turnout:test"


def docker(engine: Dockerd, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], env={**engine.env, "DOCKER_BUILDKIT": "0"}, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def turnout_image(dockerd: Dockerd) -> str:
    if shutil.which("docker") is None or shutil.which("debootstrap") is None:
        pytest.skip("needs the docker CLI and debootstrap (Debian packages docker.io, debootstrap)")
    r = subprocess.run([str(ROOT / "docker" / "build-image.sh"), TAG], cwd=ROOT,
                       env={**dockerd.env, "DOCKER_BUILDKIT": "0"}, text=True, capture_output=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return TAG


class _Backend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_image_runs_healthy_as_non_root_and_proxies(turnout_image: str, clean_engine: Dockerd, backend: int,
                                                    tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "routes.yaml").write_text(
        f"versions:\n  v1: {{endpoints: ['http://127.0.0.1:{backend}']}}\n"
        "routes:\n  - {name: web, match: {path_prefix: /}, split: {v1: 100}}\n")
    port, admin = free_port(), free_port()
    r = docker(clean_engine, "run", "-d", "--network", "host", "--health-interval", "1s",
               "--health-start-period", "1s", "-v", f"{routes}:/etc/turnout/routes:ro",
               "-e", f"TURNOUT_HEALTH_URL=http://127.0.0.1:{admin}/healthz", turnout_image,
               "serve", "--routes", "/etc/turnout/routes/routes.yaml", "--store", "sqlite:////var/lib/turnout/state.db",
               "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{admin}/healthz")[0] == 200, what="admin /healthz")

        def health() -> str:
            return docker(clean_engine, "inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()

        assert wait_until(lambda: health() == "healthy", timeout=30, what="HEALTHCHECK healthy")
        user = docker(clean_engine, "exec", cid, "id", "-u").stdout.strip()
        assert user == "10001"
        cfg = docker(clean_engine, "image", "inspect", "-f", "{{json .Config.Entrypoint}} {{.Config.User}}",
                     turnout_image).stdout.strip()
        assert cfg == '["turnout"] turnout'
        assert http("GET", f"http://127.0.0.1:{port}/") == (200, b"backend\n")
    finally:
        logs = docker(clean_engine, "logs", "--tail", "20", cid)
        docker(clean_engine, "rm", "-f", cid)
    assert "turnout: proxy listening on http://127.0.0.1:" in logs.stdout + logs.stderr
    # The image ships the compiled data plane (the build stage has a C compiler; see setup.py).
    assert "data plane compiled (mypyc)" in logs.stdout + logs.stderr
