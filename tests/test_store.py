"""SQLite revision store: revisions, history, read-back, compare-and-swap, crash safety, restart rule."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from proxy import ops
from proxy.errors import ConflictError, NotFoundError, StaleRevisionError, ValidationError
from proxy.parse import parse_document
from proxy.server import seed_from_file
from proxy.store import SQLiteStore

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
    r1 = await store.update(lambda s: ops.apply_document(s, base), actor="alice", reason="initial")
    r2 = await store.update(lambda s: ops.set_split(s, "web", {"v1": 50, "v2": 50}), actor="bob", reason="canary")
    r3 = await store.update(lambda s: ops.set_split(s, "api", {"v2": 1}), actor="bob", reason="api too")
    assert (r1.number, r2.number, r3.number) == (1, 2, 3)
    assert r2.info.actor == "bob" and r2.info.reason == "canary"
    assert r2.info.summary == "split web: v1=90 v2=10 -> v1=50 v2=50"
    # A no-op writes no revision.
    assert (await store.update(lambda s: ops.set_split(s, "api", {"v2": 1}), actor="x")).number == 3
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
    await a.update(lambda s: ops.apply_document(s, base), actor="a")
    await a.update(lambda s: ops.set_split(s, "web", {"v2": 20}), actor="a", expected=1)
    with pytest.raises(StaleRevisionError) as e:
        await b.update(lambda s: ops.set_split(s, "web", {"v2": 30}), actor="b", expected=1)
    assert (e.value.expected, e.value.current) == (1, 2)
    assert (await b.current()).state.route("web").split == (("v1", 90.0), ("v2", 20.0))  # type: ignore[union-attr]
    await a.close()
    await b.close()


async def test_large_pin_sets_are_stored_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    base = parse_document(DOC)
    await store.update(lambda s: ops.apply_document(s, base), actor="a")
    route = base.route("web")
    assert route is not None
    import dataclasses

    pinned = dataclasses.replace(route, pins={f"client-{i}": "v2" for i in range(100_000)})
    await store.update(lambda s: ops.put_route(s, pinned), actor="a")
    for w in range(5):
        await store.update(lambda s, w=w: ops.set_split(s, "web", {"v2": 11 + w}), actor="a")
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
    await writer.update(lambda s: ops.apply_document(s, base), actor="a")
    await writer.update(lambda s: ops.set_split(s, "web", {"v2": 20}), actor="a")
    await writer.update(lambda s: ops.set_split(s, "web", {"v2": 30}), actor="a")
    await asyncio.wait_for(task, 5)
    assert got == [1, 2, 3]
    await writer.close()
    await reader.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from proxy import ops
    from proxy.parse import parse_document
    from proxy.store import SQLiteStore
    DOC = {"versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]},
                        "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
           "routes": [{"name": "web", "split": {"v1": 1, "v2": 1}}]}
    async def main():
        store = SQLiteStore(sys.argv[1])
        if (await store.current()).number == 0:
            base = parse_document(DOC)
            await store.update(lambda s: ops.apply_document(s, base), actor="w")
        while True:
            cur = await store.current()
            n = cur.number + 1
            rev = await store.commit(ops.set_split(cur.state, "web", {"v2": n})[0], expected=cur.number,
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


async def test_restart_rule_keeps_live_changes(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_YAML)
    store = SQLiteStore(tmp_path / "s.db")
    r1 = await seed_from_file(store, str(routes))
    assert r1.number == 1 and r1.info.reason == "seed from route file"
    live = await store.update(lambda s: ops.set_split(s, "web", {"v2": 50}), actor="op")
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
