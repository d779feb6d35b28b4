"""SQLite revision store: revisions, history, read-back, compare-and-swap, crash safety, restart rule."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from proxy import changes
from proxy.errors import ConflictError, NotFoundError, StaleRevisionError, ValidationError
from proxy.parse import parse_document, state_to_stored
from proxy.store import SQLiteStore, codec
from proxy.supervisor.seed import seed_from_file

DOC = {
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}}, {"name": "api", "split": {"v1": 1}}],
}
ROUTES_YAML = """
versions:
  v1: {endpoints: ["http://127.0.0.1:9101"]}
  v2: {endpoints: ["http://127.0.0.1:9102"]}
routes:
  - {name: web, split: {v1: 90, v2: 10}}
"""


async def test_revisions_history_and_read_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    base = parse_document(DOC)
    r1 = await store.update(lambda s: changes.apply_document(s, base), actor="alice", reason="initial")
    r2 = await store.update(lambda s: changes.set_split(s, "web", {"v1": 50, "v2": 50}), actor="bob", reason="canary")
    r3 = await store.update(lambda s: changes.set_split(s, "api", {"v2": 1}), actor="bob", reason="api too")
    assert (r1.number, r2.number, r3.number) == (1, 2, 3)
    assert r2.info.actor == "bob" and r2.info.reason == "canary"
    assert r2.info.summary == "split web: v1=90 v2=10 -> v1=50 v2=50"
    # A no-op writes no revision.
    assert (await store.update(lambda s: changes.set_split(s, "api", {"v2": 1}), actor="x")).number == 3
    hist = await store.history()
    assert [h.number for h in hist] == [3, 2, 1]
    assert [h.number for h in await store.history(route="web")] == [2, 1]
    assert [h.number for h in await store.history(limit=1, before=3)] == [2]
    old = await store.get(1)
    assert old.state.route("web").split == (("v1", 90.0), ("v2", 10.0))  # type: ignore[union-attr]
    # Read back again (a rollback target is): decoded once, then served from the bounded recent set.
    assert await store.get(1) is old
    with pytest.raises(NotFoundError):
        await store.get(99)
    await store.close()
    reopened = SQLiteStore(tmp_path / "s.db")
    assert (await reopened.current()).state == r3.state
    await reopened.close()


def test_recent_revisions_keep_the_last_few_read() -> None:
    from proxy.store.base import GENESIS, RecentRevisions

    recent = RecentRevisions(size=2)
    recent.put(1, GENESIS)
    recent.put(2, GENESIS)
    assert recent.get(1) is GENESIS  # 1 is now the most recently used
    recent.put(3, GENESIS)
    assert (recent.get(1), recent.get(2), recent.get(3)) == (GENESIS, None, GENESIS)


async def test_compare_and_swap(tmp_path: Path) -> None:
    a, b = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    base = parse_document(DOC)
    await a.update(lambda s: changes.apply_document(s, base), actor="a")
    await a.update(lambda s: changes.set_split(s, "web", {"v2": 20}), actor="a", expected=1)
    with pytest.raises(StaleRevisionError) as e:
        await b.update(lambda s: changes.set_split(s, "web", {"v2": 30}), actor="b", expected=1)
    assert (e.value.expected, e.value.current) == (1, 2)
    assert (await b.current()).state.route("web").split == (("v1", 90.0), ("v2", 20.0))  # type: ignore[union-attr]
    await a.close()
    await b.close()


async def test_large_pin_sets_are_stored_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    base = parse_document(DOC)
    await store.update(lambda s: changes.apply_document(s, base), actor="a")
    route = base.route("web")
    assert route is not None
    import dataclasses

    pinned = dataclasses.replace(route, pins={f"client-{i}": "v2" for i in range(100_000)})
    await store.update(lambda s: changes.put_route(s, pinned), actor="a")
    for w in range(5):
        await store.update(lambda s, w=w: changes.set_split(s, "web", {"v2": 11 + w}), actor="a")
    size_blobs = os.path.getsize(tmp_path / "s.db")
    assert size_blobs < 12_000_000  # one copy of the pins (~2.7 MB), not one per revision
    other = SQLiteStore(tmp_path / "s.db")
    cur = await other.current()
    assert len(cur.state.route("web").pins) == 100_000  # type: ignore[union-attr]
    await store.close()
    await other.close()


async def test_watch_sees_commits_from_another_process_connection(tmp_path: Path) -> None:
    writer, reader = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    base = parse_document(DOC)
    got: list[int] = []

    async def follow() -> None:
        async for rev in reader.watch(0):
            got.append(rev.number)
            if rev.number == 3:
                return

    task = asyncio.create_task(follow())
    await writer.update(lambda s: changes.apply_document(s, base), actor="a")
    await writer.update(lambda s: changes.set_split(s, "web", {"v2": 20}), actor="a")
    await writer.update(lambda s: changes.set_split(s, "web", {"v2": 30}), actor="a")
    await asyncio.wait_for(task, 5)
    assert got == [1, 2, 3]
    await writer.close()
    await reader.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from proxy import changes
    from proxy.parse import parse_document
    from proxy.store import SQLiteStore
    DOC = {"versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]},
                        "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
           "routes": [{"name": "web", "split": {"v1": 1, "v2": 1}}]}
    async def main():
        store = SQLiteStore(sys.argv[1])
        if (await store.current()).number == 0:
            base = parse_document(DOC)
            await store.update(lambda s: changes.apply_document(s, base), actor="w")
        while True:
            cur = await store.current()
            n = cur.number + 1
            rev = await store.commit(changes.set_split(cur.state, "web", {"v2": n})[0], expected=cur.number,
                                     actor="w", reason=f"r{n}", summary=f"s{n}", routes=("web",))
            print(rev.number, flush=True)
    asyncio.run(main())
""")


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    acked: list[int] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # wait until it writes, then kill at a random point
        assert first.strip().isdigit()
        acked.append(int(first))
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        out = proc.stdout.read().split()
        proc.wait()
        proc.stdout.close()
        acked.extend(int(x) for x in out)
    store = SQLiteStore(db)

    async def check() -> None:
        latest = (await store.current()).number
        assert latest >= max(acked)
        for n in sorted(set(acked)):
            rev = await store.get(n)
            assert rev.info.reason == f"r{n}"
            assert dict(rev.state.route("web").split)["v2"] == n  # type: ignore[union-attr]

    asyncio.run(check())
    asyncio.run(store.close())


PIN_WRITER = textwrap.dedent("""
    import asyncio, sys
    from proxy import changes
    from proxy.parse import parse_document
    from proxy.store import SQLiteStore
    DOC = {"versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]},
                        "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
           "routes": [{"name": "web", "split": {"v1": 1, "v2": 1},
                       "pins": {f"seed-{i}": "v2" for i in range(2000)}}]}
    async def main():
        store = SQLiteStore(sys.argv[1], keep=5)
        store.gc_every = 3  # compaction runs (and is killed) often
        if (await store.current()).number == 0:
            base = parse_document(DOC)
            await store.update(lambda s: changes.apply_document(s, base), actor="w")
        while True:
            n = (await store.current()).number + 1
            rev = await store.update(lambda s, n=n: changes.pin(s, "web", f"c{n}", "v1"), actor="w")
            print(rev.number, flush=True)
    asyncio.run(main())
""")


def test_acknowledged_pin_changes_survive_sigkill_during_compaction(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(PIN_WRITER)
    rng = random.Random(4321)
    acked: list[int] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip().isdigit()
        acked.append(int(first))
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(proc.pid, signal.SIGKILL)
        out = proc.stdout.read().split()
        proc.wait()
        proc.stdout.close()
        acked.extend(int(x) for x in out)

    async def check() -> None:
        store = SQLiteStore(db, keep=5)
        cur = await store.current()
        assert cur.number >= max(acked)
        web = cur.state.route("web")
        assert web is not None
        assert {f"c{n}" for n in acked} <= set(web.pins)  # every acknowledged pin is there
        assert len(web.pins) == 2000 + cur.number - 1
        # Every revision whose state is kept reads back whole: compaction never swept a blob it needs.
        for n in range(max(1, cur.number - 4), cur.number + 1):
            pinned = (await store.get(n)).state.route("web")
            assert pinned is not None and len(pinned.pins) == 2000 + n - 1
        await store.close()

    asyncio.run(check())


async def test_restart_rule_keeps_live_changes(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_YAML)
    store = SQLiteStore(tmp_path / "s.db")
    r1 = await seed_from_file(store, str(routes))
    assert r1.number == 1 and r1.info.reason == "seed from route file"
    live = await store.update(lambda s: changes.set_split(s, "web", {"v2": 50}), actor="op")
    # Restart with the same file: the live change stays.
    again = await seed_from_file(store, str(routes))
    assert again.number == live.number
    assert dict(again.state.route("web").split)["v2"] == 50  # type: ignore[union-attr]
    # The file changed: it is applied as a new revision.
    routes.write_text(ROUTES_YAML.replace("v2: 10", "v2: 20"))
    changed = await seed_from_file(store, str(routes))
    assert changed.number == live.number + 1 and changed.info.reason == "route file changed"
    assert dict(changed.state.route("web").split)["v2"] == 20  # type: ignore[union-attr]
    # An invalid file leaves the stored state serving.
    routes.write_text(ROUTES_YAML.replace("v2: 10", "v9: 20"))
    kept = await seed_from_file(store, str(routes))
    assert kept.number == changed.number
    await store.close()


async def test_invalid_file_on_empty_store_refuses(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_YAML.replace("v2: 10", "v9: 10"))
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(ValidationError):
        await seed_from_file(store, str(routes))
    assert (await store.current()).number == 0
    await store.close()


async def test_route_file_giving_traffic_to_a_failing_check_is_refused(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    failing = f'["{sys.executable}", "-c", "raise SystemExit(3)"]'
    v3 = f'v3: {{check: {failing}, endpoints: ["http://127.0.0.1:9103"]}}'
    gated = ROUTES_YAML.replace("  v2: {endpoints", f"  {v3}\n  v2: {{endpoints")
    gated = gated.replace("v2: 10}", "v2: 10, v3: 1}")
    routes.write_text(gated)
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(ConflictError, match=r"^check v3: FAILED \(exit 3, "):
        await seed_from_file(store, str(routes))
    # The verdict is in the history, and there is still nothing to serve: a second start refuses too.
    assert (await store.current()).state.routes == ()
    with pytest.raises(ConflictError):
        await seed_from_file(store, str(routes))
    routes.write_text(ROUTES_YAML)
    ok = await seed_from_file(store, str(routes))
    assert ok.info.summary == "apply file: 1 route(s) +v1,v2"
    routes.write_text(gated)
    kept = await seed_from_file(store, str(routes))
    assert (kept.number, kept.state) == (ok.number, ok.state)
    verdict = await store.current()  # the only revision written since: the verdict, no state change
    assert (verdict.number, verdict.state, verdict.info.summary[:26]) == (ok.number + 1, ok.state,
                                                                          "check v3: FAILED (exit 3, ")
    await store.close()


# Large pin sets: a pin change stores one chunk, compaction bounds the file, old revisions stay readable.

PINS = 100_000


def blob_rows(path: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(path)
    try:
        return {h: bytes(d) for h, d in conn.execute("SELECT hash, data FROM blobs")}
    finally:
        conn.close()


async def seed_pins(store: SQLiteStore, pins: int = PINS) -> dict[str, str]:
    base = parse_document(DOC)
    await store.update(lambda s: changes.apply_document(s, base), actor="a")
    route = base.route("web")
    assert route is not None
    mapping = {f"client-{i:06d}": "v2" for i in range(pins)}
    await store.update(lambda s: changes.put_route(s, dataclasses.replace(route, pins=mapping)), actor="a")
    return mapping


async def test_pin_change_stores_one_chunk_and_one_index(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    pins = await seed_pins(store)
    k = codec.bucket_count(PINS)
    assert k == 256
    before = blob_rows(tmp_path / "s.db")
    assert len(before) == k + 1  # every bucket's chunk and the index
    await store.update(lambda s: changes.pin(s, "web", "acme", "v1"), actor="a")
    added = {h: d for h, d in blob_rows(tmp_path / "s.db").items() if h not in before}
    chunks = {h: d for h, d in added.items() if not d.startswith(codec.INDEX_MAGIC)}
    indexes = {h: d for h, d in added.items() if d.startswith(codec.INDEX_MAGIC)}
    assert (len(chunks), len(indexes)) == (1, 1)
    # The one chunk is acme's bucket, whole; the index names K chunks, 32 bytes each.
    bucket = codec.bucket_of("acme", k)
    expected = {c: v for c, v in {**pins, "acme": "v1"}.items() if codec.bucket_of(c, k) == bucket}
    assert json.loads(next(iter(chunks.values()))) == expected
    assert len(next(iter(indexes.values()))) == len(codec.INDEX_MAGIC) + 32 * k
    await store.update(lambda s: changes.unpin(s, "web", "client-000007"), actor="a")
    after_unpin = blob_rows(tmp_path / "s.db")
    assert len(after_unpin) == len(before) + 4
    # A weight change stores no blob at all.
    await store.update(lambda s: changes.set_split(s, "web", {"v2": 20}), actor="a")
    assert len(blob_rows(tmp_path / "s.db")) == len(after_unpin)
    other = SQLiteStore(tmp_path / "s.db")
    web = (await other.current()).state.route("web")
    assert web is not None
    assert dict(web.pins) == {**{c: v for c, v in pins.items() if c != "client-000007"}, "acme": "v1"}
    await store.close()
    await other.close()


async def test_two_hundred_pin_changes_keep_the_file_bounded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep=50)
    store.gc_every = 16
    seed = await seed_pins(store, 20_000)
    seeded = os.path.getsize(path) + os.path.getsize(f"{path}-wal")
    for i in range(200):  # revision i + 3
        if i % 2 == 0:
            await store.update(lambda s, i=i: changes.pin(s, "web", f"new-{i}", "v1"), actor="a")
        else:
            await store.update(lambda s, i=i: changes.unpin(s, "web", f"client-{i:06d}"), actor="a")
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    # Bound: what seeding stored (pins and WAL) plus 50 kept pin changes of one chunk (~3.5 KB at 20,000
    # pins) and one index (4 KB), with SQLite's page slack: 1 MB (measured: 0.6 MB). Without compaction
    # the file grows by 1.7 MB (every change's chunk and index); before chunking, by ~85 MB.
    assert os.path.getsize(path) < seeded + 1_000_000
    reopened = SQLiteStore(path)
    assert len(await reopened.history(limit=1000)) == 202  # every history line stays
    # Compaction ran at 192 (the last multiple of 16): 192 - 50 = 142 and older lost their state.
    with pytest.raises(NotFoundError, match="revision 142 was compacted"):
        await reopened.get(142)
    # A watcher from the start skips the compacted revisions and reads every kept one.
    numbers = []
    async for rev in reopened.watch(0):
        i = rev.number - 3
        web = rev.state.route("web")
        assert web is not None
        changed = {c for c, _ in web.pins.items() ^ seed.items()}
        assert changed == {f"new-{j}" if j % 2 == 0 else f"client-{j:06d}" for j in range(i + 1)}, rev.number
        numbers.append(rev.number)
        if rev.number == 202:
            break
    assert numbers == list(range(143, 203))
    await reopened.close()


async def test_gc_keeps_every_kept_revision_readable_and_rollback_works(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep=3)
    store.gc_every = 1_000_000  # only the explicit gc() below
    await seed_pins(store, 2_000)
    for i in range(6):
        await store.update(lambda s, i=i: changes.pin(s, "web", f"new-{i}", "v1"), actor="a")
    # Kept: 6, 7, 8. Swept: the indexes of 2..5, and the chunk versions that revisions 3..6 replaced (7 and
    # 8 replaced versions that 6 and 7 still use).
    assert await store.gc() == (5, 8)
    fresh = SQLiteStore(path)
    for n in (6, 7, 8):
        web = (await fresh.get(n)).state.route("web")
        assert web is not None and sorted(c for c in web.pins if c.startswith("new-")) == \
            [f"new-{i}" for i in range(n - 2)]
    with pytest.raises(NotFoundError):
        await fresh.get(5)
    # Roll back to the oldest kept revision: its pins come back; nothing it needs was swept.
    earlier = await fresh.get(6)
    rolled = await fresh.update(lambda s: changes.rollback_route(s, "web", earlier.state, 6), actor="a")
    assert rolled.state.route("web") == earlier.state.route("web")
    reread = SQLiteStore(path)
    assert (await reread.current()).state == rolled.state
    await store.close()
    await fresh.close()
    await reread.close()


async def test_revisions_in_the_old_whole_pins_format_stay_readable(tmp_path: Path) -> None:
    """Before chunking, a manifest referred to one blob holding all of a route's pins."""
    path = tmp_path / "s.db"
    base = parse_document(DOC)
    route = base.route("web")
    assert route is not None
    pins = {f"client-{i:06d}": "v2" for i in range(3_000)}
    old = dataclasses.replace(base, routes=(dataclasses.replace(route, pins=pins), *base.routes[1:]))
    stored = state_to_stored(old)
    blob = json.dumps(pins, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()
    stored["routes"]["web"]["pins"] = {codec.PINS_REF: digest}
    SQLiteStore(path)  # creates the schema
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO blobs (hash, data) VALUES (?, ?)", (digest, blob))
    conn.execute("INSERT INTO revisions VALUES (1, 0, 'a', '', 'old', '[\"web\"]', ?)",
                 (json.dumps(stored, separators=(",", ":")),))
    conn.commit()
    conn.close()

    store = SQLiteStore(path, keep=2)
    store.gc_every = 1_000_000
    assert (await store.current()).state == old
    # A weight change keeps referring to the old blob; a pin change writes the pins as chunks.
    await store.update(lambda s: changes.set_split(s, "web", {"v2": 20}), actor="a")
    assert set(blob_rows(path)) == {digest}
    r3 = await store.update(lambda s: changes.pin(s, "web", "acme", "v1"), actor="a")
    assert len(blob_rows(path)) == 1 + codec.bucket_count(3_001) + 1
    assert (await SQLiteStore(path).get(2)).state.route("web").pins == pins  # type: ignore[union-attr]
    # Compaction keeps the old blob while revision 2 (kept) refers to it, then sweeps it.
    assert await store.gc() == (1, 0)
    assert digest in blob_rows(path)
    await store.update(lambda s: changes.unpin(s, "web", "acme"), actor="a")
    await store.update(lambda s: changes.set_split(s, "web", {"v2": 30}), actor="a")
    compacted, deleted = await store.gc()
    assert compacted == 2 and digest not in blob_rows(path)
    assert deleted == 1 + 2  # the old blob, and r3's chunk + index (revision 4 is back to the 3,000 pins)
    assert (await SQLiteStore(path).get(r3.number + 1)).state.route("web").pins == pins  # type: ignore[union-attr]
    await store.close()
