"""Docker provider parts that need no engine: scaling transition, image references, endpoints, probes,
an unreachable engine, and CLI usage errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.changes import put_version, set_replicas
from proxy.errors import ConflictError, NotFoundError, ValidationError
from proxy.model import Route, State, Version, VersionSpec
from proxy.parse import parse_version_body
from proxy.providers.containers import DockerProvider, probe
from proxy.providers.engine import (
    Engine,
    EngineUnavailableError,
    ResolvedImage,
    container_endpoint,
    repo_of,
)
from proxy.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parents[2]
PIN = "web@sha256:" + "a" * 64


def docker_state(replicas: int = 2) -> State:
    v = parse_version_body({"image": PIN, "replicas": replicas, "network": "host"}, "v1", 1.0)
    static = Version("s1", VersionSpec("static", endpoints=("http://127.0.0.1:1",)), ("http://127.0.0.1:1",))
    return State(versions={"v1": v, "s1": static})


def test_set_replicas_changes_only_the_count_and_says_so() -> None:
    state = docker_state(2)
    new, summary = set_replicas(state, "v1", 5)
    assert summary == "scale v1: 2 -> 5 replica(s)"
    assert new.versions["v1"].spec.replicas == 5
    assert new.versions["v1"].spec.image == PIN
    assert set_replicas(new, "v1", 5) == (new, "")


@pytest.mark.parametrize(("name", "n", "error", "message"), [
    ("nope", 1, NotFoundError, "no version named 'nope'"),
    ("s1", 1, ConflictError, "'s1' is a static version; only docker versions scale"),
    ("v1", -1, ValidationError, "replicas: expected an integer between 0 and 1000, got -1"),
])
def test_set_replicas_refuses(name: str, n: int, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        set_replicas(docker_state(), name, n)


def test_scaling_to_zero_is_refused_while_the_version_receives_traffic() -> None:
    base = docker_state(2)
    idle = replace(base, routes=(Route("web", split=(("s1", 1.0), ("v1", 0.0))),))
    assert set_replicas(idle, "v1", 0)[1] == "scale v1: 2 -> 0 replica(s)"  # weight 0, no cookie: no traffic
    busy = replace(base, routes=(Route("web", split=(("s1", 70.0), ("v1", 30.0))),
                                 Route("api", split=(("s1", 1.0),), pins={"acme": "v1"}),
                                 Route("old", split=(("s1", 1.0), ("v1", 0.0)), assignment_cookie="tv"),
                                 Route("other", split=(("s1", 1.0),))))
    with pytest.raises(ConflictError) as e:
        set_replicas(busy, "v1", 0)
    assert e.value.status_hint == 409
    assert str(e.value) == ("version 'v1' receives traffic on route(s) web, api, old: with 0 replicas those "
                            "requests would fail (503); move its traffic first, or force")
    assert set_replicas(busy, "v1", 1)[1] == "scale v1: 2 -> 1 replica(s)"
    assert set_replicas(busy, "v1", 0, force=True)[1] == "scale v1: 2 -> 0 replica(s)"


@pytest.mark.parametrize(("ref", "repo"), [
    ("web:v1", "web"),
    ("web", "web"),
    ("registry:5000/team/web:2.4", "registry:5000/team/web"),
    ("registry:5000/team/web", "registry:5000/team/web"),
    (PIN, "web"),
])
def test_repo_of(ref: str, repo: str) -> None:
    assert repo_of(ref) == repo


def test_container_endpoint_host_and_bridge() -> None:
    host = {"Config": {"Labels": {"turnout.port": "41000"}}}
    assert container_endpoint(host, None) == "http://127.0.0.1:41000"
    bridge = {"Config": {"Labels": {}},
              "NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32771"}]}}}
    assert container_endpoint(bridge, 8000) == "http://127.0.0.1:32771"
    assert container_endpoint({"Config": {"Labels": {}}, "NetworkSettings": {"Ports": {}}}, 8000) is None


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        while (await reader.readline()).strip():
            pass
        status = b"500 Oops" if b"/fail" in line else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_probe_outcomes(http_server: int) -> None:
    ep = f"http://127.0.0.1:{http_server}"
    assert await probe(ep, "/health", 2.0) is None
    assert await probe(ep, "/fail", 2.0) == "status 500"
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert await probe(f"http://127.0.0.1:{closed_port}", "/", 2.0) == "connection refused"


def test_unreachable_engine_is_named_in_the_error(tmp_path: Path) -> None:
    engine = Engine(f"unix://{tmp_path}/none.sock")
    with pytest.raises(EngineUnavailableError, match=f"unreachable at unix://{tmp_path}/none.sock"):
        engine.ping()
    assert EngineUnavailableError.status_hint == 503


async def test_provider_without_engine_starts_and_keeps_recorded_instances(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    v = parse_version_body({"image": PIN, "network": "host"}, "v1", time.time())
    v = Version(v.name, v.spec, ("http://127.0.0.1:9",), v.created)
    await store.update(lambda s: put_version(s, v), actor="test")
    messages: list[str] = []
    provider = DockerProvider(store, base_url=f"unix://{tmp_path}/none.sock", log=messages.append)
    await provider.start()
    try:
        assert provider.engine_error is not None and "unreachable" in provider.engine_error
        assert any("the data plane keeps serving the last known instances" in m for m in messages)
        # Nothing is known about the replicas, so nothing is taken out of rotation.
        await asyncio.sleep(0.5)
        assert (await store.current()).state.versions["v1"].endpoints == ("http://127.0.0.1:9",)
        [status] = provider.status()
        assert (status.name, status.desired, [r.state for r in status.replicas]) == ("v1", 1, ["missing"])
        with pytest.raises(EngineUnavailableError):
            await provider.require_engine()
        assert repr(provider) == (f"<DockerProvider {provider.state_id} "
                                  "[engine down | versions: 1 | replicas: 0 healthy of 0]>")
    finally:
        await provider.stop()
        await store.close()


async def test_admin_status_waits_for_the_first_pass_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The admin API answers before the provider has adopted the running containers; a status asked for in
    # that window must not report 0 healthy replicas, so it waits (bounded) for the first pass.
    from types import SimpleNamespace

    import proxy.admin.docker_api as admin_docker

    store = SQLiteStore(tmp_path / "state.db")
    try:
        provider = DockerProvider(store, base_url=f"unix://{tmp_path}/none.sock", log=lambda m: None)
        ctx: Any = SimpleNamespace(docker=provider, store=store)
        asking = asyncio.ensure_future(admin_docker.provider_of(ctx))
        await asyncio.sleep(0.3)
        assert not asking.done()
        provider._started.set()
        assert await asyncio.wait_for(asking, 1.0) is provider
        # A provider whose first pass never ends still answers after the bound, reporting "connecting".
        stuck = DockerProvider(store, base_url=f"unix://{tmp_path}/none.sock", log=lambda m: None)
        monkeypatch.setattr(admin_docker, "FIRST_PASS_WAIT", 0.2)
        ctx.docker = stuck
        assert await asyncio.wait_for(admin_docker.provider_of(ctx), 2.0) is stuck
        assert stuck.engine_error == "connecting"
    finally:
        await store.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env: dict[str, Any] = {"PATH": "/usr/bin:/bin", "TURNOUT_ADMIN_TOKEN": "t", "TURNOUT_ADMIN": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=60, check=False)


def test_cli_usage_and_unreachable_admin() -> None:
    r = run_cli("deploy", "v1", "--image", PIN, "--env", "novalue")
    assert (r.returncode, r.stderr.strip()) == (2, "turnout deploy: --env expects KEY=VALUE, got 'novalue'")
    r = run_cli("scale", "v1", "2")
    assert r.returncode == 3
    assert "cannot reach the admin API at http://127.0.0.1:9" in r.stderr


class _FakeContainer:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        labels = kwargs["labels"]
        port = labels.get("turnout.container-port")
        self.attrs: dict[str, Any] = {
            "Id": "c" * 64, "Name": "/" + kwargs["name"], "Config": {"Labels": labels},
            "State": {"Running": True, "Status": "running", "StartedAt": "2026-11-27T05:00:00Z", "ExitCode": 0},
            "NetworkSettings": {"Ports": {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32771"}]}
                                if port else {}},
        }

    def start(self) -> None:
        pass

    def reload(self) -> None:
        pass


class _FakeContainers:
    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []

    def create(self, image: str, **kwargs: Any) -> _FakeContainer:
        self.created.append((image, kwargs))
        return _FakeContainer(kwargs)


class _FakeClient:
    def __init__(self) -> None:
        self.containers = _FakeContainers()


def test_bridge_replicas_publish_the_port_on_loopback_only() -> None:
    # The test engine has no bridge network, so the bridge arguments are checked against a stand-in client.
    engine = Engine("tcp://127.0.0.1:9")
    fake = _FakeClient()
    engine._client = fake
    v = parse_version_body({"image": PIN, "port": 8000, "env": {"MODE": "prod"}}, "v1", 1.0)
    c = engine.create(state_id="abc123", version=v, replica=0, image=ResolvedImage(PIN, "sha256:" + "a" * 64))
    [(image, kwargs)] = fake.containers.created
    assert image == "sha256:" + "a" * 64
    assert kwargs["ports"] == {"8000/tcp": ("127.0.0.1", None)}
    assert "network_mode" not in kwargs
    assert kwargs["environment"] == {"MODE": "prod", "PORT": "8000"}
    assert kwargs["restart_policy"] == {"Name": "no"}
    assert kwargs["labels"] == {
        "turnout.managed": "true", "turnout.state": "abc123", "turnout.version": "v1", "turnout.replica": "0",
        "turnout.image": PIN, "turnout.container-port": "8000"}
    assert (c.endpoint, c.version, c.replica, c.running) == ("http://127.0.0.1:32771", "v1", 0, True)


def test_host_replicas_get_a_loopback_port_in_port() -> None:
    engine = Engine("tcp://127.0.0.1:9")
    fake = _FakeClient()
    engine._client = fake
    v = parse_version_body({"image": PIN, "network": "host"}, "v1", 1.0)
    c = engine.create(state_id="abc123", version=v, replica=1, image=ResolvedImage(PIN, "sha256:" + "a" * 64))
    [(_, kwargs)] = fake.containers.created
    port = kwargs["environment"]["PORT"]
    assert kwargs["network_mode"] == "host" and "ports" not in kwargs
    assert kwargs["labels"]["turnout.port"] == port
    assert c.endpoint == f"http://127.0.0.1:{port}"
