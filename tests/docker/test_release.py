"""Releasing with Docker end to end: `turnout serve` with its Docker provider, the operator CLI, and
requests through the real proxy to real containers (the story the README's "Releasing with Docker" tells)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from proxy.providers.containers import LABEL_MANAGED, LABEL_VERSION

from .conftest import Images
from .engine import Dockerd
from .helpers import free_port, http, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "docker-test-token"


class Serve:
    """`turnout serve` with the Docker provider on, as a real process on loopback ports."""

    def __init__(self, tmp: Path, engine: Dockerd) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.state = tmp / "state"
        self.env = {**engine.env, "TURNOUT_DOCKER": "1", "TURNOUT_ADMIN_TOKEN": TOKEN,
                    "TURNOUT_ADMIN": f"http://127.0.0.1:{self.admin_port}"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "serve.log"

    def start(self) -> Serve:
        args = [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin_port}", "--state-dir", str(self.state),
                "--store", f"sqlite://{self.state}/state.db"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: http("GET", f"http://127.0.0.1:{self.admin_port}/readyz")[0] == 200, what="readyz")
        # The provider starts right after the admin API; its endpoints answer once it runs.
        wait_until(lambda: self.api("GET", "/api/v1/docker/versions")[0] == 200, what="docker provider")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        status, data = http(method, f"http://127.0.0.1:{self.admin_port}{path}", body,
                            {"Authorization": f"Bearer {TOKEN}"})
        return status, json.loads(data) if data else None

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=self.env, text=True,
                              capture_output=True, timeout=timeout, check=False)

    def get(self, client: str | None = None) -> tuple[int, str]:
        headers = {"X-Client-Id": client} if client else {}
        status, body = http("GET", f"http://127.0.0.1:{self.port}/", headers=headers)
        return status, body.decode().strip()

    def versions_served(self, n: int, client: str | None = None) -> Counter[str]:
        out: Counter[str] = Counter()
        for _ in range(n):
            status, body = self.get(client)
            out[body if status == 200 else f"status {status}"] += 1
        return out


def containers(engine: Dockerd, version: str) -> dict[str, str]:
    """Container id -> StartedAt of a version's running containers."""
    client = engine.client()
    try:
        found = client.containers.list(filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_VERSION}={version}"]})
        return {c.id: c.attrs["State"]["StartedAt"] for c in found}
    finally:
        client.close()


@pytest.fixture
def serve(tmp_path: Path, clean_engine: Dockerd) -> Any:
    s = Serve(tmp_path, clean_engine)
    yield s
    s.stop()


def test_release_v2_beside_v1(serve: Serve, images: Images, clean_engine: Dockerd) -> None:
    serve.start()
    # Deploy v1 (by digest pin) and v2 (by tag, pinned once), each waiting until healthy.
    r = serve.cli("deploy", "v1", "--image", images.v1, "--replicas", "2", "--network", "host",
                  "--health-interval", "0.2", "--reason", "first release")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "v1: 2/2 healthy" in r.stdout and "v1 is ready: http://127.0.0.1:" in r.stdout
    r = serve.cli("deploy", "v2", "--image", "turnout-test/web:v2", "--allow-tag", "--network", "host",
                  "--health-interval", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "registered v2 (revision " in r.stdout and f"{images.v2} from turnout-test/web:v2" in r.stdout
    status, v2 = serve.api("GET", "/api/v1/versions/v2")
    assert (status, v2["spec"]["image"], len(v2["instances"])) == (200, images.v2, 1)

    # Canary by weight: 90/10 over 100 requests without a client id (weighted, not sticky).
    status, _ = serve.api("PUT", "/api/v1/routes/web", {
        "match": {"path_prefix": "/"}, "identity": [{"header": "X-Client-Id"}], "split": {"v1": 90, "v2": 10},
        "sticky": False, "fallback": ["v1"]})
    assert status == 201  # the proxy started without routes: this PUT creates the route
    wait_until(lambda: serve.get()[0] == 200, what="the route serving")
    assert serve.versions_served(100) == Counter({"v1": 90, "v2": 10})

    # Pin a client to v2.
    r = serve.cli("pin", "web", "acme", "v2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert serve.versions_served(10, client="acme") == Counter({"v2": 10})

    # The listing the lead's `turnout versions` can merge.
    r = serve.cli("docker-versions")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert lines["v1"][1:3] == ["2/2", images.v1] and lines["v1"][-1] == "web"
    assert lines["v2"][1:3] == ["1/1", images.v2]

    # All traffic to v2, then roll back: v1's containers never stopped, so v1 answers at once.
    v1_before = containers(clean_engine, "v1")
    r = serve.cli("split", "web", "v1=0", "v2=100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert serve.versions_served(5) == Counter({"v2": 5})
    r = serve.cli("rollback", "web")
    assert r.returncode == 0, r.stdout + r.stderr
    assert serve.versions_served(100) == Counter({"v1": 90, "v2": 10})
    assert containers(clean_engine, "v1") == v1_before

    # Retire is refused while a route references v2 (split and pin), then allowed.
    r = serve.cli("retire", "v2")
    assert r.returncode == 1
    assert "still referenced by route(s) web" in r.stderr
    assert len(containers(clean_engine, "v2")) == 1
    assert serve.cli("unpin", "web", "acme").returncode == 0
    status, _ = serve.api("PUT", "/api/v1/routes/web", {
        "match": {"path_prefix": "/"}, "identity": [{"header": "X-Client-Id"}], "split": {"v1": 100},
        "sticky": False, "fallback": ["v1"]})
    assert status == 200
    r = serve.cli("retire", "v2", "--reason", "v1 stays")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "its containers are removed" in r.stdout
    assert containers(clean_engine, "v2") == {}
    assert serve.versions_served(10) == Counter({"v1": 10})
    status, hist = serve.api("GET", "/api/v1/revisions?limit=50")
    summaries = [h["summary"] for h in hist["revisions"]]
    assert "retire version v2" in summaries and "register version v1 (docker)" in summaries


def test_scale_to_zero_is_refused_while_the_version_serves(serve: Serve, images: Images,
                                                           clean_engine: Dockerd) -> None:
    serve.start()
    for name, image in (("v1", images.v1), ("v2", images.v2)):
        r = serve.cli("deploy", name, "--image", image, "--network", "host", "--health-interval", "0.2")
        assert r.returncode == 0, r.stdout + r.stderr
    status, _ = serve.api("PUT", "/api/v1/routes/web", {
        "identity": [{"header": "X-Client-Id"}], "split": {"v1": 70, "v2": 30}, "sticky": False,
        "pins": {"acme": "v2"}})
    assert status == 201
    wait_until(lambda: serve.get()[0] == 200, what="the route serving")
    r = serve.cli("scale", "v2", "0")
    assert r.returncode == 1
    assert r.stderr == ("error: Conflicts with the current state (409): version 'v2' receives traffic on route(s) "
                        "web: with 0 replicas those requests would fail (503); move its traffic first, or force\n")
    assert serve.api("GET", "/api/v1/versions/v2")[1]["spec"]["replicas"] == 1  # nothing was changed
    assert len(containers(clean_engine, "v2")) == 1
    assert serve.versions_served(30) == Counter({"v1": 21, "v2": 9})
    assert serve.versions_served(3, client="acme") == Counter({"v2": 3})
    # The operator who means it: --force, and v2's containers go.
    r = serve.cli("scale", "v2", "0", "--force", "--no-wait")
    assert (r.returncode, r.stdout) == (0, "scale v2: 1 -> 0 replica(s)\n")
    wait_until(lambda: containers(clean_engine, "v2") == {}, what="v2's containers removed")


def test_kill_and_restart_keep_serving(serve: Serve, images: Images, clean_engine: Dockerd) -> None:
    serve.start()
    r = serve.cli("deploy", "v1", "--image", images.v1, "--replicas", "2", "--network", "host",
                  "--health-interval", "0.2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert (out["changed"], out["image"], out["status"]["healthy"], len(out["status"]["instances"])) == (
        True, images.v1, 2, 2)
    serve.api("PUT", "/api/v1/routes/web", {"match": {"path_prefix": "/"}, "split": {"v1": 100}})
    wait_until(lambda: serve.get() == (200, "v1"), what="v1 serving")

    # A killed container leaves rotation and is replaced; the proxy serves throughout from the other one.
    before = containers(clean_engine, "v1")
    client = clean_engine.client()
    try:
        client.containers.get(next(iter(before))).kill()
    finally:
        client.close()
    wait_until(lambda: len(containers(clean_engine, "v1")) == 2 and set(containers(clean_engine, "v1")) != set(before),
               what="a replacement")
    wait_until(lambda: len(serve.api("GET", "/api/v1/versions/v1")[1]["instances"]) == 2, what="2 instances")
    assert serve.versions_served(20) == Counter({"v1": 20})

    # A proxy restart adopts the running containers: same ids, same start times, serving at once.
    running = containers(clean_engine, "v1")
    serve.stop()
    serve.start()
    assert serve.versions_served(20) == Counter({"v1": 20})
    assert containers(clean_engine, "v1") == running
    _status, v = serve.api("GET", "/api/v1/docker/versions/v1")
    assert (v["healthy"], v["desired"]) == (2, 2), v


def test_deploy_that_never_gets_healthy_reports_logs_and_gets_no_traffic(
        serve: Serve, images: Images) -> None:
    serve.start()
    r = serve.cli("deploy", "bad", "--image", images.broken, "--network", "host", "--timeout", "60")
    assert r.returncode == 1
    assert "bad did not get healthy: keeps exiting" in r.stdout
    assert "  | fatal: DATABASE_URL is not set" in r.stdout
    assert "receives no traffic" in r.stdout
    status, v = serve.api("GET", "/api/v1/versions/bad")
    assert (status, v["instances"]) == (200, [])
    # An image the engine does not have is refused before anything is registered (nothing is pulled).
    r = serve.cli("deploy", "ghost", "--image", "turnout-test/web@sha256:" + "0" * 64, "--network", "host")
    assert r.returncode == 1
    assert "no image turnout-test/web@sha256:0000" in r.stderr and "nothing is pulled" in r.stderr
    assert serve.api("GET", "/api/v1/versions/ghost")[0] == 404



def test_engine_down_data_plane_keeps_serving(tmp_path: Path, own_dockerd: tuple[Dockerd, Images]) -> None:
    engine, imgs = own_dockerd  # live restore: containers outlive the engine, as in production
    serve = Serve(tmp_path, engine).start()
    try:
        r = serve.cli("deploy", "v1", "--image", imgs.v1, "--replicas", "2", "--network", "host",
                      "--health-interval", "0.2")
        assert r.returncode == 0, r.stdout + r.stderr
        serve.api("PUT", "/api/v1/routes/web", {"match": {"path_prefix": "/"}, "split": {"v1": 100}})
        wait_until(lambda: serve.get() == (200, "v1"), what="v1 serving")

        engine.stop()
        assert serve.versions_served(30) == Counter({"v1": 30})
        r = serve.cli("scale", "v1", "3")
        assert r.returncode == 1
        assert "the Docker engine is unreachable at unix://" in r.stderr
        assert serve.api("GET", "/api/v1/versions/v1")[1]["spec"]["replicas"] == 2  # nothing was changed
        r = serve.cli("docker-versions")
        assert r.returncode == 0 and r.stdout.startswith("warning: ")
        assert serve.versions_served(30) == Counter({"v1": 30})

        engine.start()
        wait_until(lambda: serve.api("GET", "/api/v1/docker/versions")[1]["engine"]["ok"], what="engine back")
        r = serve.cli("scale", "v1", "3", "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "v1: 3/3 healthy" in r.stdout
        assert serve.versions_served(30) == Counter({"v1": 30})
    finally:
        serve.stop()
