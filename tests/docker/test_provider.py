"""The Docker provider against a real engine: deploy, health, replacement, adoption, retire, engine loss."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.changes import delete_version, put_route, put_version
from proxy.errors import ConflictError
from proxy.model import Route
from proxy.parse import parse_version_body
from proxy.providers.containers import LABEL_IMAGE, LABEL_MANAGED, LABEL_VERSION, DockerProvider
from proxy.store.base import Store
from proxy.store.sqlite import SQLiteStore
from proxy.table import RouteTable

from .conftest import Images
from .engine import Dockerd

pytestmark = pytest.mark.docker

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> str:
    with _opener.open(url, timeout=5) as r:
        return str(r.read().decode().strip())


async def fetch(url: str) -> str:
    return await asyncio.to_thread(get, url)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.1)


def version_body(image: str, replicas: int = 1) -> dict[str, Any]:
    return {"image": image, "replicas": replicas, "network": "host", "health": {"path": "/", "interval": 0.2}}


async def register(store: Store, name: str, image: str, replicas: int = 1) -> None:
    v = parse_version_body(version_body(image, replicas), name, time.time())
    await store.update(lambda s: put_version(s, v), actor="test", reason="deploy")


async def instances(store: Store, name: str) -> tuple[str, ...]:
    v = (await store.current()).state.versions.get(name)
    return () if v is None else v.endpoints


def managed(engine: Dockerd, version: str | None = None) -> list[Any]:
    client = engine.client()
    try:
        labels = [f"{LABEL_MANAGED}=true"] + ([f"{LABEL_VERSION}={version}"] if version else [])
        return list(client.containers.list(all=True, filters={"label": labels}))
    finally:
        client.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    await s.close()


@pytest.fixture
async def provider(store: SQLiteStore, clean_engine: Dockerd) -> AsyncIterator[DockerProvider]:
    p = DockerProvider(store, base_url=clean_engine.url, log=lambda msg: None)
    await p.start()
    yield p
    await p.stop()


async def test_deploy_two_versions_serves_each_from_its_own_containers(
        store: SQLiteStore, provider: DockerProvider, images: Images, clean_engine: Dockerd) -> None:
    await register(store, "v1", images.v1, replicas=2)
    await register(store, "v2", images.v2, replicas=1)
    provider.kick()
    await until(lambda: _counts(store, {"v1": 2, "v2": 1}), what="2 v1 + 1 v2 instances")
    state = (await store.current()).state
    assert [await fetch(ep) for ep in state.versions["v1"].endpoints] == ["v1", "v1"]
    assert [await fetch(ep) for ep in state.versions["v2"].endpoints] == ["v2"]
    # Every endpoint is a loopback URL, and each container carries the labels naming what it runs.
    assert all(ep.startswith("http://127.0.0.1:") for v in state.versions.values() for ep in v.endpoints)
    containers = managed(clean_engine)
    assert sorted((c.labels[LABEL_VERSION], c.labels[LABEL_IMAGE]) for c in containers) == [
        ("v1", images.v1), ("v1", images.v1), ("v2", images.v2)]
    status = {s.name: (s.healthy, s.desired) for s in provider.status()}
    assert status == {"v1": (2, 2), "v2": (1, 1)}
    assert repr(provider) == (f"<DockerProvider {provider.state_id} "
                              "[engine up | versions: 2 | replicas: 3 healthy of 3]>")

    # A 90/10 split over the provider's endpoints: 100 weighted picks give 90 v1 and 10 v2, and each pick
    # is answered by a container of the chosen version.
    route = Route(name="web", split=(("v1", 90.0), ("v2", 10.0)), sticky=False)
    await store.update(lambda s: put_route(s, route), actor="test")
    rev = await store.current()
    table = RouteTable(rev.state, rev.number)
    compiled = table.match("example", "/", {})
    assert compiled is not None
    picked = [compiled.pick(None)[1][0] for _ in range(100)]
    assert (picked.count("v1"), picked.count("v2")) == (90, 10)
    answers = {v: await fetch(rev.state.versions[v].endpoints[0]) for v in ("v1", "v2")}
    assert answers == {"v1": "v1", "v2": "v2"}


async def _counts(store: SQLiteStore, want: dict[str, int]) -> bool:
    state = (await store.current()).state
    return all(len(state.versions[n].endpoints) == k for n, k in want.items() if n in state.versions) \
        and all(n in state.versions for n in want)


async def test_killed_container_leaves_rotation_and_is_replaced(
        store: SQLiteStore, provider: DockerProvider, images: Images, clean_engine: Dockerd) -> None:
    await register(store, "v1", images.v1, replicas=2)
    provider.kick()
    await until(lambda: _counts(store, {"v1": 2}), what="2 instances")
    before = {c.id: c for c in managed(clean_engine, "v1")}
    victim = next(iter(before.values()))
    victim_port = victim.labels["turnout.port"]
    seen: list[tuple[str, ...]] = []

    async def watch() -> None:
        async for rev in store.watch((await store.current()).number):
            seen.append(rev.state.versions["v1"].endpoints)

    watcher = asyncio.get_running_loop().create_task(watch())
    victim.kill()
    await until(lambda: _replaced(clean_engine, set(before)), what="a replacement container")
    await until(lambda: _counts(store, {"v1": 2}), what="2 instances again")
    watcher.cancel()
    # The killed replica's endpoint left rotation before its replacement joined.
    assert any(len(eps) == 1 and not any(ep.endswith(f":{victim_port}") for ep in eps) for eps in seen)
    after = managed(clean_engine, "v1")
    assert len(after) == 2
    assert victim.id not in {c.id for c in after}
    for ep in await instances(store, "v1"):
        assert await fetch(ep) == "v1"


async def _replaced(engine: Dockerd, old: set[str]) -> bool:
    running = [c for c in managed(engine, "v1") if c.status == "running"]
    return len(running) == 2 and bool({c.id for c in running} - old)


async def test_restart_adopts_running_containers_without_restarting_them(
        store: SQLiteStore, images: Images, clean_engine: Dockerd) -> None:
    first = DockerProvider(store, base_url=clean_engine.url, log=lambda msg: None)
    await first.start()
    await register(store, "v1", images.v1, replicas=2)
    first.kick()
    await until(lambda: _counts(store, {"v1": 2}), what="2 instances")
    await first.stop()
    before = {c.id: c.attrs["State"]["StartedAt"] for c in managed(clean_engine)}
    rev_before = (await store.current()).number

    second = DockerProvider(store, base_url=clean_engine.url, log=lambda msg: None)
    await second.start()
    try:
        await asyncio.sleep(1.0)  # several probe rounds at 0.2 s
        after = {c.id: c.attrs["State"]["StartedAt"] for c in managed(clean_engine)}
        assert after == before
        # Adopted replicas stayed in rotation: no revision rewrote the instances.
        assert (await store.current()).number == rev_before
        assert [(s.healthy, s.desired) for s in second.status()] == [(2, 2)]
    finally:
        await second.stop()


async def test_retire_is_refused_while_referenced_then_removes_containers(
        store: SQLiteStore, provider: DockerProvider, images: Images, clean_engine: Dockerd) -> None:
    await register(store, "v1", images.v1)
    await register(store, "v2", images.v2)
    provider.kick()
    await until(lambda: _counts(store, {"v1": 1, "v2": 1}), what="instances")
    route = Route(name="web", split=(("v1", 100.0), ("v2", 0.0)))
    await store.update(lambda s: put_route(s, route), actor="test")
    with pytest.raises(ConflictError, match="still referenced by route"):
        await store.update(lambda s: delete_version(s, "v2"), actor="test")
    assert len(managed(clean_engine, "v2")) == 1

    await store.update(lambda s: put_route(s, dataclasses.replace(route, split=(("v1", 100.0),))), actor="test")
    await store.update(lambda s: delete_version(s, "v2"), actor="ops", reason="v1 is the release")
    provider.kick()
    assert await provider.wait_removed("v2", 20.0) == 0
    assert managed(clean_engine, "v2") == []
    assert len(managed(clean_engine, "v1")) == 1
    history = await store.history(limit=1)
    assert (history[0].summary, history[0].actor) == ("retire version v2", "ops")


async def test_scale_up_and_down(store: SQLiteStore, provider: DockerProvider, images: Images,
                                 clean_engine: Dockerd) -> None:
    await register(store, "v1", images.v1, replicas=1)
    provider.kick()
    await until(lambda: _counts(store, {"v1": 1}), what="1 instance")
    first = {c.id for c in managed(clean_engine, "v1")}
    await provider.scale("v1", 3, actor="ops")
    await until(lambda: _counts(store, {"v1": 3}), what="3 instances")
    assert first <= {c.id for c in managed(clean_engine, "v1")}  # scaling up keeps what runs
    await provider.scale("v1", 1, actor="ops")
    await until(lambda: _counts(store, {"v1": 1}), what="1 instance")
    await until(lambda: _len(managed(clean_engine, "v1"), 1), what="1 container")
    assert {c.id for c in managed(clean_engine, "v1")} == first  # replica 0 stays
    history = [i.summary for i in await store.history(limit=10)]
    assert "scale v1: 1 -> 3 replica(s)" in history and "scale v1: 3 -> 1 replica(s)" in history


async def _len(items: list[Any], n: int) -> bool:
    return len(items) == n


async def test_a_version_that_never_gets_healthy_gets_no_instances_and_keeps_its_logs(
        store: SQLiteStore, provider: DockerProvider, images: Images) -> None:
    await register(store, "bad", images.broken)
    provider.kick()
    status = await until(lambda: _failing(provider, "bad"), timeout=30, what="failing")
    assert status.healthy == 0
    assert await instances(store, "bad") == ()
    rep = status.replicas[0]
    assert rep.error == "exited with code 3"
    assert "fatal: DATABASE_URL is not set" in rep.last_logs
    logs = await provider.logs("bad")
    assert any("fatal: DATABASE_URL is not set" in lines for lines in logs.values())


async def _failing(provider: DockerProvider, name: str) -> Any:
    for s in provider.status():
        if s.name == name and s.failing:
            return s
    return None


async def test_missing_image_is_reported_not_pulled(store: SQLiteStore, provider: DockerProvider) -> None:
    await register(store, "ghost", "turnout-test/ghost@sha256:" + "ab" * 32)
    provider.kick()
    status = await until(lambda: _error(provider, "ghost"), what="an image error")
    assert "no image turnout-test/ghost@sha256:abab" in status.error
    assert "nothing is pulled" in status.error


async def _error(provider: DockerProvider, name: str) -> Any:
    for s in provider.status():
        if s.name == name and s.error:
            return s
    return None


async def test_tags_resolve_to_the_image_id_pin(provider: DockerProvider, images: Images) -> None:
    resolved = await provider.resolve_image("turnout-test/web:v2")
    assert (resolved.pinned, resolved.tag) == (images.v2, "turnout-test/web:v2")
    assert resolved.image_id == images.v2.split("@", 1)[1]
    pinned = await provider.resolve_image(images.v1)
    assert (pinned.pinned, pinned.tag) == (images.v1, None)


@pytest.mark.slow
async def test_engine_down_keeps_instances_serving_and_provider_resumes(
        tmp_path: Path, own_dockerd: tuple[Dockerd, Images]) -> None:
    engine, imgs = own_dockerd
    store = SQLiteStore(tmp_path / "state.db")
    messages: list[str] = []
    provider = DockerProvider(store, base_url=engine.url, log=messages.append)
    await provider.start()
    try:
        await register(store, "v1", imgs.v1, replicas=2)
        provider.kick()
        await until(lambda: _counts(store, {"v1": 2}), what="2 instances")
        eps = await instances(store, "v1")

        await asyncio.to_thread(engine.stop)  # live restore: the containers keep running
        provider.kick()
        await until(lambda: _engine_down(provider), what="engine reported down")
        assert "Docker engine is unreachable" in str(provider.engine_error)
        with pytest.raises(Exception, match="unreachable"):
            await provider.resolve_image(imgs.v2)
        await asyncio.sleep(1.0)  # probes keep running meanwhile
        assert await instances(store, "v1") == eps
        assert [await fetch(ep) for ep in eps] == ["v1", "v1"]

        await asyncio.to_thread(engine.start)
        await until(lambda: _engine_up(provider), timeout=30, what="engine reported up")
        await provider.scale("v1", 3, actor="ops")
        await until(lambda: _counts(store, {"v1": 3}), what="3 instances after the engine returned")
        assert set(eps) <= set(await instances(store, "v1"))
    finally:
        await provider.stop()
        await store.close()


async def _engine_down(provider: DockerProvider) -> bool:
    return provider.engine_error is not None


async def _engine_up(provider: DockerProvider) -> bool:
    return provider.engine_error is None



async def test_a_tag_in_a_route_file_is_resolved_once_and_kept(
        store: SQLiteStore, provider: DockerProvider, images: Images, clean_engine: Dockerd) -> None:
    v = parse_version_body({**version_body("turnout-test/web:v1"), "allow_tag": True}, "v1", time.time())
    await store.update(lambda s: put_version(s, v), actor="file:routes.yaml")
    provider.kick()
    await until(lambda: _counts(store, {"v1": 1}), what="1 instance")
    [c] = managed(clean_engine, "v1")
    assert c.labels[LABEL_IMAGE] == images.v1
    assert c.image.id == images.v1.split("@", 1)[1]
    # The tag moves to another image; replicas made later still run the image it named at first.
    client = clean_engine.client()
    try:
        client.images.get("turnout-test/web:v2").tag("turnout-test/web", "v1")
        c.kill()
        await until(lambda: _running_ids(clean_engine, "v1", exclude=c.id), what="a replacement")
    finally:
        client.images.get(images.v1.split("@", 1)[1]).tag("turnout-test/web", "v1")  # as other tests expect
        client.close()
    [replacement] = managed(clean_engine, "v1")
    assert replacement.image.id == images.v1.split("@", 1)[1]
    assert await store.get_meta(f"docker.image.v1.{v.created:.6f}") == images.v1


async def _running_ids(engine: Dockerd, version: str, exclude: str) -> bool:
    found = managed(engine, version)
    return len(found) == 1 and found[0].id != exclude and found[0].status == "running"
