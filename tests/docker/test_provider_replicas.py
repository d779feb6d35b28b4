"""Three proxies on one etcd store and one Docker engine: exactly one drives the containers (the `providers`
election), the others report what it recorded, and a replica that takes over adopts the running containers
instead of starting new ones. Real etcd and real dockerd, both started by fixtures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from proxy.control.leader import EtcdLeader
from proxy.providers.containers import DockerProvider
from proxy.store import open_store
from proxy.store.base import Store
from tests.etcd.conftest import etcd_server  # noqa: F401 - the session's etcd, started by the fixture
from tests.etcd.etcd_server import EtcdServer

from .conftest import Images
from .engine import Dockerd
from .test_provider import fetch, instances, managed, register, until

pytestmark = [pytest.mark.docker, pytest.mark.etcd]

REPLICAS = 3


@pytest.fixture
async def stores(etcd_server: EtcdServer) -> AsyncIterator[list[Store]]:  # noqa: F811
    url = etcd_server.url(f"t-{uuid.uuid4().hex[:12]}")
    out = [open_store(url) for _ in range(REPLICAS)]
    yield out
    for s in out:
        await s.close()


def provider(store: Store, engine: Dockerd, etcd: EtcdServer, name: str) -> DockerProvider:
    host, port = etcd.endpoint.split(":")
    prefix = store.url.rsplit("/", 1)[-1]
    leader = EtcdLeader(host, int(port), f"/{prefix}/leader/providers", ttl=2, identity=name)
    return DockerProvider(store, base_url=engine.url, log=lambda msg: None, leader=leader)


async def test_one_replica_drives_the_containers_and_a_successor_adopts_them(
        stores: list[Store], images: Images, clean_engine: Dockerd, etcd_server: EtcdServer) -> None:  # noqa: F811
    providers = [provider(s, clean_engine, etcd_server, f"replica-{i}") for i, s in enumerate(stores)]
    for p in providers:
        await p.start()
    try:
        await until(lambda: _one(sum(p.role["leading"] for p in providers) == 1), what="one leader")
        [leader] = [p for p in providers if p.role["leading"]]
        followers = [p for p in providers if p is not leader]
        assert {p.role["holder"] for p in providers} == {leader.leader.holder}

        # A deploy through any replica is one revision; only the leader makes containers: 2, not 6.
        await register(stores[2], "v1", images.v1, replicas=2)
        for p in providers:
            p.kick()
        await until(lambda: _count(stores[0], "v1", 2), what="2 instances recorded")
        await asyncio.sleep(1.0)  # followers had every chance to start containers of their own
        running = {c.id for c in managed(clean_engine, "v1")}
        assert len(running) == 2
        eps = await instances(stores[1], "v1")
        for ep in eps:
            assert "v1" in await fetch(ep)
        # Followers answer from what the leader recorded.
        for p in followers:
            [s] = p.status((await p.store.current()).state)
            assert (s.healthy, s.desired, s.instances) == (2, 2, eps)
            assert [r.state for r in s.replicas] == ["healthy", "healthy"]
        assert repr(followers[0]).endswith("[following | versions: 1 | replicas: 0 healthy of 0]>")

        # The leader goes away (its lease is revoked): a follower takes over and adopts the same containers,
        # without a new revision of the instances.
        rev = (await stores[0].current()).number
        await leader.stop()
        providers.remove(leader)
        await until(lambda: _one(any(p.role["leading"] for p in providers)), timeout=15, what="a new leader")
        [successor] = [p for p in providers if p.role["leading"]]
        await until(lambda: _one(successor._adopted), what="adoption")
        [s] = successor.status()
        assert (s.healthy, s.desired) == (2, 2)
        assert {c.id for c in managed(clean_engine, "v1")} == running
        assert (await stores[0].current()).number == rev

        # The successor converges changes: scale to 3 through another replica's store.
        from proxy.changes import set_replicas

        await stores[0].update(lambda st: set_replicas(st, "v1", 3), actor="test", reason="scale")
        await until(lambda: _count(stores[1], "v1", 3), what="3 instances")
        assert len(managed(clean_engine, "v1")) == 3
        assert {c.id for c in managed(clean_engine, "v1")} > running
    finally:
        for p in providers:
            await p.stop()


async def _one(value: bool) -> bool:
    return value


async def _count(store: Store, name: str, n: int) -> bool:
    return len(await instances(store, name)) == n
