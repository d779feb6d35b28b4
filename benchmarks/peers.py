"""The servers of a benchmark run: the two backend versions, and the proxies under test.

The peers' configurations are the shared anchors (benchmarks/configs/haproxy.cfg.tmpl and nginx.conf.tmpl,
copied verbatim): keep-alive on both sides, one worker/thread, logging off. Only the idle-connection test
renders them with room for its connections (`max_conns`), because the anchors' limits (HAProxy maxconn
4000, nginx worker_connections 4096) would refuse most of 10,000 clients.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import Proc, Processes, StartError, free_port, pinned, wait_http, wait_port

CONFIGS = Path(__file__).parent / "configs"
REPO = Path(__file__).resolve().parent.parent
BIG_FILE_BYTES = 100 * 1024 * 1024
# Client ids the load generators cycle through; the first PINNED_IN_TRAFFIC are pinned in every route file,
# so 10% of requests take the pin lookup and the rest the sticky hash, whatever the pin count.
TRAFFIC_CLIENTS = 100
PINNED_IN_TRAFFIC = 10
ROUTE = "bench"


def render(template: str, **values: str) -> str:
    text = (CONFIGS / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = [p for p in ("@LISTEN@", "@V1@", "@V2@", "@RUN@", "@WWW@") if p in text]
    if left:
        raise ValueError(f"{template}: placeholder(s) {', '.join(left)} left unfilled")
    return text


@dataclass
class Target:
    """Something a load generator can aim at: a proxy (with its process group) or the backend itself."""

    name: str  # "direct", "turnout", "haproxy", "nginx"
    port: int
    proc: Proc | None = None
    admin_port: int | None = None
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Backends:
    v1: int
    v2: int
    proc: Proc


class Lab:
    """Starts servers into one work folder and registers them for stopping."""

    def __init__(self, work: Path, procs: Processes, proxy_core: int | None, load_core: int | None) -> None:
        self.work = work
        self.procs = procs
        self.proxy_core = proxy_core
        self.load_core = load_core
        self._n = 0

    def _dir(self, name: str) -> Path:
        self._n += 1
        d = self.work / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d

    # Backends

    def start_backends(self) -> Backends:
        run = self._dir("backends")
        # nginx's workers drop root for `nobody`, who may not traverse the work folder (pytest's tmp_path is
        # 0700): the file they serve lives in a folder of its own that anyone may read.
        www = Path(tempfile.mkdtemp(prefix="turnout-bench-www-"))
        self.procs.add_cleanup(lambda: shutil.rmtree(www, ignore_errors=True))
        os.chmod(www, 0o755)
        with open(www / "big", "wb") as f:  # sparse: costs no disk, reads as zeros
            f.truncate(BIG_FILE_BYTES)
        os.chmod(www / "big", 0o644)
        v1, v2 = free_port(), free_port()
        conf = run / "backends.conf"
        conf.write_text(render("backends.conf.tmpl", V1=f"127.0.0.1:{v1}", V2=f"127.0.0.1:{v2}", RUN=str(run),
                               WWW=str(www)))
        proc = self.procs.start("backends", pinned(["nginx", "-c", str(conf), "-e", str(run / "nginx.err")],
                                                   self.load_core), run / "stdout.log")
        wait_http(proc, v1, 10.0)
        wait_http(proc, v2, 10.0)
        return Backends(v1, v2, proc)

    # Peers

    def start_haproxy(self, b: Backends, max_conns: int | None = None) -> Target:
        run = self._dir("haproxy")
        port = free_port()
        text = render("haproxy.cfg.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                      V2=f"127.0.0.1:{b.v2}", RUN=str(run))
        if max_conns is not None:
            # HAProxy reserves two descriptors per connection; with the usual 20000 hard limit it refuses
            # maxconn > ~9900 unless told that the limit is advisory (idle clients hold one descriptor each).
            text = text.replace("maxconn 4000", f"maxconn {max_conns + 100}\n  no strict-limits")
        conf = run / "haproxy.cfg"
        conf.write_text(text)
        proc = self.procs.start("haproxy", pinned(["haproxy", "-f", str(conf)], self.proxy_core), run / "stdout.log")
        wait_http(proc, port, 10.0)
        return Target("haproxy", port, proc)

    def start_nginx(self, b: Backends, max_conns: int | None = None) -> Target:
        run = self._dir("nginx")
        port = free_port()
        text = render("nginx.conf.tmpl", LISTEN=f"127.0.0.1:{port}", V1=f"127.0.0.1:{b.v1}",
                      V2=f"127.0.0.1:{b.v2}", RUN=str(run))
        if max_conns is not None:
            text = text.replace("worker_connections 4096;", f"worker_connections {max_conns + 1000};")
        conf = run / "nginx.conf"
        conf.write_text(text)
        proc = self.procs.start("nginx", pinned(["nginx", "-c", str(conf), "-e", str(run / "nginx.err")],
                                                self.proxy_core), run / "stdout.log")
        wait_http(proc, port, 10.0)
        return Target("nginx", port, proc)

    # Turnout

    def write_routes(self, b: Backends, pins: int, run: Path, split: dict[str, int] | None = None) -> Path:
        """The benchmark route: sticky 90/10 over v1/v2 by X-Client-Id, with `pins` pinned client ids."""
        pin_map = {f"c{i}": "v2" for i in range(min(pins, PINNED_IN_TRAFFIC))}
        for i in range(len(pin_map), pins):
            pin_map[f"p{i:06d}"] = "v1" if i % 2 else "v2"
        doc = {
            "versions": {"v1": {"endpoints": [f"http://127.0.0.1:{b.v1}"]},
                         "v2": {"endpoints": [f"http://127.0.0.1:{b.v2}"]}},
            "routes": [{
                "name": ROUTE,
                "match": {"path_prefix": "/"},
                "identity": [{"header": "X-Client-Id"}],
                "split": split or {"v1": 90, "v2": 10},
                "sticky": True,
                "pins": pin_map,
                "fallback": ["v1"],
            }],
        }
        path = run / "routes.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML; a 100,000-pin file is written in milliseconds
        return path

    def start_turnout(self, b: Backends, *, pins: int = 10_000, workers: int = 1, store: str | None = None,
                      routes: Path | None = None, name: str = "turnout", pin_core: bool = True,
                      ready_timeout: float = 90.0, extra: Sequence[str] = ()) -> Target:
        run = self._dir(name)
        port, admin = free_port(), free_port()
        token = secrets.token_hex(16)
        routes = routes or self.write_routes(b, pins, run)
        argv = [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
                "--store", store or f"sqlite:///{run / 'state.db'}",
                "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                "--workers", str(workers), "--shutdown-grace", "1", "--state-dir", str(run), *extra]
        env = dict(os.environ, TURNOUT_STATE_DIR=str(run), TURNOUT_ADMIN_TOKEN=token, PYTHONPATH=str(REPO))
        proc = self.procs.start(name, pinned(argv, self.proxy_core if pin_core else None), run / "stdout.log",
                                env=env, cwd=REPO)
        wait_http(proc, port, ready_timeout, headers={"X-Client-Id": "ready"})
        wait_port(proc, admin, ready_timeout)
        return Target(name, port, proc, admin, token)


def turnout_missing() -> str | None:
    """Why turnout cannot be benchmarked in this tree (None: it can be started)."""
    for module in ("proxy.supervisor.main", "proxy.dataplane.listener", "proxy.admin.app"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"turnout serve is not available: module {module} does not exist yet"
    return None


__all__ = ["Backends", "Lab", "StartError", "Target", "turnout_missing"]
