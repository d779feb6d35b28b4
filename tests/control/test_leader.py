"""Leadership: with SQLite this process always leads; with etcd exactly one replica drives rollouts, and a
stopped leader hands over to the next (real etcd, started by the fixture)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

from proxy.control.canary import AlwaysLeader, EtcdLeader, leader_for
from proxy.store.sqlite import SQLiteStore
from tests.etcd.etcd_server import EtcdServer, find_etcd


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    if find_etcd() is None:
        reason = "etcd not installed (Debian package etcd-server provides /usr/bin/etcd)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_leader_for_sqlite_is_always_leader(tmp_path: object) -> None:
    from pathlib import Path

    store = SQLiteStore(Path(str(tmp_path)) / "s.db")
    leader = leader_for(store, "canary")
    assert isinstance(leader, AlwaysLeader) and leader.is_leader()


def test_leader_for_an_etcd_url_uses_the_stores_prefix() -> None:
    class FakeStore:
        url = "etcd://127.0.0.1:23790/shop"

    leader = leader_for(FakeStore(), "canary")  # type: ignore[arg-type]
    assert isinstance(leader, EtcdLeader)
    assert (leader.host, leader.port, leader.key) == ("127.0.0.1", 23790, b"/shop/leader/canary")
    assert repr(leader) == "<EtcdLeader /shop/leader/canary [following]>"


@pytest.mark.etcd
async def test_exactly_one_replica_leads_and_a_stopped_leader_hands_over(etcd: EtcdServer) -> None:
    key = f"/t-{uuid.uuid4().hex[:8]}/leader/canary"
    host, port = etcd.endpoint.split(":")
    a = EtcdLeader(host, int(port), key, ttl=2, identity="replica-a")
    b = EtcdLeader(host, int(port), key, ttl=2, identity="replica-b")
    await a.start()
    try:
        for _ in range(100):
            if a.is_leader():
                break
            await asyncio.sleep(0.05)
        assert a.is_leader()
        await b.start()
        await asyncio.sleep(1.0)  # b campaigns at least twice meanwhile
        assert (a.is_leader(), b.is_leader()) == (True, False)
        await a.stop()  # revokes its lease: the key goes at once
        for _ in range(100):
            if b.is_leader():
                break
            await asyncio.sleep(0.05)
        assert (a.is_leader(), b.is_leader()) == (False, True)
    finally:
        await a.stop()
        await b.stop()
