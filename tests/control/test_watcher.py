"""The one install path (proxy.control.watcher): every revision is built once, duplicates and older ones are
dropped, listeners hear each installed table once, and `installed` answers for this process and the workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import changes
from proxy.control import watcher as watcher_mod
from proxy.control.watcher import UncompiledRevisionError, Watcher
from proxy.model import Route, State, Version, VersionSpec
from proxy.store.sqlite import SQLiteStore
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

EP = "http://127.0.0.1:9001"


def state(weight: float = 100.0) -> State:
    v = Version("v1", VersionSpec(kind="static", endpoints=(EP,)), (EP,))
    return State(versions={"v1": v}, routes=(Route("web", split=(("v1", weight),)),))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db")
    try:
        yield s
    finally:
        await s.close()


async def commit(store: SQLiteStore, st: State) -> int:
    rev = await store.update(lambda s: changes.apply_document(s, st), actor="test", reason="t")
    return rev.number


async def test_a_revision_received_twice_is_built_and_announced_once(store: SQLiteStore) -> None:
    w = Watcher(store, TableHolder(), Stats())
    heard: list[RouteTable] = []
    w.listeners.append(heard.append)
    await commit(store, state())
    rev = await store.current()
    w.receive(rev)
    w.receive(rev)  # the store's watch delivers what the admin API handed over already
    await commit(store, state(50.0))
    newer = await store.current()
    w.receive(newer)
    w.receive(rev)  # older: dropped
    assert [t.revision for t in heard] == [1, 2]
    assert w.holder.table is heard[-1]
    assert w.stats.applied == 2


async def test_installed_waits_for_the_store_watch_when_another_process_committed(store: SQLiteStore) -> None:
    w = Watcher(store, TableHolder(), Stats())
    w.start()
    try:
        number = await commit(store, state())  # not handed to the watcher: it must find it by watching
        await asyncio.wait_for(w.installed(number), 2.0)
        assert w.holder.table.revision == number
    finally:
        await w.stop()


async def test_installed_also_waits_for_the_workers(store: SQLiteStore) -> None:
    w = Watcher(store, TableHolder(), Stats())
    asked: list[int] = []

    async def routed(number: int) -> None:
        asked.append(number)

    w.routed = routed
    number = await commit(store, state())
    w.receive(await store.current())
    await w.installed(number)
    assert asked == [number]


async def test_a_revision_that_cannot_compile_keeps_the_old_table_and_fails_installed(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Watcher(store, TableHolder(), Stats())
    await commit(store, state())
    w.receive(await store.current())
    old = w.holder.table

    def broken(*args: object, **kwargs: object) -> RouteTable:
        raise ValueError("boom")

    monkeypatch.setattr(watcher_mod, "RouteTable", broken)
    number = await commit(store, state(50.0))
    w.receive(await store.current())
    with pytest.raises(UncompiledRevisionError) as e:
        await w.installed(number)
    assert str(e.value) == "revision 2 is committed but could not be compiled; still serving revision 1"
    assert w.holder.table is old
    assert w.stats.apply_errors == 1


async def test_a_failing_listener_does_not_keep_the_others_from_hearing(store: SQLiteStore) -> None:
    w = Watcher(store, TableHolder(), Stats())
    heard: list[int] = []

    def failing(table: RouteTable) -> None:
        raise RuntimeError("listener bug")

    w.listeners.extend([failing, lambda t: heard.append(t.revision)])
    await commit(store, state())
    w.receive(await store.current())
    assert heard == [1]
