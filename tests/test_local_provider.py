"""Local-process versions: replicas started with PORT, recorded once listening, restarted, stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from proxy import ops
from proxy.leader import Leader
from proxy.parse import parse_document
from proxy.providers.local import LocalProvider
from proxy.store import SQLiteStore


def fetch(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


async def test_local_versions_run_record_restart_and_stop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    doc = {"versions": {"lv": {"command": [sys.executable, "-m", "proxy.demo_backend", "--name", "lv"],
                               "replicas": 2}},
           "routes": [{"name": "web", "split": {"lv": 1}}]}
    base = parse_document(doc)
    await store.update(lambda s: ops.apply_document(s, base), actor="t")
    provider = LocalProvider(store)
    await provider.start()
    try:
        cur = await store.current()
        endpoints = cur.state.versions["lv"].endpoints
        assert len(endpoints) == 2 and cur.info.actor == "provider:local"
        for ep in endpoints:
            assert (await asyncio.to_thread(fetch, ep + "/x"))["version"] == "lv"
        # A replica that dies is started again on the same port.
        victim = provider.versions["lv"].replicas[0]
        assert victim.process is not None
        old_pid = victim.process.pid
        os.killpg(old_pid, signal.SIGKILL)
        for _ in range(200):
            await asyncio.sleep(0.05)
            if victim.process.pid != old_pid and victim.process.returncode is None:
                try:
                    await asyncio.to_thread(fetch, victim.endpoint)
                    break
                except OSError:
                    continue
        assert victim.process.pid != old_pid and victim.restarts == 1
        assert (await asyncio.to_thread(fetch, victim.endpoint))["version"] == "lv"
        assert (await store.current()).state.versions["lv"].endpoints == endpoints
    finally:
        pids = [r.process.pid for r in provider.versions["lv"].replicas if r.process]
        await provider.stop()
        await store.close()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"replica {pid} still running after stop()")


class Switch(Leader):
    """A `providers` election the test decides."""

    def __init__(self, leading: bool) -> None:
        self.leading = leading
        self.holder = "test"

    def is_leader(self) -> bool:
        return self.leading


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_only_the_elected_replica_runs_processes_and_a_demoted_one_stops_them_once_replaced(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    doc = {"versions": {"lv": {"command": [sys.executable, "-m", "proxy.demo_backend", "--name", "lv"],
                               "replicas": 2}},
           "routes": [{"name": "web", "split": {"lv": 1}}]}
    await store.update(lambda s: ops.apply_document(s, parse_document(doc)), actor="t")
    follower = LocalProvider(store, leader=Switch(False))
    await follower.start()
    leader = Switch(True)
    provider = LocalProvider(store, leader=leader)
    await provider.start()
    try:
        # The follower started nothing and recorded nothing; the elected one runs and records 2.
        assert follower.versions == {} and "following" in repr(follower)
        endpoints = (await store.current()).state.versions["lv"].endpoints
        assert len(endpoints) == 2
        pids = [r.process.pid for r in provider.versions["lv"].replicas if r.process]
        assert len(pids) == 2

        # Demoted (say its etcd lease lapsed): it keeps serving what the store routes to...
        leader.leading = False
        await asyncio.sleep(2.5)
        assert all(alive(p) for p in pids)
        assert (await asyncio.to_thread(fetch, endpoints[0] + "/"))["version"] == "lv"

        # ...until the store records another replica's instances; then its processes stop.
        await store.update(lambda s: ops.set_instances(s, "lv", ("http://127.0.0.1:9",)), actor="provider:local")
        for _ in range(100):
            if not any(alive(p) for p in pids):
                break
            await asyncio.sleep(0.1)
        assert not any(alive(p) for p in pids)
        assert provider.versions == {}

        # Elected again: it starts its own replicas and records them.
        leader.leading = True
        for _ in range(100):
            eps = (await store.current()).state.versions["lv"].endpoints
            if len(eps) == 2 and "http://127.0.0.1:9" not in eps:
                break
            await asyncio.sleep(0.1)
        assert len(eps) == 2 and "http://127.0.0.1:9" not in eps
        for ep in eps:
            assert (await asyncio.to_thread(fetch, ep + "/"))["version"] == "lv"
    finally:
        await provider.stop()
        await follower.stop()
        await store.close()
