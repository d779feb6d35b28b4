"""Local-process versions (`command:` in a version spec): each replica is a process started by the proxy.

Design rule: the store says what should run, the provider converges the processes toward it and records
only what serves (through proxy.changes.set_instances).

Each replica gets a free loopback port in its `PORT` environment variable. An instance is recorded in
the state (a revision by actor `provider:local`) only once its port accepts connections, so the data
plane never sees an endpoint that is still booting. A replica that exits is started again on the same
port with exponential backoff; its endpoint stays recorded meanwhile (the data plane's health checks
eject it), so a crash loop is visible instead of silently shrinking the version.

With several replicas on one etcd store, only the one holding the `providers` role (an etcd lease) runs
the processes and records them; the others route to what it recorded. A replica that loses the role keeps
its processes serving until the store records another replica's instances for that version, then stops
them, so an election never takes a version out of service.

Instances outlive the proxy, as containers do: each process runs in its own session (a proxy's SIGTERM,
Ctrl-C or kill -9 does not reach it), and the provider records pid, start time and port of every replica
in `<state dir>/local-<store>.json`. A restarted proxy adopts the recorded processes that still run (same
pid *and* start time, so a recycled pid is never taken for one) and belong to a version still registered
with the same spec, instead of starting new ones; recorded processes of versions removed or re-registered
meanwhile are stopped. Stopping `serve` therefore leaves the instances running, except with an elected
`providers` role (etcd): there a graceful stop hands over, so it stops them as before. Without a state
dir, or without /proc (no start times to tell a recycled pid), processes stop with the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import changes
from proxy.control.leader import FOLLOW_POLL, AlwaysLeader, Leader, leader_for
from proxy.model import State, Version
from proxy.store.base import Store

# How long a new replica may take to open its port before it is reported as failed.
START_TIMEOUT = 30.0
RESTART_BACKOFF_MAX = 30.0
# How often a replica's process is looked at: an adopted one is not this process's child, so no wait().
POLL = 0.2
STOP_TIMEOUT = 5.0

# Children a stopped provider left running for the next proxy: referenced until this process exits, so
# their Popen objects never report them (ResourceWarning) as if they had been forgotten by mistake.
_LEFT_RUNNING: list[subprocess.Popen[bytes]] = []


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


def process_start(pid: int) -> str | None:
    """When process `pid` started (/proc/PID/stat field 22, clock ticks since boot): with the pid it names
    one process for good. None when no such process runs (a zombie has finished)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def spec_key(v: Version) -> str:
    """What a recorded process must have been started for to be adopted: a re-registered name is a new
    version (`created`), and command and environment decide what runs."""
    text = json.dumps([v.name, v.created, list(v.spec.command), [list(e) for e in v.spec.env]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Replica:
    version: str
    port: int
    process: subprocess.Popen[bytes] | None = None  # None when adopted from an earlier proxy
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    pid: int = 0
    started: str = ""  # process_start(pid) when it was started or adopted

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            return False  # our child: poll() also reaps it
        return self.pid > 0 and process_start(self.pid) == self.started


@dataclass
class LocalVersion:
    version: Version
    replicas: list[Replica] = field(default_factory=list)
    unrecorded: bool = False  # adopted processes the store does not list (a record older than the store)


def _local(state: State) -> dict[str, Version]:
    return {n: v for n, v in state.versions.items() if v.spec.kind == "local"}


class LocalProvider:
    def __init__(self, store: Store, host: str = "127.0.0.1", *, leader: Leader | None = None,
                 state_dir: Path | None = None, zone: str | None = None) -> None:
        self.store = store
        self.zone = zone  # the proxy's: where its processes run, unless a version says `zone:`
        self.host = host
        self.leader = leader or leader_for(store, "providers")
        self.records: Path | None = None  # where replicas are recorded for the next proxy to adopt
        if state_dir is not None and process_start(os.getpid()) is not None:
            digest = hashlib.sha256(store.url.encode()).hexdigest()[:12]
            self.records = Path(state_dir) / f"local-{digest}.json"
        self._lock: int | None = None  # flock'ed descriptor of the records' lock file
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
        self._lock_records()
        await self._adopt(cur.state)
        await self.leader.start()
        await self.leader.settled()
        if self.leader.is_leader():
            # Before start() returns, so a proxy that starts with local versions serves them at once.
            self._acting = True
            await self.reconcile(cur.state)
        else:
            self._changed.set()  # adopted processes of a follower: released once another replica runs its own
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(cur.number)), loop.create_task(self._run())]

    def _lock_records(self) -> None:
        """One proxy per records file: a second proxy on the same state dir and store (etcd replicas on one
        host) neither adopts nor records, so two providers never claim one process."""
        if self.records is None:
            return
        try:
            self.records.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.records.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)  # held until stop()
        except OSError as e:
            print(f"turnout: local provider: cannot record processes in {self.records.parent} ({e.strerror}); "
                  "local processes stop with this proxy", file=sys.stderr)
            self.records = None
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            print(f"turnout: local provider: {self.records} is used by another proxy; this one's local "
                  "processes stop with it", file=sys.stderr)
            self.records = None
            return
        self._lock = lock

    async def _adopt(self, state: State) -> None:
        """Take over the recorded processes that still run for a version still registered as they were
        started; stop the recorded ones whose version is gone or was re-registered."""
        if self.records is None:
            return
        try:
            recorded: list[dict[str, Any]] = json.loads(self.records.read_text())["replicas"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"turnout: local provider: ignoring {self.records}: {e}", file=sys.stderr)
            return
        wanted = _local(state)
        doomed = []
        for rec in recorded:
            try:
                name, key, port, pid, started = (str(rec["version"]), str(rec["spec"]), int(rec["port"]),
                                                 int(rec["pid"]), str(rec["start"]))
            except (KeyError, TypeError, ValueError):
                continue
            if process_start(pid) != started:
                continue  # exited (or its pid now names another process): nothing to adopt or stop
            r = Replica(name, port, pid=pid, started=started)
            v = wanted.get(name)
            if v is None or spec_key(v) != key:
                doomed.append(r)
                continue
            lv = self.versions.get(name)
            if lv is None:
                lv = self.versions[name] = LocalVersion(v)
            lv.replicas.append(r)
            r.task = asyncio.get_running_loop().create_task(self._supervise(lv, r))
        for lv in self.versions.values():
            lv.unrecorded = tuple(r.endpoint for r in lv.replicas) != lv.version.endpoints
        adopted = sum(len(lv.replicas) for lv in self.versions.values())
        if adopted:
            print(f"turnout: local provider: adopted {adopted} running process(es) of "
                  f"{', '.join(sorted(self.versions))}", file=sys.stderr)
        for r in doomed:
            print(f"turnout: local provider: stopping process {r.pid} of {r.version}: that version is no longer "
                  "registered as it was started", file=sys.stderr)
            await self._stop_replica(r)
        self._save()

    def _save(self) -> None:
        """Record every replica's process for the next proxy (atomically: a kill -9 mid-write leaves the last
        complete record)."""
        if self.records is None or self._lock is None:
            return
        replicas = [{"version": name, "spec": spec_key(lv.version), "port": r.port, "pid": r.pid, "start": r.started}
                    for name, lv in self.versions.items() for r in lv.replicas if r.pid and r.started]
        tmp = self.records.with_name(f".{self.records.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"store": self.store.url, "replicas": replicas}, indent=1) + "\n")
            os.replace(tmp, self.records)
        except OSError as e:
            print(f"turnout: local provider: cannot record processes in {self.records}: {e}", file=sys.stderr)

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
            if lv is not None and spec_key(lv.version) != spec_key(version):
                await self._stop_version(self.versions.pop(name))  # re-registered under the same name
                lv = None
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
        if started or lv.unrecorded:
            lv.unrecorded = False
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
        # Not asyncio's subprocess: its transport kills the child when closed, and the process must outlive
        # this proxy. Its own session keeps the proxy's signals (Ctrl-C, SIGTERM to the group) off it.
        r.process = await asyncio.to_thread(subprocess.Popen, list(spec.command), env=env, start_new_session=True,
                                            stdin=subprocess.DEVNULL)
        r.pid = r.process.pid
        r.started = process_start(r.pid) or ""
        self._save()
        r.task = asyncio.get_running_loop().create_task(self._supervise(lv, r))

    async def _supervise(self, lv: LocalVersion, r: Replica) -> None:
        while r.alive():  # noqa: ASYNC110 (nothing signals the exit of a process that is not our child)
            await asyncio.sleep(POLL)
        if self._stopping or r not in lv.replicas:
            return
        how = "exited" if r.process is None else f"exited with {r.process.returncode}"
        r.restarts += 1
        delay = min(0.5 * 2 ** min(r.restarts, 8), RESTART_BACKOFF_MAX)
        print(f"turnout: local version {lv.version.name} replica on port {r.port} {how}; "
              f"restarting in {delay:g}s", file=sys.stderr)
        await asyncio.sleep(delay)
        if not self._stopping and r in lv.replicas:
            await self._spawn(lv, r)

    async def _record(self, name: str, endpoints: tuple[str, ...]) -> None:
        def change(state: State) -> changes.Change:
            if name not in state.versions:
                return state, ""
            v = state.versions[name]
            zone = v.spec.zones[0] if v.spec.zones else self.zone
            return changes.set_instances(state, name, endpoints,
                                         tuple((e, zone) for e in endpoints) if zone is not None else ())

        rev = await self.store.update(change, actor="provider:local", reason="instances changed")
        if name in rev.state.versions and name in self.versions:
            self.versions[name].version = rev.state.versions[name]

    async def _stop_replica(self, r: Replica) -> None:
        if r.task is not None:
            r.task.cancel()
        # The whole group (its session, pgid == pid), so workers it forked go too; never a pid whose start
        # time changed, which is another process now.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not r.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.pid, sig)
            for _ in range(int(STOP_TIMEOUT / 0.05)):
                if not r.alive():
                    break
                await asyncio.sleep(0.05)
        self._save()

    async def _stop_version(self, lv: LocalVersion) -> None:
        for r in lv.replicas:
            await self._stop_replica(r)

    async def stop(self) -> None:
        """Leaves the processes running for the next proxy to adopt, as containers are left, unless nothing
        records them or another replica (etcd) takes over the versions: then they stop."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.records is not None and self._lock is not None and isinstance(self.leader, AlwaysLeader):
            for lv in self.versions.values():
                for r in lv.replicas:
                    if r.task is not None:
                        r.task.cancel()
                    if r.process is not None:
                        _LEFT_RUNNING.append(r.process)
            self._save()
        else:
            for lv in self.versions.values():
                await self._stop_version(lv)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        await self.leader.stop()
