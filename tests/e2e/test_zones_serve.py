"""Zones with `turnout serve` as real processes: two replicas (--zone, and `zone:` in the config file with two
workers) over real upstream servers in two zones: local traffic, exact spill-over, the status API and the
metrics."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import Turnout, http, wait_until

ZONES = ("eu-1a", "eu-1b")


class Servers:
    """One HTTP server per endpoint name; counts requests other than health checks."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.servers: dict[str, ThreadingHTTPServer] = {}
        self.lock = threading.Lock()

    def start(self, name: str) -> int:
        counts, lock = self.counts, self.lock

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path != "/healthz":
                    with lock:
                        counts[name] += 1
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers[name] = srv
        return int(srv.server_address[1])

    def stop(self, name: str) -> None:
        srv = self.servers.pop(name)
        srv.shutdown()
        srv.server_close()

    def taken(self) -> dict[str, int]:
        with self.lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


@contextmanager
def six_endpoints() -> Iterator[tuple[Servers, dict[str, int]]]:
    s = Servers()
    ports = {f"{z}-{i}": s.start(f"{z}-{i}") for z in ZONES for i in range(3)}
    try:
        yield s, ports
    finally:
        for name in list(s.servers):
            s.stop(name)


def routes(tmp: Path, ports: dict[str, int]) -> str:
    eps = ", ".join(f'{{url: "http://127.0.0.1:{p}", zone: {n.rsplit("-", 1)[0]}}}' for n, p in ports.items())
    f = tmp / "routes.yaml"
    f.write_text(f"versions:\n  v1: {{endpoints: [{eps}], health: {{path: /healthz, interval: 0.2}}}}\n"
                 "routes:\n  - {name: web, split: {v1: 1}, sticky: false}\n")
    return str(f)


def get(t: Turnout, n: int) -> None:
    for _ in range(n):
        status, _, _ = http("GET", t.url + "/")
        assert status == 200


def zone_view(t: Turnout) -> Any:
    status, stats = t.api("GET", "/api/v1/stats")
    assert status == 200
    return stats["zone"], stats["versions"][0]["zones"]


def samples(t: Turnout, name: str) -> dict[frozenset[tuple[str, str]], float]:
    _, _, body = http("GET", t.admin + "/metrics")
    return {frozenset(s.labels.items()): s.value for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name == name}


def test_two_replicas_keep_traffic_local_and_spill_the_exact_excess(tmp_path: Path) -> None:
    with six_endpoints() as (servers, ports):
        file = routes(tmp_path, ports)
        config = tmp_path / "b.yaml"
        config.write_text("zone: eu-1b\nworkers: 2\n")
        a = Turnout(tmp_path / "a", file, "--zone", "eu-1a")
        b = Turnout(tmp_path / "b", file, "--config", str(config))
        with a, b:
            get(a, 60)
            assert servers.taken() == {"eu-1a-0": 20, "eu-1a-1": 20, "eu-1a-2": 20}
            get(b, 60)  # two workers, each its own cycle: the zone is exact, not each endpoint
            taken = servers.taken()
            assert sum(taken.values()) == 60 and set(taken) <= {"eu-1b-0", "eu-1b-1", "eu-1b-2"}
            assert zone_view(a) == ("eu-1a", {
                "zones": [{"zone": "eu-1a", "endpoints": 3, "healthy": 3, "share": 1.0},
                          {"zone": "eu-1b", "endpoints": 3, "healthy": 3, "share": 0.0}],
                "leaving": 0.0, "leaving_measured": 0.0})
            wait_until(lambda: samples(b, "turnout_upstream_requests_total").get(
                frozenset({("version", "v1"), ("zone", "eu-1b")})) == 60)
            assert samples(a, "turnout_endpoint_up")[frozenset(
                {("version", "v1"), ("endpoint", f"http://127.0.0.1:{ports['eu-1a-0']}"), ("zone", "eu-1a")})] == 1

            servers.stop("eu-1a-1")
            servers.stop("eu-1a-2")
            # u = 1/4 of the healthy endpoints in eu-1a, t = 1/2 of the traffic: keep 1/2, spill 1/2 to eu-1b.
            wait_until(lambda: zone_view(a)[1]["zones"][0]["healthy"] == 1)
            get(a, 60)
            assert servers.taken() == {"eu-1a-0": 30, "eu-1b-0": 10, "eu-1b-1": 10, "eu-1b-2": 10}
            view = zone_view(a)[1]
            assert (view["leaving"], [z["share"] for z in view["zones"]]) == (0.5, [0.5, 0.5])
            get(b, 30)  # eu-1b is whole: b stays local
            assert set(servers.taken()) <= {"eu-1b-0", "eu-1b-1", "eu-1b-2"}
