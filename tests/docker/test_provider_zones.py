"""The Docker provider across zones with two real engines (one per zone): replicas spread evenly and kept
spread when one engine loses containers; an engine that becomes unreachable: its instances leave rotation,
traffic goes to the other zone, nothing is removed, and its containers are adopted again when it returns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.changes import put_route, put_version
from proxy.model import Route
from proxy.parse import parse_version_body
from proxy.providers.docker_zones import DockerZones
from proxy.providers.engine import LABEL_MANAGED, LABEL_PORT
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import RouteTable
from tests.dataplane.helpers import Client, start_proxy

from .conftest import Images, _require_engine
from .engine import Dockerd
from .helpers import free_port, http, wait_until

pytestmark = pytest.mark.docker

A, B = "eu-1a", "eu-1b"
ROOT = Path(__file__).resolve().parents[2]


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.1)


def containers(engine: Dockerd) -> dict[str, str]:
    """Managed container id -> its endpoint, on one engine."""
    client = engine.client()
    try:
        found = client.containers.list(all=True, filters={"label": [f"{LABEL_MANAGED}=true"]})
        return {c.id: f"http://127.0.0.1:{c.labels[LABEL_PORT]}" for c in found}
    finally:
        client.close()


def pids(engine: Dockerd) -> list[int]:
    client = engine.client()
    try:
        found = client.containers.list(filters={"label": [f"{LABEL_MANAGED}=true"]})
        return [int(c.attrs["State"]["Pid"]) for c in found]
    finally:
        client.close()


@pytest.fixture
def second_engine(dockerd: Dockerd, images: Images) -> Iterator[Dockerd]:
    """Zone B's engine (live restore, so the test can stop it under running containers), holding the same
    v1 image as the session engine (saved and loaded: the same image ID, so the same digest pin)."""
    _require_engine()
    engine = Dockerd(live_restore=True)
    try:
        engine.start()
        src, dst = dockerd.client(), engine.client()
        try:
            data = b"".join(src.images.get(images.v1.split("@", 1)[1]).save())
            dst.images.load(data)
        finally:
            src.close()
            dst.close()
        yield engine
    finally:
        if engine.proc is None:
            engine.start()
        engine.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    await s.close()


@pytest.fixture
async def zones(store: SQLiteStore, clean_engine: Dockerd, second_engine: Dockerd) -> AsyncIterator[DockerZones]:
    z = DockerZones(store, ((A, clean_engine.url), (B, second_engine.url)))
    for p in z.zones.values():
        p.log = lambda msg: None
    await z.start()
    yield z
    await z.stop()


async def zone_instances(store: SQLiteStore) -> dict[str, set[str]]:
    v = (await store.current()).state.versions.get("v1")
    out: dict[str, set[str]] = {A: set(), B: set()}
    if v is not None:
        zones = dict(v.zones)
        for e in v.endpoints:
            out[zones[e]].add(e)
    return out


async def test_replicas_spread_over_two_engines_stay_spread_and_survive_an_engine_loss(
        store: SQLiteStore, zones: DockerZones, images: Images, clean_engine: Dockerd,
        second_engine: Dockerd) -> None:
    body = {"image": images.v1, "replicas": 4, "zones": [A, B], "network": "host",
            "health": {"path": "/", "interval": 0.2, "timeout": 0.5}}
    assert (await zones.resolve_image(images.v1, (A, B))).pinned == images.v1
    v = parse_version_body(body, "v1", time.time())
    await store.update(lambda s: put_version(s, v), actor="test")
    zones.kick()

    async def spread() -> bool:
        got = await zone_instances(store)
        return len(got[A]) == 2 and len(got[B]) == 2

    await until(spread, what="2 + 2 instances")
    on_a, on_b = containers(clean_engine), containers(second_engine)
    # Each instance is recorded with the zone of the engine that runs it.
    assert await zone_instances(store) == {A: set(on_a.values()), B: set(on_b.values())}
    assert {s.name: s.zones for s in zones.status()} == {"v1": ((A, 2, 2), (B, 2, 2))}
    assert [r.zone for r in zones.status()[0].replicas] == [A, B, A, B]

    # Engine B loses a container: it is made again there, not in zone A.
    client = second_engine.client()
    try:
        client.containers.get(next(iter(on_b))).remove(force=True)
    finally:
        client.close()
    await until(lambda: asyncio.sleep(0, len(containers(second_engine)) == 2 and
                                      len(set(containers(second_engine)) & set(on_b)) == 1), what="B remade")
    on_b = containers(second_engine)

    async def recorded() -> bool:
        return await zone_instances(store) == {A: set(on_a.values()), B: set(on_b.values())}

    await until(recorded, what="the remade replica recorded")
    assert containers(clean_engine) == on_a

    # A proxy replica in zone B keeps its traffic there.
    route = Route(name="web", split=(("v1", 1.0),), sticky=False)
    rev = await store.update(lambda s: put_route(s, route), actor="test")
    proxy = await start_proxy(RouteTable(rev.state, rev.number), Settings(listen=("127.0.0.1", 0), zone=B))
    try:
        # Its own health checks first pass (each new endpoint is checked at once).
        await until(lambda: asyncio.sleep(0, all(e.healthy and e.failures == 0
                                                 for e in proxy.dp.backends["v1"].endpoints)), what="checked")
        c = await Client.open(proxy.port)
        assert [(await c.get()).status for _ in range(10)] == [200] * 10
        c.close()
        assert proxy.stats.zone_requests == {"v1": {B: 10}}

        # Zone B is lost: its engine stops answering and its containers freeze.
        frozen = pids(second_engine)
        second_engine.stop()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            await until(lambda: asyncio.sleep(0, zones.zones[B].engine_error is not None), what="engine B down")

            async def b_out() -> bool:
                got = await zone_instances(store)
                return got == {A: set(on_a.values()), B: set()}

            await until(b_out, what="zone B's instances out of rotation")
            rev = await store.current()
            proxy.set_table(RouteTable(rev.state, rev.number))
            c = await Client.open(proxy.port)
            assert [(await c.get()).status for _ in range(10)] == [200] * 10
            c.close()
            assert proxy.stats.zone_requests == {"v1": {B: 10, A: 10}}
            assert containers(clean_engine) == on_a  # nothing moved to zone A, nothing removed there
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        second_engine.start()
        zones.kick()
        # Engine B is back: its containers (the same ones) are adopted and recorded again.
        await until(recorded, what="zone B adopted again")
        assert containers(second_engine) == on_b
    finally:
        await proxy.dp.shutdown(0.5)


@pytest.mark.slow
def test_serve_with_two_engines_deploys_spread_and_versions_shows_replicas_per_zone(
        tmp_path: Path, images: Images, clean_engine: Dockerd, second_engine: Dockerd) -> None:
    config = tmp_path / "turnout.yaml"
    config.write_text(f"zone: {A}\ndocker:\n  engines: {{{A}: '{clean_engine.url}', {B}: '{second_engine.url}'}}\n")
    port, admin = free_port(), free_port()
    env = {**os.environ, "TURNOUT_ADMIN_TOKEN": "t", "TURNOUT_ADMIN": f"http://127.0.0.1:{admin}"}
    log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--listen",
                             f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--state-dir",
                             str(tmp_path / "state"), "--store", f"sqlite://{tmp_path}/state.db"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=90, check=False)

    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200, what="readyz")
        r = cli("deploy", "v1", "--image", images.v1, "--replicas", "4", "--zones", f"{A},eu-1c", "--network",
                "host", "--health-interval", "0.2")
        assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (
            1, f"  zones[1]: no Docker engine for zone 'eu-1c' (this proxy's docker.engines: {A}, {B})")
        r = cli("deploy", "v1", "--image", images.v1, "--replicas", "4", "--zones", f"{A},{B}", "--network",
                "host", "--health-interval", "0.2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "v1: 4/4 healthy" in r.stdout
        assert (len(containers(clean_engine)), len(containers(second_engine))) == (2, 2)
        r = cli("versions")
        assert r.returncode == 0, r.stdout + r.stderr
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("v1 "))
        assert f"4/4 ({A} 2/2, {B} 2/2)" in row
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
