"""Local-process versions (`command:` in a version spec): each replica is a child process of the proxy.

Each replica gets a free loopback port in its `PORT` environment variable. An instance is recorded in
the state (a revision by actor `provider:local`) only once its port accepts connections, so the data
plane never sees an endpoint that is still booting. A replica that exits is started again on the same
port with exponential backoff; its endpoint stays recorded meanwhile (the data plane's health checks
eject it), so a crash loop is visible instead of silently shrinking the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from proxy import ops
from proxy.model import State, Version
from proxy.store.base import Store

# How long a new replica may take to open its port before it is reported as failed.
START_TIMEOUT = 30.0
RESTART_BACKOFF_MAX = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


@dataclass
class Replica:
    version: str
    port: int
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class LocalVersion:
    version: Version
    replicas: list[Replica] = field(default_factory=list)


class LocalProvider:
    def __init__(self, store: Store, host: str = "127.0.0.1") -> None:
        self.store = store
        self.host = host
        self.versions: dict[str, LocalVersion] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        n = sum(len(v.replicas) for v in self.versions.values())
        return f"<LocalProvider [Versions: {len(self.versions)} | Replicas: {n}]>"

    async def start(self) -> None:
        cur = await self.store.current()
        await self.reconcile(cur.state)
        self._task = asyncio.get_running_loop().create_task(self._follow(cur.number))

    async def _follow(self, after: int) -> None:
        while not self._stopping:
            try:
                async for rev in self.store.watch(after):
                    after = rev.number
                    await self.reconcile(rev.state)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                print(f"turnout: local provider: {e}", file=sys.stderr)
                await asyncio.sleep(1.0)

    async def reconcile(self, state: State) -> None:
        wanted = {n: v for n, v in state.versions.items() if v.spec.kind == "local"}
        for name in list(self.versions):
            if name not in wanted:
                await self._stop_version(self.versions.pop(name))
        for name, version in wanted.items():
            lv = self.versions.get(name)
            if lv is None:
                lv = self.versions[name] = LocalVersion(version)
            await self._scale(lv, version.spec.replicas)

    async def _scale(self, lv: LocalVersion, n: int) -> None:
        started = []
        while len(lv.replicas) < n:
            r = Replica(lv.version.name, free_port(self.host))
            lv.replicas.append(r)
            started.append(r)
        while len(lv.replicas) > n:
            await self._stop_replica(lv.replicas.pop())
        for r in started:
            await self._spawn(lv, r)
        if started:
            ready = []
            for r in lv.replicas:
                if await wait_port(self.host, r.port, START_TIMEOUT):
                    ready.append(r.endpoint)
                else:
                    print(f"turnout: local version {lv.version.name}: replica on port {r.port} did not open its "
                          f"port within {START_TIMEOUT:g}s", file=sys.stderr)
            await self._record(lv.version.name, tuple(ready))

    async def _spawn(self, lv: LocalVersion, r: Replica) -> None:
        spec = lv.version.spec
        env = {**os.environ, **dict(spec.env), "PORT": str(r.port), "TURNOUT_VERSION": lv.version.name}
        r.process = await asyncio.create_subprocess_exec(*spec.command, env=env, start_new_session=True)
        r.task = asyncio.get_running_loop().create_task(self._supervise(lv, r))

    async def _supervise(self, lv: LocalVersion, r: Replica) -> None:
        assert r.process is not None
        code = await r.process.wait()
        if self._stopping or r not in lv.replicas:
            return
        r.restarts += 1
        delay = min(0.5 * 2 ** min(r.restarts, 8), RESTART_BACKOFF_MAX)
        print(f"turnout: local version {lv.version.name} replica on port {r.port} exited with {code}; "
              f"restarting in {delay:g}s", file=sys.stderr)
        await asyncio.sleep(delay)
        if not self._stopping and r in lv.replicas:
            await self._spawn(lv, r)

    async def _record(self, name: str, endpoints: tuple[str, ...]) -> None:
        def change(state: State) -> ops.Change:
            if name not in state.versions:
                return state, ""
            return ops.set_instances(state, name, endpoints)

        rev = await self.store.update(change, actor="provider:local", reason="instances changed")
        if name in rev.state.versions and name in self.versions:
            self.versions[name].version = rev.state.versions[name]

    async def _stop_replica(self, r: Replica) -> None:
        if r.task is not None:
            r.task.cancel()
        p = r.process
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            await p.wait()

    async def _stop_version(self, lv: LocalVersion) -> None:
        for r in lv.replicas:
            await self._stop_replica(r)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for lv in self.versions.values():
            await self._stop_version(lv)
