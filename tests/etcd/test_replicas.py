"""Three `turnout serve` replicas sharing one etcd: a change made through any admin API is served by all,
concurrent writers lose no update, and an etcd outage loses nothing (the replicas keep serving and converge)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Turnout, backend, http, wait_until

from .etcd_server import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

REPLICAS = 3
CLIENTS = ("alice", "bob", "carol", "dave")


def version_of(replica: Turnout, client: str) -> str:
    status, _, body = http("GET", replica.url + "/", headers={"X-Client-Id": client})
    assert status == 200, body
    return str(json.loads(body)["version"])


def all_serve(replicas: list[Turnout], version: str) -> bool:
    return all(version_of(r, c) == version for r in replicas for c in CLIENTS)


def state_of(replica: Turnout) -> dict[str, Any]:
    status, body = replica.api("GET", "/api/v1/state")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def readiness(replica: Turnout) -> tuple[int, dict[str, Any]]:
    status, _, body = http("GET", replica.admin + "/readyz")
    return status, json.loads(body)


@pytest.fixture
def replicas(tmp_path: Path, own_etcd: EtcdServer) -> Iterator[list[Turnout]]:
    with ExitStack() as stack:
        p1 = stack.enter_context(backend("v1"))
        p2 = stack.enter_context(backend("v2"))
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{p1}"]}}
  v2: {{endpoints: ["http://127.0.0.1:{p2}"]}}
routes:
  - name: web
    identity: [{{header: X-Client-Id}}]
    split: {{v1: 100, v2: 0}}
    fallback: [v1]
""")
        out = []
        for i in range(REPLICAS):
            # Each replica has its own ports and state directory (admin token); only etcd is shared.
            t = Turnout(tmp_path / f"r{i}", str(routes), "--store", own_etcd.url("turnout"))
            out.append(stack.enter_context(t))
        yield out


def test_replicas_share_changes_lose_no_update_and_survive_an_etcd_outage(
        replicas: list[Turnout], own_etcd: EtcdServer) -> None:
    r0, r1, r2 = replicas
    # The route file seeded the store once: the later replicas found it already applied.
    assert [state_of(r)["revision"] for r in replicas] == [1, 1, 1]
    assert all_serve(replicas, "v1")

    # 1. A change through any replica's admin API is served by all three.
    status, body = r1.api("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100}, reason="canary done")
    assert status == 200, body
    wait_until(lambda: all_serve(replicas, "v2"))
    status, body = r2.api("PATCH", "/api/v1/routes/web/split", {"v1": 100, "v2": 0}, If_Match='"2"')
    assert status == 200, body
    wait_until(lambda: all_serve(replicas, "v1"))

    # 2. Two replicas write from the same revision with If-Match: exactly one wins, the other gets 412.
    barrier = threading.Barrier(2)

    def patch(replica: Turnout, v2: int) -> tuple[int, Any]:
        barrier.wait()
        return replica.api("PATCH", "/api/v1/routes/web/split", {"v1": 100 - v2, "v2": v2}, If_Match='"3"')

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(patch, (r0, r2), (30, 70)))
    assert sorted(s for s, _ in results) == [200, 412]
    winner = 30 if results[0][0] == 200 else 70
    assert all(state_of(r)["routes"]["web"]["split"]["v2"] == winner for r in replicas)
    assert state_of(r1)["revision"] == 4

    # Without If-Match, concurrent writes through different replicas are all kept (none overwrites another).
    def pin_many(replica: Turnout, who: int) -> list[int]:
        return [replica.api("PUT", f"/api/v1/routes/web/pins/w{who}-{i}", {"version": "v2"})[0] for i in range(6)]

    with ThreadPoolExecutor(REPLICAS) as pool:
        statuses = list(pool.map(pin_many, replicas, range(REPLICAS)))
    assert statuses == [[200] * 6] * REPLICAS
    pinned = {f"w{w}-{i}" for w in range(REPLICAS) for i in range(6)}
    assert set(state_of(r2)["routes"]["web"]["pins"]) == pinned
    assert state_of(r0)["revision"] == 4 + len(pinned)
    wait_until(lambda: all(version_of(r, "w0-0") == "v2" for r in replicas))

    # 3. etcd goes away: writes answer 503, every replica keeps serving its table.
    before = state_of(r0)["revision"]
    served = {c: version_of(r0, c) for c in (*CLIENTS, "w1-3")}
    assert served["w1-3"] == "v2"
    own_etcd.stop(signal.SIGKILL)
    status, body = r0.api("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100})
    assert status == 503, body
    # Still ready: it serves its last table; the body says the store is away.
    ready_status, ready_body = readiness(r1)
    assert ready_status == 200 and ready_body["store"].startswith("unavailable")
    assert all({c: version_of(r, c) for c in served} == served for r in replicas)

    # etcd comes back with its data: a write through another replica lands and all of them converge on it.
    own_etcd.start()
    wait_until(lambda: r2.api("PATCH", "/api/v1/routes/web/split", {"v1": 0, "v2": 100})[0] == 200, timeout=30)
    wait_until(lambda: all_serve(replicas, "v2"), timeout=30)
    wait_until(lambda: all(readiness(r) == (200, {"status": "ready", "store": "ok", "store_revision": before + 1,
                                                 "table_revision": before + 1}) for r in replicas), timeout=30)
    final = state_of(r0)
    assert final["revision"] == before + 1
    assert set(final["routes"]["web"]["pins"]) == pinned
    status, history = r1.api("GET", "/api/v1/revisions?limit=100")
    assert status == 200, history
    assert [h["revision"] for h in history["revisions"]] == list(range(before + 1, 0, -1))


def test_local_versions_run_on_one_replica_and_move_when_it_stops(tmp_path: Path, etcd_server: EtcdServer) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
versions:
  lv: {{command: ["{sys.executable}", "-m", "proxy.commands.demo_backend", "--name", "lv"], replicas: 2}}
routes:
  - name: web
    split: {{lv: 100}}
""")
    url = etcd_server.url(f"t-{uuid.uuid4().hex[:12]}")
    replicas = [Turnout(tmp_path / f"r{i}", str(routes), "--store", url) for i in range(REPLICAS)]
    try:
        for r in replicas:
            r.start()

        def leading(r: Turnout) -> bool:
            status, body = r.api("GET", "/api/v1/docker/versions")
            return status == 200 and bool(body["engine"]["leading"])

        def serving(rs: list[Turnout]) -> bool:
            return all(http("GET", r.url + "/")[0] == 200 for r in rs)

        wait_until(lambda: sum(map(leading, replicas)) == 1 and serving(replicas), timeout=30)
        [runner] = [r for r in replicas if leading(r)]
        first = state_of(replicas[0])["versions"]["lv"]["instances"]
        assert len(first) == 2
        time.sleep(2.0)  # every replica had time to start processes of its own, had it been allowed to
        status, history = replicas[1].api("GET", "/api/v1/revisions?limit=100")
        assert status == 200, history
        assert [h["actor"] for h in history["revisions"]].count("provider:local") == 1

        # The replica running them stops: another one is elected, starts its own and records them.
        assert runner.stop() == 0
        rest = [r for r in replicas if r is not runner]
        wait_until(lambda: set(state_of(rest[0])["versions"]["lv"]["instances"]).isdisjoint(first)
                   and len(state_of(rest[0])["versions"]["lv"]["instances"]) == 2, timeout=30)
        wait_until(lambda: serving(rest) and sum(map(leading, rest)) == 1, timeout=30)
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()  # SIGTERM: the replica stops the processes it runs
