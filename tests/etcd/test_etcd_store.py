"""etcd revision store against a real etcd: revisions, history, CAS between replicas, watch, large pins, outages."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
from collections.abc import AsyncIterator, Callable

import aetcd
import pytest

from proxy import changes
from proxy.errors import NotFoundError, StaleRevisionError, StoreUnavailableError
from proxy.model import State
from proxy.parse import parse_document
from proxy.store import GENESIS, Revision, codec, open_store
from proxy.store import etcd as etcd_module
from proxy.store.etcd import EtcdStore

from .etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.etcd

DOC = {
    "versions": {"v1": {"endpoints": ["http://127.0.0.1:9101"]}, "v2": {"endpoints": ["http://127.0.0.1:9102"]}},
    "routes": [{"name": "web", "split": {"v1": 90, "v2": 10}}, {"name": "api", "split": {"v1": 1}}],
}
BASE = parse_document(DOC)
# Upper bound for anything that could hang if the store misbehaved; not a speed assertion.
GUARD = 30.0


def split_of(state: State, route: str) -> tuple[tuple[str, float], ...]:
    r = state.route(route)
    assert r is not None
    return r.split


def web_split(v2: float) -> Callable[[State], changes.Change]:
    return lambda s: changes.set_split(s, "web", {"v1": 100 - v2, "v2": v2})


async def collect(it: AsyncIterator[Revision], last: int, into: list[Revision]) -> None:
    async for rev in it:
        into.append(rev)
        if rev.number >= last:
            return


async def raw_client(server: EtcdServer) -> aetcd.Client:
    client = aetcd.Client(host="127.0.0.1", port=server.client_port, timeout=5)
    await client.connect()
    return client


async def test_from_url_and_open_store(etcd_url: str) -> None:
    store = open_store(etcd_url)
    assert isinstance(store, EtcdStore)
    assert store.url == etcd_url
    assert repr(store) == f"<EtcdStore {etcd_url} [revision 0 | watchers 0 | reconnects 0, resyncs 0]>"
    await store.close()
    default = EtcdStore.from_url("etcd://127.0.0.1")
    assert default.url == "etcd://127.0.0.1:2379/turnout"
    await default.close()
    with pytest.raises(ValueError, match="expected etcd://host:port/prefix"):
        EtcdStore.from_url("etcd:///nohost")


async def test_revisions_history_get_and_meta(etcd_url: str) -> None:
    store = EtcdStore.from_url(etcd_url)
    assert await store.current() == GENESIS
    assert await store.history() == []
    r1 = await store.update(lambda s: changes.apply_document(s, BASE), actor="alice", reason="initial")
    r2 = await store.update(web_split(50), actor="bob", reason="canary")
    r3 = await store.update(lambda s: changes.set_split(s, "api", {"v2": 1}), actor="bob", reason="api too")
    assert (r1.number, r2.number, r3.number) == (1, 2, 3)
    assert r2.info.summary == "split web: v1=90 v2=10 -> v1=50 v2=50"
    # A no-op writes no revision.
    assert (await store.update(lambda s: changes.set_split(s, "api", {"v2": 1}), actor="x")).number == 3

    assert [h.number for h in await store.history()] == [3, 2, 1]
    assert [h.number for h in await store.history(route="web")] == [2, 1]
    assert [h.number for h in await store.history(limit=1, before=3)] == [2]
    assert await store.history(before=1) == []
    assert (await store.history(limit=1))[0] == r3.info

    # A second store (another replica) reads exactly what the first wrote.
    other = EtcdStore.from_url(etcd_url)
    cur = await other.current()
    assert cur.info == r3.info and cur.state == r3.state
    old = await other.get(1)
    assert old.info == r1.info and split_of(old.state, "web") == (("v1", 90.0), ("v2", 10.0))
    assert await other.get(0) == GENESIS
    with pytest.raises(NotFoundError):
        await other.get(99)

    assert await store.get_meta("token-hash") is None
    await store.set_meta("token-hash", "abc")
    await store.set_meta("token-hash", "def")
    assert await other.get_meta("token-hash") == "def"
    await store.close()
    await other.close()


async def test_history_pages_when_filtering(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_module, "HISTORY_PAGE", 3)
    store = EtcdStore.from_url(etcd_url)
    await store.update(lambda s: changes.apply_document(s, BASE), actor="a")
    for i in range(1, 9):
        route = "web" if i % 4 == 0 else "api"
        await store.update(lambda s, i=i, route=route: changes.set_split(s, route, {"v1": 100 - i, "v2": i}), actor="a")
    assert [h.number for h in await store.history(route="web", limit=3)] == [9, 5, 1]
    assert [h.number for h in await store.history(route="web", limit=2, before=9)] == [5, 1]
    assert [h.number for h in await store.history(route="api", limit=20)] == [8, 7, 6, 4, 3, 2, 1]
    await store.close()


async def test_compare_and_swap_between_replicas(etcd_url: str) -> None:
    a, b = EtcdStore.from_url(etcd_url), EtcdStore.from_url(etcd_url)
    r1 = await a.update(lambda s: changes.apply_document(s, BASE), actor="a")
    # Two writers commit from the same revision at the same time: exactly one wins.
    results = await asyncio.gather(
        a.commit(changes.set_split(r1.state, "web", {"v2": 20})[0], expected=1, actor="a", reason="", summary="a",
                 routes=("web",)),
        b.commit(changes.set_split(r1.state, "web", {"v2": 30})[0], expected=1, actor="b", reason="", summary="b",
                 routes=("web",)),
        return_exceptions=True)
    wins = [r for r in results if isinstance(r, Revision)]
    losses = [r for r in results if isinstance(r, StaleRevisionError)]
    assert len(wins) == 1 and len(losses) == 1
    assert (losses[0].expected, losses[0].current) == (1, 2)
    assert wins[0].number == 2
    assert (await b.current()).state == wins[0].state
    assert [h.number for h in await a.history()] == [2, 1]

    # The If-Match path: a stale expected revision is refused and nothing is written.
    with pytest.raises(StaleRevisionError) as e:
        await b.update(web_split(40), actor="b", expected=1)
    assert (e.value.expected, e.value.current) == (1, 2)
    # Without expected, update re-applies the intent to the newer state.
    r3 = await b.update(web_split(40), actor="b")
    assert r3.number == 3 and split_of((await a.current()).state, "web") == (("v1", 60.0), ("v2", 40.0))
    await a.close()
    await b.close()


async def test_concurrent_updates_lose_nothing(etcd_url: str) -> None:
    stores = [EtcdStore.from_url(etcd_url) for _ in range(3)]
    await stores[0].update(lambda s: changes.apply_document(s, BASE), actor="seed")

    async def pin_many(store: EtcdStore, who: int) -> None:
        for i in range(5):
            await store.update(lambda s, who=who, i=i: changes.pin(s, "web", f"c{who}-{i}", "v2"), actor=f"w{who}")

    await asyncio.wait_for(asyncio.gather(*(pin_many(s, w) for w, s in enumerate(stores))), GUARD)
    cur = await stores[1].current()
    assert cur.number == 16
    web = cur.state.route("web")
    assert web is not None and sorted(web.pins) == sorted(f"c{w}-{i}" for w in range(3) for i in range(5))
    for s in stores:
        await s.close()


async def test_watch_delivers_another_replicas_commits_in_order(etcd_url: str) -> None:
    writer, reader = EtcdStore.from_url(etcd_url), EtcdStore.from_url(etcd_url)
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    got: list[Revision] = []
    # Start behind: revision 1 comes from the catch-up read, 2..6 from the watch stream.
    task = asyncio.create_task(collect(reader.watch(0), 6, got))
    written = [await writer.update(web_split(v2), actor="a") for v2 in (20, 30, 40, 50, 60)]
    await asyncio.wait_for(task, GUARD)
    assert [r.number for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r.info for r in got[1:]] == [w.info for w in written]
    assert [r.state for r in got[1:]] == [w.state for w in written]
    assert reader.cached.number == 6
    # A watch from the newest revision delivers only what comes next.
    later: list[Revision] = []
    task = asyncio.create_task(collect(reader.watch(6), 7, later))
    await writer.update(web_split(70), actor="a")
    await asyncio.wait_for(task, GUARD)
    assert [r.number for r in later] == [7]
    await writer.close()
    await reader.close()


async def blob_keys(server: EtcdServer, url: str) -> list[str]:
    client = await raw_client(server)
    prefix = "/" + url.rsplit("/", 1)[1]
    keys = sorted(kv.key.decode()[len(f"{prefix}/blob/"):]
                  for kv in await client.get_prefix(f"{prefix}/blob/".encode(), keys_only=True))
    await client.close()
    return keys


async def test_hundred_thousand_pins_round_trip_stored_once(etcd_server: EtcdServer, etcd_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_module, "CHUNK_BYTES", 4096)  # so a pins chunk (~9 KB) spans several keys
    writer, reader = EtcdStore.from_url(etcd_url), EtcdStore.from_url(etcd_url)
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    route = BASE.route("web")
    assert route is not None
    pins = {f"client-{i:06d}": "v2" for i in range(100_000)}
    got: list[Revision] = []
    task = asyncio.create_task(collect(reader.watch(1), 4, got))
    await writer.update(lambda s: changes.put_route(s, dataclasses.replace(route, pins=pins)), actor="a")
    await writer.update(web_split(20), actor="a")
    await writer.update(web_split(30), actor="a")
    await asyncio.wait_for(task, GUARD)
    assert [r.number for r in got] == [2, 3, 4]
    for r in got:
        web = r.state.route("web")
        assert web is not None and dict(web.pins) == pins
    fresh = EtcdStore.from_url(etcd_url)
    web = (await fresh.current()).state.route("web")
    assert web is not None and dict(web.pins) == pins

    # One set of blobs for three revisions that all carry the pins: 256 chunks and their index, each blob
    # a head key and ceil(size / CHUNK_BYTES) chunk keys.
    k = codec.bucket_count(len(pins))
    buckets: list[dict[str, str]] = [{} for _ in range(k)]
    for c, v in pins.items():
        buckets[codec.bucket_of(c, k)][c] = v
    sizes = [len(codec.chunk_bytes(b)) for b in buckets] + [len(codec.INDEX_MAGIC) + 32 * k]
    keys = await blob_keys(etcd_server, etcd_url)
    assert len([key for key in keys if "/" not in key]) == k + 1
    assert len(keys) == k + 1 + sum(math.ceil(size / 4096) for size in sizes)
    for s in (writer, reader, fresh):
        await s.close()


async def test_pin_change_writes_one_chunk_and_one_index(etcd_server: EtcdServer, etcd_url: str) -> None:
    writer = EtcdStore.from_url(etcd_url)
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    route = BASE.route("web")
    assert route is not None
    pins = {f"client-{i:06d}": "v2" for i in range(100_000)}
    await writer.update(lambda s: changes.put_route(s, dataclasses.replace(route, pins=pins)), actor="a")
    before = set(await blob_keys(etcd_server, etcd_url))
    await writer.update(lambda s: changes.pin(s, "web", "acme", "v1"), actor="a")
    added = sorted(set(await blob_keys(etcd_server, etcd_url)) - before)
    # Two blobs (acme's bucket and the index), each a head and one chunk key.
    assert len(added) == 4 and len([key for key in added if "/" not in key]) == 2
    reader = EtcdStore.from_url(etcd_url)
    web = (await reader.current()).state.route("web")
    assert web is not None and dict(web.pins) == {**pins, "acme": "v1"}
    await writer.close()
    await reader.close()


async def test_compaction_keeps_the_newest_states_and_sweeps_old_blobs(etcd_server: EtcdServer,
                                                                       etcd_url: str) -> None:
    writer = EtcdStore.from_url(etcd_url)
    writer.keep, writer.gc_every = 3, 1_000_000  # only the explicit gc() calls below
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    route = BASE.route("web")
    assert route is not None
    pins = {f"client-{i:06d}": "v2" for i in range(2_000)}
    await writer.update(lambda s: changes.put_route(s, dataclasses.replace(route, pins=pins)), actor="a")
    for i in range(6):
        await writer.update(lambda s, i=i: changes.pin(s, "web", f"new-{i}", "v1"), actor="a")
    # Within the grace period nothing is swept, however unreferenced.
    blobs = len([k for k in await blob_keys(etcd_server, etcd_url) if "/" not in k])
    assert await writer.gc() == (5, 0)
    assert len([k for k in await blob_keys(etcd_server, etcd_url) if "/" not in k]) == blobs
    # Past it: the indexes of 2..5 and the chunk versions revisions 3..6 replaced (as in the SQLite test).
    writer.blob_grace = 0.0
    assert await writer.gc() == (0, 8)
    reader = EtcdStore.from_url(etcd_url)
    for n in (6, 7, 8):
        web = (await reader.get(n)).state.route("web")
        assert web is not None and sorted(c for c in web.pins if c.startswith("new-")) == \
            [f"new-{i}" for i in range(n - 2)]
    with pytest.raises(NotFoundError, match="revision 5 was compacted"):
        await reader.get(5)
    assert [h.number for h in await reader.history(limit=20)] == list(range(8, 0, -1))
    # A watcher from the start skips what was compacted.
    got: list[Revision] = []
    await asyncio.wait_for(collect(reader.watch(0), 8, got), GUARD)
    assert [r.number for r in got] == [6, 7, 8]
    earlier = await reader.get(6)
    rolled = await reader.update(lambda s: changes.rollback_route(s, "web", earlier.state, 6), actor="a")
    fresh = EtcdStore.from_url(etcd_url)
    assert (await fresh.current()).state == rolled.state
    for s in (writer, reader, fresh):
        await s.close()


async def test_outage_refuses_writes_then_recovers_and_watch_catches_up(own_etcd: EtcdServer) -> None:
    url = own_etcd.url("turnout")
    writer, reader = EtcdStore.from_url(url), EtcdStore.from_url(url)
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    arrivals: asyncio.Queue[Revision] = asyncio.Queue()

    async def follow() -> None:
        async for rev in reader.watch(0):
            arrivals.put_nowait(rev)

    task = asyncio.create_task(follow())
    await writer.update(web_split(20), actor="a")
    got = [await asyncio.wait_for(arrivals.get(), GUARD) for _ in range(2)]
    assert [r.number for r in got] == [1, 2]

    await asyncio.to_thread(own_etcd.stop, signal.SIGKILL)  # a crash: only what etcd fsynced survives
    # Writes and fresh reads fail with 503 promptly (wait_for only guards against a hang).
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(writer.update(web_split(30), actor="a"), GUARD)
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(writer.set_meta("k", "v"), GUARD)
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(reader.current(), GUARD)
    # What a replica serves from meanwhile: the last revision its watcher delivered.
    assert reader.cached.number == 2 and split_of(reader.cached.state, "web") == (("v1", 80.0), ("v2", 20.0))
    await asyncio.sleep(0.5)  # let the watcher fail and retry a few times

    await asyncio.to_thread(own_etcd.start)
    async with asyncio.timeout(GUARD):
        while True:
            try:
                r3 = await writer.update(web_split(30), actor="a")
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.1)
    r4 = await writer.update(web_split(40), actor="a")
    got += [await asyncio.wait_for(arrivals.get(), GUARD) for _ in range(2)]
    assert [r.number for r in got] == [1, 2, 3, 4]
    assert [r.info for r in got[2:]] == [r3.info, r4.info]
    assert arrivals.empty()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert reader.reconnects >= 1
    assert (await reader.current()).info == r4.info
    await writer.close()
    await reader.close()


async def test_watch_resumes_after_compaction_with_a_full_re_read(own_etcd: EtcdServer) -> None:
    url = own_etcd.url("turnout")
    writer, reader = EtcdStore.from_url(url), EtcdStore.from_url(url)
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    watch = reader.watch(0)
    first = await asyncio.wait_for(anext(watch), GUARD)
    assert first.number == 1
    # While the consumer holds revision 1, etcd goes away (the watch stream breaks), comes back, takes three
    # revisions and compacts its history past them: resuming the stream from where it stood is impossible.
    await asyncio.to_thread(own_etcd.stop)
    await asyncio.to_thread(own_etcd.start)
    async with asyncio.timeout(GUARD):
        while True:
            try:
                await writer.update(web_split(20), actor="a")
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.1)
    await writer.update(web_split(30), actor="a")
    r4 = await writer.update(web_split(40), actor="a")
    client = await raw_client(own_etcd)
    head = await client.get(b"/turnout/head")
    assert head is not None
    await client.compact(head.header.revision, physical=True)
    await client.close()

    rest = [await asyncio.wait_for(anext(watch), GUARD) for _ in range(3)]
    assert [r.number for r in rest] == [2, 3, 4]
    assert rest[-1].state == r4.state
    assert reader.resyncs == 1
    await watch.aclose()
    await writer.close()
    await reader.close()


async def test_large_manifest_goes_to_a_blob(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_module, "INLINE_MANIFEST_MAX", 64)
    writer, reader = EtcdStore.from_url(etcd_url), EtcdStore.from_url(etcd_url)
    got: list[Revision] = []
    task = asyncio.create_task(collect(reader.watch(0), 2, got))
    await writer.update(lambda s: changes.apply_document(s, BASE), actor="a")
    r2 = await writer.update(web_split(25), actor="a")
    await asyncio.wait_for(task, GUARD)
    assert [r.state for r in got] == [BASE, r2.state]
    assert (await EtcdStore.from_url(etcd_url).current()).state == r2.state
    await writer.close()
    await reader.close()


async def test_close_ends_an_active_watch(etcd_url: str) -> None:
    store = EtcdStore.from_url(etcd_url)
    await store.update(lambda s: changes.apply_document(s, BASE), actor="a")
    watch = store.watch(0)
    assert (await asyncio.wait_for(anext(watch), GUARD)).number == 1
    got: list[Revision] = []
    task = asyncio.create_task(collect(watch, 99, got))
    await asyncio.sleep(0.1)  # the task is now waiting on the etcd watch stream
    assert repr(store).endswith("[revision 1 | watchers 1 | reconnects 0, resyncs 0]>")
    await store.close()
    await asyncio.wait_for(task, GUARD)
    assert got == []
    assert repr(store).endswith("[revision 1 | watchers 0 | reconnects 0, resyncs 0]>")


async def test_unreachable_etcd_raises_store_unavailable_and_watch_keeps_retrying() -> None:
    store = EtcdStore("127.0.0.1", free_port(), "nothing-here")
    for call in (store.current(), store.get(3), store.history(), store.get_meta("k"), store.set_meta("k", "v"),
                 store.update(lambda s: changes.apply_document(s, BASE), actor="a")):
        with pytest.raises(StoreUnavailableError, match=r"^etcd at 127\.0\.0\.1:\d+ unavailable \("):
            await asyncio.wait_for(call, GUARD)
    got: list[Revision] = []
    task = asyncio.create_task(collect(store.watch(0), 1, got))
    await asyncio.sleep(0.5)
    assert not task.done() and store.reconnects >= 2  # retrying with backoff, not failing its consumer
    await store.close()
    await asyncio.wait_for(task, GUARD)
    assert got == [] and store.cached == GENESIS
