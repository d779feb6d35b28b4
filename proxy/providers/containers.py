"""The Docker provider: versions as immutable container images.

Design rule: the store holds what should run (each docker version's pinned image and replica count) and
the engine holds what does run; the provider only converges the second toward the first and reports
which replicas pass their health checks as the version's instances (`changes.set_instances`). Every container
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

A tag (only with allow_tag) is resolved once to a digest pin (see providers/engine.py) and the result is kept
in the store's meta data, so every later replica runs the same image whatever the tag points to.

With one engine per zone (proxy.providers.docker_zones) a provider drives one of them (`zone`): it runs only
the replica slots placed there (proxy.zones.slot_zones) and records only its zone's instances.

This module holds the provider's loop (reconcile, probe, publish); the replica count itself changes through
`proxy.changes.set_replicas`, like every state change;
the per-replica bookkeeping and reported status are in providers/replicas.py, the Docker event thread in
providers/events.py, the SDK behind providers/engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from proxy.changes import Change, set_instances, set_replicas
from proxy.control.leader import FOLLOW_POLL, AlwaysLeader, Leader, leader_for
from proxy.errors import ConflictError, FieldError, NotFoundError, TurnoutError, ValidationError
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
from proxy.providers.events import RECONNECT_BACKOFF, EngineEvents
from proxy.providers.replicas import (
    Replica,
    VersionStatus,
    event_action,
    followed_status,
    version_status,
)
from proxy.store.base import Store
from proxy.zones import slot_zones

__all__ = [
    "LABEL_IMAGE", "LABEL_MANAGED", "LABEL_PORT", "LABEL_REPLICA", "LABEL_STATE", "LABEL_VERSION",
    "DockerProvider", "EngineUnavailableError", "ResolvedImage", "VersionStatus", "probe",
]

T = TypeVar("T")

STATE_ID_META = "docker.state_id"
IMAGE_META_PREFIX = "docker.image."  # + version name: a tag resolved once, kept for every later replica
ACTOR = "docker-provider"

# Full re-list of containers even without events, in case an event was lost while reconnecting.
RESYNC_INTERVAL = 15.0
# Log lines kept from a replica that exited, shown by `turnout deploy` when a version never gets healthy.
LOG_TAIL = 20


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
                 log: Callable[[str], None] = _log, leader: Leader | None = None, zone: str | None = None,
                 zones: tuple[str, ...] = (), register: bool = True) -> None:
        self.store = store
        # One engine of several (docker.engines): the zone it is in, and every configured zone in order.
        self.zone = zone
        self.zones = zones
        self._register = register
        self.leader = leader or leader_for(store, "providers")
        self._acting = False  # this replica drives the containers (it holds the `providers` role)
        self.engine = Engine(base_url)
        self.actor = actor
        self.log = log
        self.state_id = ""
        self.engine_error: str | None = "connecting"
        self._reported: str | None = None  # the engine error last logged
        self._state = State()
        self._replicas: dict[tuple[str, int], Replica] = {}
        self._images: dict[str, ResolvedImage] = {}
        self._image_errors: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._dirty = True
        self._next_resync = 0.0
        self._reconnect_delay = RECONNECT_BACKOFF[0]
        self._tasks: list[asyncio.Task[None]] = []
        self._events: EngineEvents | None = None
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
        self._events = EngineEvents(self.engine, state_id, on_event=self._on_event, kick=self.kick)
        self._events.start(self._loop)
        self._tasks = [self._loop.create_task(self._run()), self._loop.create_task(self._watch_store())]
        # One pass before returning (and before the admin API sees this provider), so a restart has
        # adopted its containers when start() returns.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENGINE_TIMEOUT):
                await self._started.wait()
        if self._register:
            DockerProvider._running[id(self.store)] = self

    @property
    def state(self) -> State:
        return self._state

    async def wait_first_pass(self, timeout: float) -> bool:
        """True once the first reconcile pass (adopting running containers) has finished."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._started.wait()
        return self._started.is_set()

    async def stop(self) -> None:
        DockerProvider._running.pop(id(self.store), None)
        if self._events is not None:
            await self._events.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._events is not None:
            await self._events.join()
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

    async def resolve_image(self, ref: str, zones: tuple[str, ...] = ()) -> ResolvedImage:
        if zones and self.zone is None:
            raise ValidationError([FieldError("zones", "this proxy drives one Docker engine; spreading over zones "
                                              "needs one engine per zone (docker.engines in the static config)")])
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

    async def logs(self, name: str, tail: int = LOG_TAIL, replica: int | None = None) -> dict[str, list[str]]:
        """Recent log lines per container of `name` (kept lines for containers that already exited);
        only replica number `replica`'s when given."""
        out: dict[str, list[str]] = {}
        if not self._acting:
            listed = await self._blocking(self.engine.list_managed, self.state_id)
            for c in sorted(listed, key=lambda c: c.replica):
                if c.version == name and replica in (None, c.replica):
                    out[c.name] = list(await self._blocking(self.engine.logs, c.id, tail))
            return out
        for r in sorted(self._replicas.values(), key=lambda r: r.replica):
            if r.version != name or replica not in (None, r.replica):
                continue
            if r.container is not None:
                try:
                    lines = await self._blocking(self.engine.logs, r.container.id, tail)
                except TurnoutError:
                    lines = r.last_logs
                out[r.container.name] = list(lines)[-tail:]  # kept lines are bounded by the tail asked for too
            elif r.last_logs:
                out[f"{name} replica {r.replica} (exited)"] = list(r.last_logs)[-tail:]
        return out

    @property
    def role(self) -> dict[str, Any]:
        return {"leading": self._acting, "holder": self.leader.holder}

    def status(self, state: State | None = None) -> list[VersionStatus]:
        state = state or self._state
        out = []
        if not self._acting:
            return [followed_status(name, v, state, self.leader.holder) for name, v in sorted(state.versions.items())
                    if v.spec.kind == "docker"]
        for name, v in sorted(state.versions.items()):
            if v.spec.kind == "docker":
                out.append(version_status(name, v, state, self._replicas, self._images.get(name),
                                          self._image_errors.get(name)))
        return out

    # the loop

    def _docker_versions(self) -> dict[str, Version]:
        return {n: v for n, v in self._state.versions.items() if v.spec.kind == "docker" and self._mine(v)}

    def _mine(self, v: Version) -> bool:
        return self.zone is None or self.zone in (v.spec.zones or self.zones[:1])

    def _slots(self, v: Version) -> list[int]:
        """The replica slots this provider runs: all of them with one engine, else those placed in its zone."""
        if self.zone is None:
            return list(range(v.spec.replicas))
        return [i for i, z in enumerate(slot_zones(v.spec.replicas, v.spec.zones or self.zones[:1]))
                if z == self.zone]

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
            if owner is None or c.replica not in self._slots(owner) or key in seen \
                    or (expected is not None and c.image != expected):
                doomed.append(c)
            elif not c.running:
                exited.append((key, c))
            else:
                seen[key] = c
        for key, c in exited:
            r = self._replicas.setdefault(key, Replica(*key))
            lines: tuple[str, ...] = ()
            with contextlib.suppress(TurnoutError):
                lines = await self._blocking(self.engine.logs, c.id)
            delay = r.exited(c.exit_code, lines, now)
            self.log(f"{c.version} replica {c.replica}: {c.name} {r.error}; replacing it in {delay:g}s")
            await self._blocking(self.engine.remove, c.id)
        for c in doomed:
            self.log(f"removing {c.name} ({c.version} replica {c.replica}): no longer wanted")
            await self._blocking(self.engine.remove, c.id)
            gone = self._replicas.get((c.version, c.replica))
            if gone is not None:
                gone.removed(c.id)
        # Adopt or refresh what runs.
        for key, c in seen.items():
            r = self._replicas.setdefault(key, Replica(*key))
            # Adopted after a restart: trust the recorded instances until a probe says otherwise.
            r.running(c, trusted=not self._adopted and c.endpoint in recorded, now=now)
        # Forget bookkeeping of versions and slots that are no longer wanted (their containers are gone).
        for key in list(self._replicas):
            owner = wanted.get(key[0])
            if (owner is None or key[1] not in self._slots(owner)) and key not in seen:
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
            for i in self._slots(v):
                key = (name, i)
                if key in seen:
                    continue
                r = self._replicas.setdefault(key, Replica(name, i))
                if r.retry_at > now:
                    continue
                try:
                    c = await self._blocking(self.engine.create, state_id=self.state_id, version=v,
                                                replica=i, image=img)
                except (ValidationError, ConflictError, NotFoundError) as e:
                    r.create_failed(str(e), now)
                    self.log(f"{name} replica {i}: cannot create a container: {e}")
                    continue
                r.created(c, time.monotonic())
                self.log(f"{name} replica {i}: started {c.name} ({c.endpoint or 'no endpoint'})")
        self._adopted = True

    async def _probe_due(self) -> None:
        now = time.monotonic()
        due = [r for r in self._replicas.values()
               if r.container is not None and r.container.running and r.next_probe <= now]
        if due:
            await asyncio.gather(*(self._probe_one(r) for r in due))

    async def _probe_one(self, r: Replica) -> None:
        v = self._state.versions.get(r.version)
        c = r.container
        if v is None or c is None:
            return
        health = v.spec.health
        r.probe_scheduled(time.monotonic() + health.interval)
        if c.endpoint is None:
            r.no_endpoint()
            return
        err = await probe(c.endpoint, health.path, health.timeout)
        if c.health == "unhealthy":
            err = err or "the image's HEALTHCHECK reports unhealthy"
        if r.probed(err, health.path):
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
            zones = dict(v.zones)
            if eps == (v.endpoints if self.zone is None else tuple(e for e in v.endpoints
                                                                   if zones.get(e) == self.zone)):
                continue
            healthy = len(eps)
            try:
                rev = await self.store.update(functools.partial(_instances_if_docker, name=name, endpoints=eps,
                                                                zone=self.zone),
                                              actor=self.actor, reason=f"{healthy}/{v.spec.replicas} healthy")
            except NotFoundError:
                continue
            except TurnoutError as e:
                self.log(f"could not record instances of {name}: {e}")
                continue
            self._state = rev.state

    # Docker events (followed on their own thread, handled here on the loop)

    def _on_event(self, ev: Mapping[str, Any]) -> None:
        action, cid = event_action(ev)
        if action.startswith("health_status") or action == "die":
            for r in self._replicas.values():
                r.on_event(action, cid)
        elif action not in ("start", "destroy", "create"):
            return  # exec_* (image health checks), attach, kill signals...: nothing to converge
        self.kick()


def _instances_if_docker(state: State, name: str, endpoints: tuple[str, ...], zone: str | None = None) -> Change:
    """`zone`: the instances of that zone only; the other zones' stay as recorded."""
    v = state.versions.get(name)
    if v is None or v.spec.kind != "docker":
        return state, ""
    if zone is None:
        return set_instances(state, name, endpoints)
    zones = dict(v.zones)
    others = tuple(e for e in v.endpoints if zones.get(e) != zone and e not in endpoints)
    return set_instances(state, name, others + endpoints,
                         tuple((e, zones[e]) for e in others if e in zones) + tuple((e, zone) for e in endpoints))
