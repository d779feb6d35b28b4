"""The Docker provider across zones: one Docker engine per zone (`docker: {engines: {ZONE: URL}}`), one
DockerProvider driving each, and one face for the admin API.

Design rule: placement is a pure function of the spec: replica slot i of a version spread over zones Z runs
in Z[i % len(Z)] (proxy.zones.slot_zones; a version naming no zone runs in the first configured one), so
every zone's provider knows its own slots without asking the others, the replicas stay spread when one
engine loses containers (that zone's provider makes them again, there), and nothing moves while an engine
is unreachable: its provider keeps what it knew, its instances go unhealthy and traffic spills over to the
other zones (proxy.zones), and it adopts the zone's containers again when the engine answers. Each zone's
provider records only its own zone's instances, with their zone, so the proxy's endpoint choice knows where
each one runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from proxy.control.leader import Leader, leader_for
from proxy.errors import FieldError, ValidationError
from proxy.model import State
from proxy.providers.containers import ACTOR, DockerProvider, _log
from proxy.providers.engine import EngineUnavailableError, ResolvedImage
from proxy.providers.replicas import VersionStatus
from proxy.store.base import Store
from proxy.zones import slot_zones


class _Shared(Leader):
    """The one `providers` election, seen by each zone's provider (the zones act together or not at all)."""

    def __init__(self, inner: Leader) -> None:
        self.inner = inner
        self.holder = inner.holder

    def is_leader(self) -> bool:
        leading = self.inner.is_leader()
        self.holder = self.inner.holder
        return leading


def _zone_log(zone: str) -> Callable[[str], None]:
    return lambda msg: _log(f"{zone}: {msg}")


class DockerZones:
    """`await zones.start()` ... `await zones.stop()`; the admin API calls it like a DockerProvider."""

    _running: ClassVar[dict[int, DockerZones]] = {}

    def __init__(self, store: Store, engines: tuple[tuple[str, str], ...], *, leader: Leader | None = None,
                 actor: str = ACTOR) -> None:
        self.store = store
        self.leader = leader or leader_for(store, "providers")
        order = tuple(z for z, _ in engines)
        shared = _Shared(self.leader)
        self.zones: dict[str, DockerProvider] = {
            zone: DockerProvider(store, base_url=url, actor=actor, leader=shared, zone=zone, zones=order,
                                 log=_zone_log(zone), register=False)
            for zone, url in engines}

    def __repr__(self) -> str:
        up = sum(1 for p in self.zones.values() if p.engine_error is None)
        return f"<DockerZones [engines: {up} up of {len(self.zones)} | zones: {', '.join(self.zones)}]>"

    @classmethod
    def for_store(cls, store: Store) -> DockerZones | None:
        return cls._running.get(id(store))

    async def start(self) -> None:
        await self.leader.start()
        await self.leader.settled()
        await asyncio.gather(*(p.start() for p in self.zones.values()))
        DockerZones._running[id(self.store)] = self

    async def stop(self) -> None:
        DockerZones._running.pop(id(self.store), None)
        await asyncio.gather(*(p.stop() for p in self.zones.values()))
        await self.leader.stop()

    async def wait_first_pass(self, timeout: float) -> bool:
        done = await asyncio.gather(*(p.wait_first_pass(timeout) for p in self.zones.values()))
        return all(done)

    def kick(self) -> None:
        for p in self.zones.values():
            p.kick()

    # what the admin API reads

    @property
    def engine_error(self) -> str | None:
        errors = [f"{z}: {p.engine_error}" for z, p in self.zones.items() if p.engine_error is not None]
        return "; ".join(errors) or None

    @property
    def state_id(self) -> str:
        return next(iter(self.zones.values())).state_id

    @property
    def role(self) -> dict[str, Any]:
        return {"leading": self.leader.is_leader(), "holder": self.leader.holder,
                "engines": {z: {"ok": p.engine_error is None, "error": p.engine_error} for z, p in self.zones.items()}}

    def _where(self, zones: tuple[str, ...]) -> tuple[str, ...]:
        return zones or (next(iter(self.zones)),)

    def status(self, state: State | None = None) -> list[VersionStatus]:
        """Each version as one status: every slot from the zone that runs it, and replicas per zone."""
        per_zone = {z: {s.name: s for s in p.status(state)} for z, p in self.zones.items()}
        first = next(iter(per_zone.values()))
        out = []
        for name, base in first.items():
            v = (state or p_state(self)).versions.get(name)
            where = self._where(v.spec.zones) if v is not None else ()
            slots = slot_zones(base.desired, where)
            reps = []
            for i, zone in enumerate(slots):
                s = per_zone.get(zone, {}).get(name)
                if s is not None and i < len(s.replicas):
                    reps.append(dataclasses.replace(s.replicas[i], zone=zone))
            counts = tuple((z, sum(1 for r in reps if r.zone == z and r.state == "healthy"), slots.count(z))
                           for z in where)
            errors = [s.error for z in where if (s := per_zone.get(z, {}).get(name)) is not None and s.error]
            missing = [z for z in where if z not in self.zones]
            if missing:
                errors.append(f"no Docker engine for zone(s) {', '.join(missing)} (docker.engines)")
            out.append(dataclasses.replace(
                base, replicas=tuple(reps), healthy=sum(1 for r in reps if r.state == "healthy"),
                running=sum(1 for r in reps if r.container is not None and r.state != "exited"),
                failing=any(s.failing for z in where if (s := per_zone.get(z, {}).get(name)) is not None),
                error="; ".join(errors) or None, zones=counts))
        return out

    # what the admin API does

    async def resolve_image(self, ref: str, zones: tuple[str, ...] = ()) -> ResolvedImage:
        """The image, resolved on the engine of every zone the version runs in: each must have it, the same."""
        for i, z in enumerate(zones):
            if z not in self.zones:
                raise ValidationError([FieldError(f"zones[{i}]", f"no Docker engine for zone {z!r} (this proxy's "
                                                  f"docker.engines: {', '.join(self.zones)})")])
        where = self._where(zones)
        found = await asyncio.gather(*(self.zones[z].resolve_image(ref) for z in where))
        pins = {r.pinned for r in found}
        if len(pins) > 1:
            raise ValidationError([FieldError("image", f"{ref} names different images in zones "
                                              f"{', '.join(where)} ({', '.join(sorted(pins))}): load the same one")])
        return found[0]

    async def require_engine(self) -> None:
        down = [f"{z}: {e}" for z, p in self.zones.items() if (e := await _ping(p)) is not None]
        if down:
            raise EngineUnavailableError("; ".join(down))

    async def scale(self, name: str, replicas: int, *, actor: str, reason: str = "", force: bool = False) -> int:
        number = await next(iter(self.zones.values())).scale(name, replicas, actor=actor, reason=reason, force=force)
        self.kick()
        return number

    async def wait_removed(self, name: str, timeout: float) -> int:
        left = await asyncio.gather(*(p.wait_removed(name, timeout) for p in self.zones.values()))
        return sum(left)

    async def logs(self, name: str, tail: int = 20, replica: int | None = None) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for z, p in self.zones.items():
            for container, lines in (await p.logs(name, tail, replica=replica)).items():
                out[f"{z}/{container}"] = lines
        return out


def p_state(zones: DockerZones) -> State:
    return next(iter(zones.zones.values())).state


async def _ping(p: DockerProvider) -> str | None:
    try:
        await p.require_engine()
    except EngineUnavailableError as e:
        return str(e)
    return None
