"""Fixtures for the canary, gate and drain tests: a SQLite store in tmp_path, a context whose health view the
test controls, a controllable clock, and a helper that records requests the way the data plane does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy import changes
from proxy.admin.context import AdminContext
from proxy.control.canary import CanaryController
from proxy.control.watcher import Watcher
from proxy.model import Route, State, Version, VersionSpec
from proxy.settings import Settings
from proxy.store.sqlite import SQLiteStore
from proxy.table import TableHolder
from proxy.telemetry.metrics import StatsSnapshot, aggregate
from proxy.telemetry.stats import Stats

# Static endpoints on loopback; controller tests never connect to them.
EP1 = "http://127.0.0.1:9001"
EP2 = "http://127.0.0.1:9002"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class World:
    path: Path
    store: SQLiteStore
    ctx: AdminContext
    stats: Stats
    clock: Clock
    health: dict[str, dict[str, bool]] = field(default_factory=dict)

    def snapshot(self) -> StatsSnapshot:
        return aggregate(self.stats, None)

    def controller(self) -> CanaryController:
        return CanaryController(self.store, self.stats, self.ctx.health, self.snapshot, clock=self.clock)

    def feed(self, version: str, n: int, *, status: int = 200, duration: float = 0.004,
             route: str = "web") -> None:
        for _ in range(n):
            self.stats.request(route, version, status, duration, 0, 10)

    async def split(self, route: str = "web") -> dict[str, float]:
        r = (await self.store.current()).state.route(route)
        assert r is not None
        return dict(r.split)


def static(name: str, endpoint: str, check: tuple[str, ...] = ()) -> Version:
    return Version(name, VersionSpec(kind="static", endpoints=(endpoint,), check=check), (endpoint,))


async def seed(store: SQLiteStore, state: State) -> None:
    await store.update(lambda s: changes.apply_document(s, state), actor="test", reason="seed")


def two_versions(check: tuple[str, ...] = (), *, cookie: str | None = None) -> State:
    return State(
        versions={"v1": static("v1", EP1), "v2": static("v2", EP2, check)},
        routes=(Route("web", split=(("v1", 100.0),), assignment_cookie=cookie),),
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    stats = Stats()
    health: dict[str, dict[str, bool]] = {}
    ctx = AdminContext(settings=Settings(), store=store, watcher=Watcher(store, TableHolder(), stats), stats=stats,
                       health=lambda: health)
    await seed(store, two_versions())
    w = World(path, store, ctx, stats, Clock(), health)
    yield w
    await w.store.close()
