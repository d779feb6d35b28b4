"""Local-process versions: replicas started with PORT, recorded once listening, restarted, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import changes
from proxy.control.leader import Leader
from proxy.parse import parse_document
from proxy.providers.local import LocalProvider, spec_key
from proxy.store import SQLiteStore


def fetch(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


async def test_local_versions_run_record_restart_and_stop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    doc = {"versions": {"lv": {"command": [sys.executable, "-m", "proxy.commands.demo_backend", "--name", "lv"],
                               "replicas": 2}},
           "routes": [{"name": "web", "split": {"lv": 1}}]}
    base = parse_document(doc)
    await store.update(lambda s: changes.apply_document(s, base), actor="t")
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
    doc = {"versions": {"lv": {"command": [sys.executable, "-m", "proxy.commands.demo_backend", "--name", "lv"],
                               "replicas": 2}},
           "routes": [{"name": "web", "split": {"lv": 1}}]}
    await store.update(lambda s: changes.apply_document(s, parse_document(doc)), actor="t")
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
        await store.update(lambda s: changes.set_instances(s, "lv", ("http://127.0.0.1:9",)), actor="provider:local")
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


def marked(mark: str) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if d.name.isdigit() and f"TEST_MARK={mark}".encode() in (d / "environ").read_bytes().split(b"\0"):
                out.add(int(d.name))
    return out


@pytest.fixture
def mark() -> Iterator[str]:
    """Every process started with TEST_MARK=<this> is killed at the end: providers with a state dir leave
    their processes running when they stop."""
    m = uuid.uuid4().hex
    yield m
    for pid in marked(m):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def local_doc(mark: str, **replicas: int) -> dict[str, object]:
    cmd = [sys.executable, "-m", "proxy.commands.demo_backend", "--name"]
    return {"versions": {n: {"command": [*cmd, n], "replicas": k, "env": {"TEST_MARK": mark}}
                         for n, k in replicas.items()},
            "routes": [{"name": "web", "split": {"lv": 1}}]}


def pids_of(provider: LocalProvider, name: str) -> list[int]:
    return [r.pid for r in provider.versions[name].replicas]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="adoption needs /proc start times")
async def test_a_restarted_provider_adopts_recorded_processes_and_stops_those_of_removed_versions(
        tmp_path: Path, mark: str) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.update(lambda s: changes.apply_document(s, parse_document(local_doc(mark, lv=2, old=1))), actor="t")
    first = LocalProvider(store, state_dir=tmp_path)
    await first.start()
    lv, old = pids_of(first, "lv"), pids_of(first, "old")
    endpoints = (await store.current()).state.versions["lv"].endpoints
    await first.stop()
    # Stopping the provider (as `serve` does on SIGTERM) leaves every instance running.
    assert marked(mark) == {*lv, *old}

    await store.update(lambda s: changes.delete_version(s, "old"), actor="t")
    rev = (await store.current()).number
    second = LocalProvider(store, state_dir=tmp_path)
    await second.start()
    try:
        # Same processes, same endpoints, nothing recorded anew; the removed version's process is stopped.
        assert (pids_of(second, "lv"), list(second.versions)) == (lv, ["lv"])
        assert marked(mark) == set(lv)
        cur = await store.current()
        assert (cur.number, cur.state.versions["lv"].endpoints) == (rev, endpoints)
        for ep in endpoints:
            assert (await asyncio.to_thread(fetch, ep + "/"))["version"] == "lv"
        # An adopted process that dies is started again on its port, as the provider's own children are.
        victim = second.versions["lv"].replicas[0]
        os.killpg(victim.pid, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if victim.pid != lv[0] and victim.alive():
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(fetch, victim.endpoint + "/")
                    break
        assert (victim.pid != lv[0], victim.restarts, victim.endpoint) == (True, 1, endpoints[0])
    finally:
        await second.stop()
        await store.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="adoption needs /proc start times")
async def test_a_recorded_pid_that_now_names_another_process_is_neither_adopted_nor_signalled(
        tmp_path: Path, mark: str) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.update(lambda s: changes.apply_document(s, parse_document(local_doc(mark, lv=1))), actor="t")
    bystander = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", "import time; time.sleep(60)"],
                                        start_new_session=True, env={**os.environ, "TEST_MARK": mark})
    try:
        provider = LocalProvider(store, state_dir=tmp_path)
        assert provider.records is not None
        v = (await store.current()).state.versions["lv"]
        # What a record looks like after its process exited and the pid went to another process: same pid,
        # other start time.
        provider.records.write_text(json.dumps({"store": store.url, "replicas": [
            {"version": "lv", "spec": spec_key(v), "port": 9, "pid": bystander.pid, "start": "1"}]}))
        await provider.start()
        try:
            assert pids_of(provider, "lv") != [bystander.pid] and bystander.poll() is None
            assert (await store.current()).state.versions["lv"].endpoints == (provider.versions["lv"].replicas[0]
                                                                             .endpoint,)
            # A second provider on the same state dir and store (etcd replicas on one host) records nothing.
            other = LocalProvider(store, state_dir=tmp_path, leader=Switch(False))
            await other.start()
            assert other.records is None
            await other.stop()
        finally:
            await provider.stop()
    finally:
        bystander.kill()
        bystander.wait()
        await store.close()
