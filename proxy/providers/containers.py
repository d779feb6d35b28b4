"""The Docker provider: versions as immutable container images.

Design rule: the store holds what should run (each docker version's pinned image and replica count) and
the engine holds what does run; the provider only converges the second toward the first and reports
which replicas pass their health checks as the version's instances (`ops.set_instances`). Every container
it makes is labelled with this store's id, so a restarted provider adopts what is running instead of
starting it again, and removes only containers that carry its own label.

The Docker SDK blocks: every engine call runs in a worker thread, and Docker events arrive on a daemon
thread of their own, so the event loop (the data plane when workers == 1) never waits on the engine.
When the engine is unreachable the provider keeps the last known instances, keeps probing them (probes
go straight to the containers, not through the engine) and resumes converging when the engine is back.

With several replicas on one etcd store, one of them (elected with an etcd lease, role `providers`) drives
the containers; the others only read what it records, so three replicas never start three sets of
containers. A replica that takes over adopts the running containers like a restart does; one that loses
the lease stops acting at once but never removes anything, so traffic is not disturbed by an election.

A tag (only with allow_tag) is resolved once to a digest pin (see docker_engine) and the result is kept
in the store's meta data, so every later replica runs the same image whatever the tag points to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from proxy.changes import Change, set_instances, set_replicas
from proxy.control.leader import FOLLOW_POLL, AlwaysLeader, Leader, leader_for
from proxy.errors import ConflictError, NotFoundError, TurnoutError, ValidationError
from proxy.model import State, Version
from proxy.parse import DIGEST_RE
from proxy.providers.engine import (
    ENGINE_TIMEOUT,
    LABEL_IMAGE,
    LABEL_MANAGED,
    LABEL_PORT,
    LABEL_REPLICA,
    LABEL_STATE,
    LABEL_VERSION,
    Container,
    Engine,
    EngineUnavailableError,
    ResolvedImage,
)
from proxy.store.base import Store

__all__ = [
    "LABEL_IMAGE", "LABEL_MANAGED", "LABEL_PORT", "LABEL_REPLICA", "LABEL_STATE", "LABEL_VERSION",
    "DockerProvider", "EngineUnavailableError", "ReplicaStatus", "ResolvedImage", "VersionStatus", "probe",
    "set_replicas",
]

T = TypeVar("T")

STATE_ID_META = "docker.state_id"
IMAGE_META_PREFIX = "docker.image."  # + version name: a tag resolved once, kept for every later replica
ACTOR = "docker-provider"

# A replica leaves rotation after this many failed probes in a row (one failure may be a GC pause).
UNHEALTHY_AFTER = 3
# Full re-list of containers even without events, in case an event was lost while reconnecting.
RESYNC_INTERVAL = 15.0
# Backoff for recreating a replica that keeps exiting: doubles per exit, capped, so a crash loop costs
# little while a one-off crash is replaced at once.
RECREATE_BACKOFF = (0.5, 30.0)
# Engine reconnect backoff (seconds): first retry quickly, then settle at a cheap poll.
RECONNECT_BACKOFF = (0.5, 5.0)
# Log lines kept from a replica that exited, shown by `turnout deploy` when a version never gets healthy.
LOG_TAIL = 20
# A replica that exited this often without ever passing a health check is reported as failing.
FAILING_AFTER_EXITS = 2

ReplicaState = Literal["starting", "healthy", "unhealthy", "exited", "missing"]


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    replica: int
    state: ReplicaState
    container: str | None
    name: str | None
    endpoint: str | None
    started_at: str | None
    exits: int
    error: str | None
    last_logs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VersionStatus:
    name: str
    image: str
    image_id: str | None
    network: str
    desired: int
    healthy: int
    running: int
    created: float
    routes: tuple[str, ...]
    instances: tuple[str, ...]  # endpoints currently recorded in the store
    failing: bool  # every replica keeps exiting without ever passing a health check
    error: str | None  # why replicas cannot be made (missing image, bad spec)
    replicas: tuple[ReplicaStatus, ...]


@dataclass(slots=True)
class _Replica:
    """What the provider knows about one replica slot (mutable bookkeeping, not shared data)."""

    version: str
    replica: int
    container: Container | None = None
    healthy: bool = False
    ever_healthy: bool = False
    failures: int = 0
    next_probe: float = 0.0
    exits: int = 0
    retry_at: float = 0.0
    error: str | None = None
    last_logs: tuple[str, ...] = ()


# Health probes go straight to the replica over loopback.


async def probe(endpoint: str, path: str, timeout: float) -> str | None:
    """None when GET path answers 2xx/3xx within `timeout`, else why not."""
    hostport = endpoint.removeprefix("http://")
    host, _, port = hostport.rpartition(":")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n"
                         "User-Agent: turnout-health\r\n\r\n".encode("latin-1"))
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as e:
        # asyncio's connect errors carry the address in strerror; the errno's text reads better in a status.
        return os.strerror(e.errno).lower() if e.errno else str(e)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return "not an HTTP response"
    code = int(parts[1])
    return None if 200 <= code < 400 else f"status {code}"


def _log(msg: str) -> None:
    print(f"turnout: docker: {msg}", file=sys.stderr, flush=True)


class DockerProvider:
    """Runs in the supervisor process: `await provider.start()` ... `await provider.stop()`."""

    # store -> running provider, so the admin endpoints find it without extra wiring
    _running: ClassVar[dict[int, DockerProvider]] = {}

    def __init__(self, store: Store, *, base_url: str | None = None, actor: str = ACTOR,
                 log: Callable[[str], None] = _log, leader: Leader | None = None) -> None:
        self.store = store
        self.leader = leader or leader_for(store, "providers")
        self._acting = False  # this replica drives the containers (it holds the `providers` role)
        self.engine = Engine(base_url)
        self.actor = actor
        self.log = log
        self.state_id = ""
        self.engine_error: str | None = "connecting"
        self._reported: str | None = None  # the engine error last logged
        self._state = State()
        self._replicas: dict[tuple[str, int], _Replica] = {}
        self._images: dict[str, ResolvedImage] = {}
        self._image_errors: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._dirty = True
        self._next_resync = 0.0
        self._reconnect_delay = RECONNECT_BACKOFF[0]
        self._tasks: list[asyncio.Task[None]] = []
        self._events_thread: threading.Thread | None = None
        self._events_stop = threading.Event()
        self._events_stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        # Engine calls run here, not in the loop's default executor, so stop() can wait for the ones in
        # flight (a cancelled await does not stop its thread) and they never crowd out other blocking work.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="turnout-docker")
        self._adopted = False
        self._started = asyncio.Event()

    def __repr__(self) -> str:
        healthy = sum(1 for r in self._replicas.values() if r.healthy)
        engine = "engine up" if self.engine_error is None else "engine down"
        if not self._acting:
            engine = "following"
        return (f"<DockerProvider {self.state_id or '?'} [{engine} | versions: {len(self._docker_versions())}"
                f" | replicas: {healthy} healthy of {len(self._replicas)}]>")

    @classmethod
    def for_store(cls, store: Store) -> DockerProvider | None:
        return cls._running.get(id(store))

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        state_id = await self.store.get_meta(STATE_ID_META)
        if not state_id:
            state_id = uuid.uuid4().hex[:12]
            await self.store.set_meta(STATE_ID_META, state_id)
        self.state_id = state_id
        self._state = (await self.store.current()).state
        await self.leader.start()
        await self.leader.settled()
        self._events_thread = threading.Thread(target=self._follow_events, name="turnout-docker-events",
                                               daemon=True)
        self._events_thread.start()
        self._tasks = [self._loop.create_task(self._run()), self._loop.create_task(self._watch_store())]
        # One pass before returning (and before the admin API sees this provider), so a restart has
        # adopted its containers when start() returns.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENGINE_TIMEOUT):
                await self._started.wait()
        DockerProvider._running[id(self.store)] = self

    async def wait_first_pass(self, timeout: float) -> bool:
        """True once the first reconcile pass (adopting running containers) has finished."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._started.wait()
        return self._started.is_set()

    async def stop(self) -> None:
        DockerProvider._running.pop(id(self.store), None)
        self._events_stop.set()
        stream = self._events_stream
        if stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stream.close)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._events_thread is not None:
            await asyncio.to_thread(self._events_thread.join, 5.0)
        await self.leader.stop()
        await asyncio.to_thread(self._pool.shutdown, True)
        await asyncio.to_thread(self.engine.reset)

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def kick(self) -> None:
        """Converge now (after a deploy, scale or retire) instead of at the next event."""
        self._dirty = True
        self._wake.set()

    # operations the admin API calls

    async def resolve_image(self, ref: str) -> ResolvedImage:
        return await self._blocking(self.engine.resolve, ref)

    async def require_engine(self) -> None:
        """EngineUnavailableError (503) unless the engine answers: changes are refused while it is down,
        rather than recorded for containers nobody can start."""
        await self._blocking(self.engine.ping)

    async def scale(self, name: str, replicas: int, *, actor: str, reason: str = "", force: bool = False) -> int:
        rev = await self.store.update(lambda s: set_replicas(s, name, replicas, force=force), actor=actor,
                                      reason=reason)
        self._state = rev.state
        self.kick()
        return rev.number

    async def wait_removed(self, name: str, timeout: float) -> int:
        """Wait until no container of `name` is left; returns how many are left (0 on success)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._acting:
                left = sum(1 for r in self._replicas.values() if r.version == name and r.container is not None)
            else:  # the driving replica removes them; ask the engine (the same one, on one host) what is left
                listed = await self._blocking(self.engine.list_managed, self.state_id)
                left = sum(1 for c in listed if c.version == name)
            if not left or time.monotonic() >= deadline:
                return left
            self.kick()
            await asyncio.sleep(0.1)

    async def logs(self, name: str, tail: int = LOG_TAIL) -> dict[str, list[str]]:
        """Recent log lines per container of `name` (kept lines for containers that already exited)."""
        out: dict[str, list[str]] = {}
        if not self._acting:
            listed = await self._blocking(self.engine.list_managed, self.state_id)
            for c in sorted(listed, key=lambda c: c.replica):
                if c.version == name:
                    out[c.name] = list(await self._blocking(self.engine.logs, c.id, tail))
            return out
        for r in sorted(self._replicas.values(), key=lambda r: r.replica):
            if r.version != name:
                continue
            if r.container is not None:
                try:
                    lines = await self._blocking(self.engine.logs, r.container.id, tail)
                except TurnoutError:
                    lines = r.last_logs
                out[r.container.name] = list(lines)
            elif r.last_logs:
                out[f"{name} replica {r.replica} (exited)"] = list(r.last_logs)
        return out

    @property
    def role(self) -> dict[str, Any]:
        return {"leading": self._acting, "holder": self.leader.holder}

    def _followed_status(self, name: str, v: Version, state: State) -> VersionStatus:
        """What a replica that does not drive the containers knows: the instances the driving one recorded
        (it records only replicas that pass their health checks)."""
        why = f"driven by another replica ({self.leader.holder or 'election pending'})"
        reps = tuple(ReplicaStatus(i, "healthy", None, None, v.endpoints[i], None, 0, None, ()) if i < len(v.endpoints)
                     else ReplicaStatus(i, "missing", None, None, None, None, 0, why, ())
                     for i in range(max(v.spec.replicas, len(v.endpoints))))
        return VersionStatus(
            name=name, image=v.spec.image or "", image_id=None, network=v.spec.network, desired=v.spec.replicas,
            healthy=len(v.endpoints), running=len(v.endpoints), created=v.created,
            routes=tuple(state.users_of(name)), instances=v.endpoints, failing=False, error=None, replicas=reps)

    def status(self, state: State | None = None) -> list[VersionStatus]:
        state = state or self._state
        out = []
        if not self._acting:
            return [self._followed_status(name, v, state) for name, v in sorted(state.versions.items())
                    if v.spec.kind == "docker"]
        for name, v in sorted(state.versions.items()):
            if v.spec.kind != "docker":
                continue
            reps = []
            for i in range(max(v.spec.replicas, self._max_replica(name) + 1)):
                r = self._replicas.get((name, i))
                if r is None:
                    if i < v.spec.replicas:
                        reps.append(ReplicaStatus(i, "missing", None, None, None, None, 0, None, ()))
                    continue
                reps.append(self._replica_status(r))
            img = self._images.get(name)
            failing = bool(reps) and v.spec.replicas > 0 and all(
                (r := self._replicas.get((name, i))) is not None and not r.ever_healthy
                and r.exits >= FAILING_AFTER_EXITS for i in range(v.spec.replicas))
            out.append(VersionStatus(
                name=name, image=v.spec.image or "", image_id=img.image_id if img else None,
                network=v.spec.network, desired=v.spec.replicas,
                healthy=sum(1 for r in reps if r.state == "healthy"),
                running=sum(1 for r in reps if r.container is not None and r.state != "exited"),
                created=v.created, routes=tuple(state.users_of(name)), instances=v.endpoints,
                failing=failing, error=self._image_errors.get(name), replicas=tuple(reps),
            ))
        return out

    def _max_replica(self, name: str) -> int:
        return max((i for (n, i) in self._replicas if n == name), default=-1)

    @staticmethod
    def _replica_status(r: _Replica) -> ReplicaStatus:
        c = r.container
        state: ReplicaState
        if c is None:
            state = "exited" if r.exits else "missing"
        elif not c.running:
            state = "exited"
        elif r.healthy:
            state = "healthy"
        elif r.ever_healthy:
            state = "unhealthy"
        else:
            state = "starting"
        return ReplicaStatus(
            replica=r.replica, state=state, container=c.id[:12] if c else None, name=c.name if c else None,
            endpoint=c.endpoint if c else None, started_at=c.started_at if c else None, exits=r.exits,
            error=r.error, last_logs=r.last_logs,
        )

    # the loop

    def _docker_versions(self) -> dict[str, Version]:
        return {n: v for n, v in self._state.versions.items() if v.spec.kind == "docker"}

    async def _watch_store(self) -> None:
        backoff = 0.1
        while True:
            try:
                cur = await self.store.current()
                self._state = cur.state
                async for rev in self.store.watch(cur.number):
                    before = self._docker_versions()
                    self._state = rev.state
                    # Most revisions are weight, pin and route changes: no container work, and a pass
                    # here would share the event loop with the data plane right when a change lands.
                    if self._docker_versions() != before:
                        self.kick()
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log(f"store watch failed ({e}); retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _following(self) -> bool:
        """True while another replica drives the containers; notices a change of role either way."""
        leading = self.leader.is_leader()
        if leading and not self._acting:
            self._acting = True
            self._dirty = True
            if not isinstance(self.leader, AlwaysLeader):
                self.log("this replica drives the containers now; adopting what runs")
        elif not leading and self._acting:
            self._acting = False
            # Forget what this replica knew: when it leads again it adopts afresh, as after a restart. Nothing
            # is removed, so the containers keep serving while another replica takes over.
            self._replicas.clear()
            self._adopted = False
            self.log(f"another replica drives the containers now ({self.leader.holder or 'not yet elected'})")
        if not self._acting:
            self.engine_error = None  # this replica does not use the engine while it follows
        return not self._acting

    async def _run(self) -> None:
        while True:
            if self._following():
                self._started.set()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FOLLOW_POLL):
                        await self._wake.wait()
                continue
            now = time.monotonic()
            if self._dirty or now >= self._next_resync:
                self._dirty = False
                try:
                    async with self._lock:
                        await self._reconcile()
                    self._next_resync = time.monotonic() + RESYNC_INTERVAL
                    self._reconnect_delay = RECONNECT_BACKOFF[0]
                except EngineUnavailableError as e:
                    self._engine_down(str(e))
                    self._next_resync = time.monotonic() + self._reconnect_delay
                    self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_BACKOFF[1])
                except Exception as e:  # one bad pass must not end the provider
                    self.log(f"reconcile failed: {type(e).__name__}: {e}")
                    self._next_resync = time.monotonic() + RECONNECT_BACKOFF[1]
                self._started.set()
            await self._probe_due()
            await self._publish()
            wake_at = min([self._next_resync, *(r.next_probe for r in self._replicas.values() if r.container),
                           *(r.retry_at for r in self._replicas.values() if r.container is None and r.retry_at)])
            delay = max(0.0, wake_at - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            if any(r.container is None and r.retry_at and r.retry_at <= time.monotonic()
                   for r in self._replicas.values()):
                self._dirty = True

    def _engine_down(self, message: str) -> None:
        # Quiet while no docker version is registered: a proxy without Docker versions need not hear
        # that there is no engine.
        if message != self._reported and self._docker_versions():
            self.log(f"{message}; the data plane keeps serving the last known instances")
            self._reported = message
        self.engine_error = message
        self.engine.reset()

    async def _pinned(self, name: str, v: Version) -> ResolvedImage | None:
        img = self._images.get(name)
        if img is not None:
            return img
        assert v.spec.image is not None
        ref = v.spec.image
        meta_key = f"{IMAGE_META_PREFIX}{name}.{v.created:.6f}"  # a re-registered name is a new version
        if not DIGEST_RE.search(ref):
            ref = await self.store.get_meta(meta_key) or ref
        try:
            img = await self._blocking(self.engine.resolve, ref)
        except ValidationError as e:
            self._image_errors[name] = str(e)
            return None
        self._image_errors.pop(name, None)
        if img.tag is not None:
            await self.store.set_meta(meta_key, img.pinned)
            self.log(f"{name}: tag {img.tag} resolved to {img.pinned}")
        self._images[name] = img
        return img

    def _expected_image(self, v: Version) -> str | None:
        """The pinned reference a replica of `v` must carry, or None while it is not known."""
        if v.spec.image is not None and DIGEST_RE.search(v.spec.image):
            return v.spec.image
        img = self._images.get(v.name)
        return img.pinned if img is not None else None

    async def _reconcile(self) -> None:
        containers = await self._blocking(self.engine.list_managed, self.state_id)
        if self._reported is not None:
            self.log("the Docker engine is reachable again; converging")
            self._reported = None
        self.engine_error = None
        wanted = self._docker_versions()
        now = time.monotonic()
        recorded = {ep for v in wanted.values() for ep in v.endpoints}
        seen: dict[tuple[str, int], Container] = {}
        doomed: list[Container] = []
        exited: list[tuple[tuple[str, int], Container]] = []
        for name, v in wanted.items():
            await self._pinned(name, v)
        for c in sorted(containers, key=lambda c: (not c.running, c.started_at)):
            owner = wanted.get(c.version)
            key = (c.version, c.replica)
            expected = self._expected_image(owner) if owner is not None else None
            # An image the engine no longer lists does not doom running replicas: only a known mismatch does.
            if owner is None or not 0 <= c.replica < owner.spec.replicas or key in seen \
                    or (expected is not None and c.image != expected):
                doomed.append(c)
            elif not c.running:
                exited.append((key, c))
            else:
                seen[key] = c
        for key, c in exited:
            r = self._replicas.setdefault(key, _Replica(*key))
            lines: tuple[str, ...] = ()
            with contextlib.suppress(TurnoutError):
                lines = await self._blocking(self.engine.logs, c.id)
            r.last_logs = lines
            r.exits += 1
            r.error = f"exited with code {c.exit_code}"
            r.healthy = False
            delay = min(RECREATE_BACKOFF[0] * 2 ** (r.exits - 1), RECREATE_BACKOFF[1])
            r.retry_at = now + delay
            r.container = None
            self.log(f"{c.version} replica {c.replica}: {c.name} {r.error}; replacing it in {delay:g}s")
            await self._blocking(self.engine.remove, c.id)
        for c in doomed:
            self.log(f"removing {c.name} ({c.version} replica {c.replica}): no longer wanted")
            await self._blocking(self.engine.remove, c.id)
            gone = self._replicas.get((c.version, c.replica))
            if gone is not None and gone.container is not None and gone.container.id == c.id:
                gone.container = None
        # Adopt or refresh what runs.
        for key, c in seen.items():
            r = self._replicas.setdefault(key, _Replica(*key))
            if r.container is None or r.container.id != c.id:
                # Adopted after a restart: trust the recorded instances until a probe says otherwise, so a
                # proxy restart does not flap its versions out of rotation.
                r.healthy = r.ever_healthy = not self._adopted and c.endpoint in recorded
                r.next_probe = now
                r.failures = 0
            r.container = c
            if c.health == "unhealthy":
                r.healthy = False
        # Forget bookkeeping of versions and slots that are no longer wanted (their containers are gone).
        for key in list(self._replicas):
            owner = wanted.get(key[0])
            if (owner is None or key[1] >= owner.spec.replicas) and key not in seen:
                del self._replicas[key]
        for name in list(self._images):
            if name not in wanted:
                del self._images[name]
        for name in list(self._image_errors):
            if name not in wanted:
                del self._image_errors[name]
        # Create what is missing.
        for name, v in wanted.items():
            img = self._images.get(name)
            if img is None:
                continue
            for i in range(v.spec.replicas):
                key = (name, i)
                if key in seen:
                    continue
                r = self._replicas.setdefault(key, _Replica(name, i))
                if r.retry_at > now:
                    continue
                try:
                    c = await self._blocking(self.engine.create, state_id=self.state_id, version=v,
                                                replica=i, image=img)
                except (ValidationError, ConflictError, NotFoundError) as e:
                    r.error = str(e)
                    r.exits += 1
                    r.retry_at = now + min(RECREATE_BACKOFF[0] * 2 ** (r.exits - 1), RECREATE_BACKOFF[1])
                    self.log(f"{name} replica {i}: cannot create a container: {e}")
                    continue
                r.container = c
                r.healthy = False
                r.failures = 0
                r.retry_at = 0.0
                r.next_probe = time.monotonic()
                self.log(f"{name} replica {i}: started {c.name} ({c.endpoint or 'no endpoint'})")
        self._adopted = True

    async def _probe_due(self) -> None:
        now = time.monotonic()
        due = [r for r in self._replicas.values()
               if r.container is not None and r.container.running and r.next_probe <= now]
        if due:
            await asyncio.gather(*(self._probe_one(r) for r in due))

    async def _probe_one(self, r: _Replica) -> None:
        v = self._state.versions.get(r.version)
        c = r.container
        if v is None or c is None:
            return
        health = v.spec.health
        r.next_probe = time.monotonic() + health.interval
        if c.endpoint is None:
            r.error = "no endpoint (is the port published?)"
            r.healthy = False
            return
        err = await probe(c.endpoint, health.path, health.timeout)
        if c.health == "unhealthy":
            err = err or "the image's HEALTHCHECK reports unhealthy"
        if err is None:
            r.failures = 0
            r.error = None
            if not r.healthy:
                r.healthy = r.ever_healthy = True
        else:
            r.failures += 1
            r.error = f"health check {health.path}: {err}"
            if r.healthy and r.failures >= UNHEALTHY_AFTER:
                r.healthy = False
                self.log(f"{r.version} replica {r.replica}: {c.name} left rotation ({err})")

    async def _publish(self) -> None:
        """Record each docker version's healthy endpoints in the store, when they changed."""
        if not self._adopted or not self.leader.is_leader():
            # Until the engine has been listed once, nothing is known about the replicas: keep what the
            # store says (a proxy restarting while the engine is down must not empty its versions). And a
            # replica whose lease lapsed mid-pass leaves the recording to the one that holds it now.
            return
        for name, v in self._docker_versions().items():
            eps = tuple(r.container.endpoint for _, r in sorted(
                ((k[1], r) for k, r in self._replicas.items() if k[0] == name), key=lambda kv: kv[0])
                if r.healthy and r.container is not None and r.container.running and r.container.endpoint)
            if eps == v.endpoints:
                continue
            healthy = len(eps)
            try:
                rev = await self.store.update(functools.partial(_instances_if_docker, name=name, endpoints=eps),
                                              actor=self.actor, reason=f"{healthy}/{v.spec.replicas} healthy")
            except NotFoundError:
                continue
            except TurnoutError as e:
                self.log(f"could not record instances of {name}: {e}")
                continue
            self._state = rev.state

    # Docker events, on their own thread

    def _follow_events(self) -> None:
        delay = RECONNECT_BACKOFF[0]
        while not self._events_stop.is_set():
            try:
                stream = self.engine.events(self.state_id)
                self._events_stream = stream
                self._from_thread(self.kick)  # events may have been missed while disconnected
                delay = RECONNECT_BACKOFF[0]
                for ev in stream:
                    self._from_thread(self._on_event, ev)
            except Exception as e:
                if not self._events_stop.is_set():
                    self._from_thread(self._on_events_lost, str(e))
            finally:
                self._events_stream = None
            if not self._events_stop.is_set():
                self._from_thread(self.kick)
            self._events_stop.wait(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF[1])

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _on_events_lost(self, message: str) -> None:
        del message  # the reconcile pass reports the engine's state with a clearer message
        self.kick()

    def _on_event(self, ev: Mapping[str, Any]) -> None:
        action = str(ev.get("Action") or ev.get("status") or "")
        cid = str(ev.get("id") or "")
        if action.startswith("health_status"):
            status = action.partition(":")[2].strip()
            for r in self._replicas.values():
                if r.container is not None and r.container.id == cid:
                    r.container = dataclasses.replace(r.container, health=status or None)
                    if status == "unhealthy":
                        r.healthy = False
        elif action == "die":
            for r in self._replicas.values():
                if r.container is not None and r.container.id == cid:
                    # Out of rotation at once; the reconcile pass replaces it.
                    r.healthy = False
                    r.container = dataclasses.replace(r.container, running=False)
        elif action not in ("start", "destroy", "create"):
            return  # exec_* (image health checks), attach, kill signals...: nothing to converge
        self.kick()


def _instances_if_docker(state: State, name: str, endpoints: tuple[str, ...]) -> Change:
    v = state.versions.get(name)
    if v is None or v.spec.kind != "docker":
        return state, ""
    return set_instances(state, name, endpoints)
