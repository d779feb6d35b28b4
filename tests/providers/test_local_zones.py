"""Local versions' instances get a zone: the version's `zone:`, else the proxy's; none without either."""

from __future__ import annotations

import sys
from pathlib import Path

from proxy import changes
from proxy.parse import parse_document
from proxy.providers.local import LocalProvider
from proxy.store import SQLiteStore

BACKEND = [sys.executable, "-m", "proxy.commands.demo_backend", "--name"]


async def test_local_instances_are_recorded_with_their_zone(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    doc = {"versions": {"here": {"command": [*BACKEND, "here"]},
                        "there": {"command": [*BACKEND, "there"], "zone": "eu-1c"}},
           "routes": [{"name": "web", "split": {"here": 1, "there": 1}}]}
    base = parse_document(doc)
    await store.update(lambda s: changes.apply_document(s, base), actor="t")
    provider = LocalProvider(store, zone="eu-1a")
    await provider.start()
    try:
        state = (await store.current()).state
        here, there = state.versions["here"], state.versions["there"]
        assert len(here.endpoints) == 1 and len(there.endpoints) == 1
        assert here.zones == ((here.endpoints[0], "eu-1a"),)
        assert there.zones == ((there.endpoints[0], "eu-1c"),)
    finally:
        await provider.stop()
        await store.close()


async def test_without_a_proxy_zone_local_instances_have_none(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    base = parse_document({"versions": {"here": {"command": [*BACKEND, "here"]}},
                           "routes": [{"name": "web", "split": {"here": 1}}]})
    await store.update(lambda s: changes.apply_document(s, base), actor="t")
    provider = LocalProvider(store)
    await provider.start()
    try:
        here = (await store.current()).state.versions["here"]
        assert len(here.endpoints) == 1 and here.zones == ()
    finally:
        await provider.stop()
        await store.close()
