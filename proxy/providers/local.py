"""Local-process versions (`command:` in a version spec): each replica is a child process of the proxy.

Each replica gets a free loopback port in its `PORT` environment variable. An instance is recorded in
the state (a revision by actor `provider:local`) only once its port accepts connections, so the data
plane never sees an endpoint that is still booting. A replica that exits is started again on the same
port with exponential backoff; its endpoint stays recorded meanwhile (the data plane's health checks
eject it), so a crash loop is visible instead of silently shrinking the version.

With several replicas on one etcd store, only the one holding the `providers` role (an etcd lease) runs
the processes and records them; the others route to what it recorded. A replica that loses the role keeps
its processes serving until the store records another replica's instances for that version, then stops
them, so an election never takes a version out of service.
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
from proxy.leader import FOLLOW_POLL, AlwaysLeader, Leader, leader_for
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


def _local(state: State) -> dict[str, Version]:
    return {n: v for n, v in state.versions.items() if v.spec.kind == "local"}


class LocalProvider:
    def __init__(self, store: Store, host: str = "127.0.0.1", *, leader: Leader | None = None) -> None:
        self.store = store
        self.host = host
        self.leader = leader or leader_for(store, "providers")
        self.versions: dict[str, LocalVersion] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._acting = False
        self._state: State | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        n = sum(len(v.replicas) for v in self.versions.values())
        role = "" if self._acting else " | following"
        return f"<LocalProvider [Versions: {len(self.versions)} | Replicas: {n}{role}]>"

    async def start(self) -> None:
        cur = await self.store.current()
        self._state = cur.state
        await self.leader.start()
        await self.leader.settled()
        if self.leader.is_leader():
            # Before start() returns, so a proxy that starts with local versions serves them at once.
            self._acting = True
            await self.reconcile(cur.state)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(cur.number)), loop.create_task(self._run())]

    async def _watch(self, after: int) -> None:
        while not self._stopping:
            try:
                async for rev in self.store.watch(after):
                    after = rev.number
                    before, self._state = self._state, rev.state
                    if before is None or _local(before) != _local(rev.state):
                        self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                print(f"turnout: local provider: {e}", file=sys.stderr)
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_POLL):
                    await self._changed.wait()
            changed = self._changed.is_set()
            self._changed.clear()
            state = self._state
            leading = self.leader.is_leader()
            if state is None or (not changed and leading == self._acting):
                continue
            try:
                if leading and not self._acting and not isinstance(self.leader, AlwaysLeader):
                    print("turnout: local provider: this replica runs the local versions now", file=sys.stderr)
                self._acting = leading
                if leading:
                    await self.reconcile(state)
                else:
                    await self._release(state)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                print(f"turnout: local provider: {e}", file=sys.stderr)

    async def _release(self, state: State) -> None:
        """Following: stop this replica's processes once the store no longer routes to them."""
        for name in list(self.versions):
            lv = self.versions[name]
            v = state.versions.get(name)
            recorded = set(v.endpoints) if v is not None and v.spec.kind == "local" else set()
            for r in [r for r in lv.replicas if r.endpoint not in recorded]:
                lv.replicas.remove(r)
                await self._stop_replica(r)
            if not lv.replicas:
                del self.versions[name]

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
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for lv in self.versions.values():
            await self._stop_version(lv)
        await self.leader.stop()
