"""Replica bookkeeping of the Docker provider: what it knows about each replica slot, how that changes on an
exit, a probe or an engine event, and the status it reports per version.

Design rule: a `Replica` is mutable bookkeeping owned by one provider, changed only through its own methods
(each one transition), and never shared; what leaves the provider is the frozen `ReplicaStatus` and
`VersionStatus` made from it. A replica that does not drive the containers reports only what the driving
one recorded (`followed_status`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.model import State, Version
from proxy.providers.engine import Container, ResolvedImage

# A replica leaves rotation after this many failed probes in a row (one failure may be a GC pause).
UNHEALTHY_AFTER = 3
# Backoff for recreating a replica that keeps exiting: doubles per exit, capped, so a crash loop costs
# little while a one-off crash is replaced at once.
RECREATE_BACKOFF = (0.5, 30.0)
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
    zone: str | None = None  # with one engine per zone (proxy.providers.docker_zones)


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
    zones: tuple[tuple[str, int, int], ...] = ()  # (zone, healthy, desired) with one engine per zone


def _backoff(exits: int) -> float:
    return min(RECREATE_BACKOFF[0] * 2.0 ** (exits - 1), RECREATE_BACKOFF[1])


@dataclass(slots=True)
class Replica:
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

    def exited(self, exit_code: int, lines: tuple[str, ...], now: float) -> float:
        """Its container exited (and is being removed): out of rotation, recreated after the returned delay."""
        self.last_logs = lines
        self.exits += 1
        self.error = f"exited with code {exit_code}"
        self.healthy = False
        delay = _backoff(self.exits)
        self.retry_at = now + delay
        self.container = None
        return delay

    def removed(self, container_id: str) -> None:
        """The container `container_id` was removed; forget it if it is this slot's."""
        if self.container is not None and self.container.id == container_id:
            self.container = None

    def running(self, c: Container, *, trusted: bool, now: float) -> None:
        """`c` runs in this slot. A container not known yet is adopted: healthy at once only when `trusted`
        (a restart trusts the recorded instances until a probe says otherwise, so it does not flap)."""
        if self.container is None or self.container.id != c.id:
            self.healthy = self.ever_healthy = trusted
            self.next_probe = now
            self.failures = 0
        self.container = c
        if c.health == "unhealthy":
            self.healthy = False

    def create_failed(self, error: str, now: float) -> None:
        self.error = error
        self.exits += 1
        self.retry_at = now + _backoff(self.exits)

    def created(self, c: Container, now: float) -> None:
        self.container = c
        self.healthy = False
        self.failures = 0
        self.retry_at = 0.0
        self.next_probe = now

    def probe_scheduled(self, at: float) -> None:
        self.next_probe = at

    def no_endpoint(self) -> None:
        self.error = "no endpoint (is the port published?)"
        self.healthy = False

    def probed(self, err: str | None, path: str) -> bool:
        """Record one probe's outcome (None: it passed); True when this failure took it out of rotation."""
        if err is None:
            self.failures = 0
            self.error = None
            if not self.healthy:
                self.healthy = self.ever_healthy = True
            return False
        self.failures += 1
        self.error = f"health check {path}: {err}"
        if self.healthy and self.failures >= UNHEALTHY_AFTER:
            self.healthy = False
            return True
        return False

    def on_event(self, action: str, container_id: str) -> None:
        """A Docker event about `container_id` (health_status: ... or die); other containers are ignored."""
        c = self.container
        if c is None or c.id != container_id:
            return
        if action.startswith("health_status"):
            status = action.partition(":")[2].strip()
            self.container = dataclasses.replace(c, health=status or None)
            if status == "unhealthy":
                self.healthy = False
        elif action == "die":
            # Out of rotation at once; the reconcile pass replaces it.
            self.healthy = False
            self.container = dataclasses.replace(c, running=False)


def event_action(ev: Mapping[str, Any]) -> tuple[str, str]:
    """(action, container id) of a Docker event."""
    return str(ev.get("Action") or ev.get("status") or ""), str(ev.get("id") or "")


def replica_status(r: Replica) -> ReplicaStatus:
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


def version_status(name: str, v: Version, state: State, replicas: Mapping[tuple[str, int], Replica],
                   image: ResolvedImage | None, error: str | None) -> VersionStatus:
    """What the driving replica knows of version `name`: one status per slot it wants or still has."""
    reps = []
    top = max((i for (n, i) in replicas if n == name), default=-1)
    for i in range(max(v.spec.replicas, top + 1)):
        r = replicas.get((name, i))
        if r is None:
            if i < v.spec.replicas:
                reps.append(ReplicaStatus(i, "missing", None, None, None, None, 0, None, ()))
            continue
        reps.append(replica_status(r))
    failing = bool(reps) and v.spec.replicas > 0 and all(
        (r := replicas.get((name, i))) is not None and not r.ever_healthy
        and r.exits >= FAILING_AFTER_EXITS for i in range(v.spec.replicas))
    return VersionStatus(
        name=name, image=v.spec.image or "", image_id=image.image_id if image else None,
        network=v.spec.network, desired=v.spec.replicas,
        healthy=sum(1 for r in reps if r.state == "healthy"),
        running=sum(1 for r in reps if r.container is not None and r.state != "exited"),
        created=v.created, routes=tuple(state.users_of(name)), instances=v.endpoints,
        failing=failing, error=error, replicas=tuple(reps),
    )


def followed_status(name: str, v: Version, state: State, holder: str | None) -> VersionStatus:
    """What a replica that does not drive the containers knows: the instances the driving one recorded
    (it records only replicas that pass their health checks)."""
    why = f"driven by another replica ({holder or 'election pending'})"
    reps = tuple(ReplicaStatus(i, "healthy", None, None, v.endpoints[i], None, 0, None, ()) if i < len(v.endpoints)
                 else ReplicaStatus(i, "missing", None, None, None, None, 0, why, ())
                 for i in range(max(v.spec.replicas, len(v.endpoints))))
    return VersionStatus(
        name=name, image=v.spec.image or "", image_id=None, network=v.spec.network, desired=v.spec.replicas,
        healthy=len(v.endpoints), running=len(v.endpoints), created=v.created,
        routes=tuple(state.users_of(name)), instances=v.endpoints, failing=False, error=None, replicas=reps)
