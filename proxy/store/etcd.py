"""The shared revision store: etcd, so several proxy replicas serve one routing table.

Design rule: a commit is ONE etcd transaction that compares `P/head` with the expected revision number and,
only if it matches, puts the revision, its history line and the new head. Pins blobs are written *before*
that transaction: they are content-addressed, so writing one twice, or leaving one unreferenced after a
lost race, is harmless. This keeps the transaction small however many pins a route has, and no single
request near etcd's size limit (`--max-request-bytes`, 1.5 MiB by default): blobs go in chunks.

Keys under the prefix P (from etcd://host:port/P):
    P/head                  current revision number, decimal
    P/rev/000000000007      info + manifest of revision 7 (the manifest itself is a blob when it is large)
    P/info/000000000007     info only, so history() never reads manifests
    P/blob/<sha256>         {"chunks": n, "size": bytes, "time": written}; written after (or with) its chunks,
                            so it existing means complete
    P/blob/<sha256>/000000  chunk 0 of the blob
    P/meta/<key>            operator metadata (get_meta/set_meta)

Retention: the state of the newest `keep` revisions (KEEP_REVISIONS) is kept. Every GC_EVERY commits the
committing replica deletes older P/rev/ keys (their P/info/ history line stays) and the blobs no kept
revision refers to, once they are BLOB_GRACE old: blobs are written before the commit transaction that
refers to them, so a young unreferenced blob may belong to a commit in flight (which gives up instead of
committing if its blob writes took more than half of BLOB_GRACE).

Availability: every RPC has a short deadline and gRPC reconnects on its own with a short backoff, so while
etcd is down reads and writes raise StoreUnavailableError within RPC_TIMEOUT and work again once it is
back. A replica keeps serving from what its watcher last delivered (`cached`); watchers retry with
backoff and resume where they stopped, re-reading the revisions they missed when etcd compacted the
history their watch would have resumed from. Compaction never loses turnout data (every key above is
written once or holds only its latest value), so run etcd with `--auto-compaction-retention` to bound its
history; etcd's default request limit is enough, no `--max-request-bytes` needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.rtypes
import aetcd.utils

from proxy.errors import NotFoundError, StaleRevisionError, StoreUnavailableError
from proxy.model import State
from proxy.store.base import GENESIS, RecentRevisions, Revision, RevisionInfo, Store, now
from proxy.store.codec import Codec, blob_refs, parse_index

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "turnout"
# Deadline of one RPC. An admin call makes a handful, so an outage answers 503 within seconds, not minutes.
RPC_TIMEOUT = 2.0
# Blob chunk size: well under etcd's default request limit (1.5 MiB) with room for the key and framing.
CHUNK_BYTES = 1024 * 1024
# Manifests (state without pins) above this go into a blob, so the commit transaction stays small.
INLINE_MANIFEST_MAX = 256 * 1024
# Revisions per range read when a watcher catches up: bounds a response to ~PAGE * INLINE_MANIFEST_MAX.
PAGE = 32
# History lines per range read while filtering by route.
HISTORY_PAGE = 256
# Watch retry backoff while etcd is unreachable: first retry soon, then at most every 2 s.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
NUMBER_WIDTH = 12  # zero-padded so key order is number order
# Revisions whose full state is kept (as in the SQLite store); compaction runs every GC_EVERY commits.
KEEP_REVISIONS = 1000
GC_EVERY = 64
# Unreferenced blobs younger than this are kept: a commit writes its blobs before its transaction.
BLOB_GRACE = 3600.0
# Keys per transaction when writing or deleting blobs (etcd refuses more than 128 operations in one).
TXN_OPS = 64

GRPC_OPTIONS: dict[str, Any] = {
    # A catch-up page or a history page can exceed gRPC's default 4 MiB receive limit.
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    # gRPC's default reconnect backoff grows to 2 minutes; a replica must notice etcd is back within seconds.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # Detect a silently dead connection (partition, frozen etcd) under an idle watch. etcd refuses pings
    # more often than every 5 s (--grpc-keepalive-min-time), so 10 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
}


class _CompactedError(Exception):
    """The etcd history a watch wanted to resume from was compacted; re-read instead."""


@contextlib.contextmanager
def map_exceptions(endpoint: str, what: str) -> Iterator[None]:
    """The one place where aetcd/gRPC errors become turnout errors."""
    try:
        yield
    except aetcd.exceptions.RevisionCompactedError as e:
        raise _CompactedError(str(e)) from e
    except aetcd.rpc.AioRpcError as e:
        raise StoreUnavailableError(f"etcd at {endpoint} unavailable ({what}): {e.code().name}: {e.details()}") from e
    except (aetcd.exceptions.ClientError, aetcd.rpc.RpcError, aetcd.rpc.BaseError, TimeoutError, OSError) as e:
        detail = str(e) or type(e).__name__
        raise StoreUnavailableError(f"etcd at {endpoint} unavailable ({what}): {detail}") from e


def _number_key(base: bytes, number: int) -> bytes:
    return base + str(number).zfill(NUMBER_WIDTH).encode()


def _info_to_json(info: RevisionInfo) -> dict[str, Any]:
    return {"number": info.number, "time": info.time, "actor": info.actor, "reason": info.reason,
            "summary": info.summary, "routes": list(info.routes)}


def _info_from_json(d: dict[str, Any]) -> RevisionInfo:
    return RevisionInfo(int(d["number"]), float(d["time"]), str(d["actor"]), str(d["reason"]),
                        str(d["summary"]), tuple(str(r) for r in d["routes"]))


class _BlobNeededError(Exception):
    pass


class EtcdStore(Store):
    gc_every = GC_EVERY
    blob_grace = BLOB_GRACE

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, prefix: str = DEFAULT_PREFIX, *,
                 timeout: float = RPC_TIMEOUT, keep: int = KEEP_REVISIONS) -> None:
        if keep < 1:
            raise ValueError(f"keep: at least 1 revision's state must be kept, got {keep}")
        self.keep = keep
        prefix = prefix.strip("/") or DEFAULT_PREFIX
        self.endpoint = f"{host}:{port}"
        self.url = f"etcd://{self.endpoint}/{prefix}"
        self.timeout = timeout
        base = f"/{prefix}/".encode()
        self._head_key = base + b"head"
        self._rev_base = base + b"rev/"
        self._info_base = base + b"info/"
        self._blob_base = base + b"blob/"
        self._meta_base = base + b"meta/"
        self._client = aetcd.Client(host=host, port=port, timeout=timeout, options=GRPC_OPTIONS)
        self._codec = Codec()
        self._cache: Revision = GENESIS
        self._recent = RecentRevisions()  # old revisions read back: a rollback target is read again and again
        # One commit at a time per process: the codec's "this blob is already stored" knowledge must not be
        # used by a second commit while the first is still writing that blob.
        self._commit_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._watchers = 0
        # Counters shown in repr and asserted by tests: failed watch attempts (each followed by a retry with
        # backoff), and full re-reads because the etcd history to resume from had been compacted.
        self.reconnects = 0
        self.resyncs = 0
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_index: dict[str, list[str]] = {}  # index digest -> chunk digests (immutable, so cacheable)

    @classmethod
    def from_url(cls, url: str) -> EtcdStore:
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.hostname:
            raise ValueError(f"store URL {url!r}: expected etcd://host:port/prefix")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ValueError(f"store URL {url!r}: bad port") from e
        return cls(parts.hostname, port, parts.path.strip("/") or DEFAULT_PREFIX)

    def __repr__(self) -> str:
        return (f"<EtcdStore {self.url} [revision {self._cache.number} | watchers {self._watchers} | "
                f"reconnects {self.reconnects}, resyncs {self.resyncs}]>")

    @property
    def cached(self) -> Revision:
        """The newest revision this process has seen (read, committed or watched); never touches etcd.

        What a replica serves from while etcd is unreachable.
        """
        return self._cache

    def _map(self, what: str) -> contextlib.AbstractContextManager[None]:
        return map_exceptions(self.endpoint, what)

    def _remember(self, rev: Revision) -> Revision:
        if rev.number > self._cache.number:
            self._cache = rev
        return rev

    # raw etcd access (all inside _map)

    async def _range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0,
                     descending: bool = False) -> Any:
        """A Range request with what aetcd does not expose (limit); the response keeps its header."""
        request = aetcd.rpc.RangeRequest(key=key, limit=limit, sort_target=aetcd.rpc.RangeRequest.KEY,
                                         sort_order=(aetcd.rpc.RangeRequest.DESCEND if descending
                                                     else aetcd.rpc.RangeRequest.ASCEND))
        if range_end is not None:
            request.range_end = range_end
        await self._client.connect()
        return await self._client.kvstub.Range(request, timeout=self.timeout, metadata=self._client.metadata)

    async def _get(self, key: bytes, what: str) -> bytes | None:
        with self._map(what):
            got = await self._client.get(key)
        return None if got is None else bytes(got.value)

    async def _head(self) -> tuple[int, int]:
        """-> (current turnout revision number, etcd revision the answer was read at)."""
        with self._map("read head"):
            resp = await self._range(self._head_key)
        number = int(resp.kvs[0].value) if resp.kvs else 0
        return number, int(resp.header.revision)

    # blobs

    def _blob_key(self, digest: str, chunk: int | None = None) -> bytes:
        key = self._blob_base + digest.encode()
        return key if chunk is None else key + b"/" + str(chunk).zfill(6).encode()

    async def _write_blobs(self, blobs: dict[str, bytes]) -> None:
        """Write (or rewrite, which refreshes its time for the grace period) every blob, a few per transaction.

        A pin change writes one chunk and one index: one transaction. A blob's head follows its chunks, in
        the same transaction or a later one."""
        written = now()
        puts: list[tuple[bytes, bytes]] = []
        for digest, data in blobs.items():
            chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            puts.extend((self._blob_key(digest, i), chunk) for i, chunk in enumerate(chunks))
            puts.append((self._blob_key(digest),
                         json.dumps({"chunks": len(chunks), "size": len(data), "time": written}).encode()))
        tx = self._client.transactions
        batch: list[Any] = []
        size = 0
        with self._map("write blob"):
            for key, value in puts:
                if batch and (len(batch) >= TXN_OPS or size + len(value) > CHUNK_BYTES):
                    await self._client.transaction(compare=[], success=batch, failure=[])
                    batch, size = [], 0
                batch.append(tx.put(key, value))
                size += len(key) + len(value)
            if batch:
                await self._client.transaction(compare=[], success=batch, failure=[])

    async def _read_blob(self, digest: str) -> bytes | None:
        head = await self._get(self._blob_key(digest), "read blob")
        if head is None:
            return None
        parts = []
        for i in range(int(json.loads(head)["chunks"])):
            chunk = await self._get(self._blob_key(digest, i), "read blob")
            if chunk is None:
                return None
            parts.append(chunk)
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"pins blob {digest} is corrupt in etcd")
        return data

    # decoding revisions

    async def _decode(self, d: dict[str, Any], codec: Codec, remember: bool = True) -> Revision:
        info = _info_from_json(d)
        manifest = d.get("manifest")
        if manifest is None:
            data = await self._read_blob(str(d["manifest_blob"]))
            if data is None:
                raise ValueError(f"revision {info.number} refers to missing manifest blob {d['manifest_blob']}")
            manifest = data.decode()
        # The codec loads blobs synchronously, in batches, and only those it has not cached (usually none
        # for a weight change, an index and one chunk for a pin change). Ask it, fetch the batch it
        # missed, and ask again: a round for the index blobs, one for the chunks they name.
        fetched: dict[str, bytes | None] = {}
        missing: list[str] = []

        def load(digests: list[str]) -> dict[str, bytes | None]:
            missing[:] = [d for d in digests if d not in fetched]
            if missing:
                raise _BlobNeededError
            return {d: fetched[d] for d in digests}

        while True:
            try:
                state = codec.decode(manifest, load, remember)
                return Revision(info, state)
            except _BlobNeededError:
                batch = list(missing)
                for i in range(0, len(batch), PAGE):
                    part = batch[i:i + PAGE]
                    fetched.update(zip(part, await asyncio.gather(*(self._read_blob(d) for d in part)),
                                       strict=True))

    async def _from_record(self, d: dict[str, Any]) -> Revision:
        """Decode with the shared codec (consecutive revisions share pins) unless it is the cached one."""
        if int(d["number"]) == self._cache.number:
            return self._cache
        return self._remember(await self._decode(d, self._codec))

    # reads

    async def current(self) -> Revision:
        number, _ = await self._head()
        if number == self._cache.number:
            return self._cache
        record = await self._get(_number_key(self._rev_base, number), "read revision")
        if record is None:
            raise StoreUnavailableError(f"etcd at {self.endpoint}: head names revision {number}, which is missing")
        return await self._from_record(json.loads(record))

    async def get(self, number: int) -> Revision:
        if number == 0:
            return GENESIS
        if number == self._cache.number:
            return self._cache
        recent = self._recent.get(number)
        if recent is not None:
            return recent
        record = await self._get(_number_key(self._rev_base, number), "read revision")
        if record is None:
            if await self._get(_number_key(self._info_base, number), "read history") is not None:
                raise NotFoundError(f"revision {number} was compacted: only the newest revisions' states are "
                                    "kept (its history line remains)")
            raise NotFoundError(f"no revision {number}")
        # remember=False: decoding an old revision reuses, but must not evict, the current one's cached pins.
        rev = await self._decode(json.loads(record), self._codec, remember=False)
        self._recent.put(number, rev)
        return rev

    async def history(self, route: str | None = None, limit: int = 50,
                      before: int | None = None) -> list[RevisionInfo]:
        out: list[RevisionInfo] = []
        if limit <= 0 or (before is not None and before <= 1):
            return out
        end = (_number_key(self._info_base, before) if before is not None
               else aetcd.utils.prefix_range_end(self._info_base))
        page = limit if route is None else max(limit, HISTORY_PAGE)
        while len(out) < limit:
            with self._map("read history"):
                resp = await self._range(self._info_base, end, limit=page, descending=True)
            for kv in resp.kvs:
                info = _info_from_json(json.loads(kv.value))
                if route is None or route in info.routes:
                    out.append(info)
            if not resp.more or not resp.kvs:
                break
            end = bytes(resp.kvs[-1].key)  # range_end is exclusive: the next page starts below it
        return out[:limit]

    async def get_meta(self, key: str) -> str | None:
        value = await self._get(self._meta_base + key.encode(), "read meta")
        return None if value is None else value.decode()

    async def set_meta(self, key: str, value: str) -> None:
        with self._map("write meta"):
            await self._client.put(self._meta_base + key.encode(), value.encode())

    # writes

    async def commit(self, state: State, *, expected: int, actor: str, reason: str, summary: str,
                     routes: tuple[str, ...]) -> Revision:
        async with self._commit_lock:
            info = RevisionInfo(expected + 1, now(), actor, reason, summary, routes)
            try:
                succeeded, current = await self._commit(state, expected, info)
            except BaseException:
                # The codec now believes the blobs it just hashed are stored; after a failed write that may
                # be false, so start over and let the next commit check (and write) them again.
                self._codec = Codec()
                raise
        if not succeeded:
            raise StaleRevisionError(expected, current)
        if info.number % self.gc_every == 0 and (self._gc_task is None or self._gc_task.done()):
            # In the background: the commit is acknowledged now, compaction reads every kept revision.
            self._gc_task = asyncio.create_task(self._gc_quietly())
        return self._remember(Revision(info, state))

    async def _commit(self, state: State, expected: int, info: RevisionInfo) -> tuple[bool, int]:
        started = time.monotonic()
        manifest, blobs = self._codec.encode(state)
        record = _info_to_json(info)
        manifest_bytes = manifest.encode()
        if len(manifest_bytes) > INLINE_MANIFEST_MAX:
            digest = hashlib.sha256(manifest_bytes).hexdigest()
            blobs[digest] = manifest_bytes
            record["manifest_blob"] = digest
        else:
            record["manifest"] = manifest
        await self._write_blobs(blobs)
        if time.monotonic() - started > self.blob_grace / 2:
            # Compaction may already count these blobs as garbage; committing could refer to deleted ones.
            raise StoreUnavailableError(f"etcd at {self.endpoint}: writing the revision's blobs took too long")
        tx = self._client.transactions
        head_matches = (tx.value(self._head_key) == str(expected).encode() if expected
                        else tx.version(self._head_key) == 0)
        with self._map("commit"):
            succeeded, responses = await self._client.transaction(
                compare=[head_matches],
                success=[
                    tx.put(_number_key(self._rev_base, info.number), json.dumps(record).encode()),
                    tx.put(_number_key(self._info_base, info.number), json.dumps(_info_to_json(info)).encode()),
                    tx.put(self._head_key, str(info.number).encode()),
                ],
                failure=[tx.get(self._head_key)],
            )
        if succeeded:
            return True, info.number
        # On failure the one response is the range read of the head: [(value, Get)], empty when absent.
        head = responses[0] if responses else []
        return False, int(head[0][0]) if head else 0

    # watch

    async def watch(self, after: int) -> AsyncIterator[Revision]:
        self._watchers += 1
        try:
            async for rev in self._watch(after):
                yield rev
        finally:
            self._watchers -= 1

    async def _watch(self, after: int) -> AsyncIterator[Revision]:
        seen = after
        # etcd revision up to which every change under P/rev/ has been delivered; None: catch up by reading.
        etcd_rev: int | None = None
        delay = BACKOFF_MIN
        failing = False  # log an outage once when it starts and once when it ends, not every retry
        while not self._closing.is_set():
            try:
                if etcd_rev is None:
                    head, read_at = await self._head()
                    while seen < head:
                        for record in await self._read_records(seen + 1, head):
                            rev = await self._from_record(json.loads(record))
                            yield rev
                            seen = rev.number
                    etcd_rev = read_at
                async with contextlib.aclosing(self._watch_records(etcd_rev + 1)) as records:
                    async for item in records:
                        if item is None:  # the stream is established
                            if failing:
                                log.warning("etcd watch on %s is back, at revision %d", self.url, seen)
                                failing = False
                            delay = BACKOFF_MIN
                            continue
                        record, mod_revision = item
                        d = json.loads(record)
                        number = int(d["number"])
                        if number > seen + 1:
                            etcd_rev = None  # a gap cannot happen with one head, but re-reading is always safe
                            break
                        if number == seen + 1:
                            rev = await self._from_record(d)
                            yield rev
                            seen = rev.number
                        etcd_rev = mod_revision
            except _CompactedError:
                self.resyncs += 1
                etcd_rev = None
            except StoreUnavailableError as e:
                self.reconnects += 1
                if not failing:
                    log.warning("%s; still at revision %d, retrying", e, seen)
                    failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _read_records(self, first: int, last: int) -> list[bytes]:
        with self._map("read revisions"):
            resp = await self._range(_number_key(self._rev_base, first),
                                     _number_key(self._rev_base, last + 1), limit=PAGE)
        if not resp.kvs:
            raise StoreUnavailableError(f"etcd at {self.endpoint}: revision {first} is missing")
        return [bytes(kv.value) for kv in resp.kvs]

    async def _watch_records(self, start_revision: int) -> AsyncGenerator[tuple[bytes, int] | None, None]:
        """None once the watch is established, then (record, etcd mod_revision) per revision put."""
        with self._map("watch"):
            watch = await self._client.watch(self._rev_base, range_end=aetcd.utils.prefix_range_end(self._rev_base),
                                             start_revision=start_revision, kind=aetcd.rtypes.EventKind.PUT)
        try:
            yield None
            with self._map("watch"):
                async for event in watch:
                    yield bytes(event.kv.value), int(event.kv.mod_revision)
            if not self._closing.is_set():
                # aetcd ends the iteration quietly when its stream is shut down; resume like after an error.
                raise StoreUnavailableError(f"etcd at {self.endpoint}: watch stream ended")
        finally:
            # Best effort: on a broken stream the server side is gone already.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), self.timeout)

    # retention

    async def _gc_quietly(self) -> None:
        try:
            await self.gc()
        except (StoreUnavailableError, ValueError) as e:
            log.warning("etcd store %s: compaction failed, retried after the next %d commits: %s",
                        self.url, self.gc_every, e)

    async def gc(self) -> tuple[int, int]:
        """Compact now (normally every GC_EVERY commits): -> (revisions compacted, blobs deleted)."""
        head, _ = await self._head()
        cutoff = head - self.keep
        compacted = 0
        if cutoff > 0:
            with self._map("compact"):
                deleted = await self._client.delete_range(_number_key(self._rev_base, 0),
                                                          _number_key(self._rev_base, cutoff + 1))
            compacted = int(deleted.deleted)
        live: set[str] = set()
        indexes: set[str] = set()
        start = _number_key(self._rev_base, max(cutoff + 1, 0))
        end = aetcd.utils.prefix_range_end(self._rev_base)
        while True:
            with self._map("read revisions"):
                resp = await self._range(start, end, limit=PAGE)
            for kv in resp.kvs:
                d = json.loads(kv.value)
                manifest = d.get("manifest")
                if manifest is None:
                    live.add(str(d["manifest_blob"]))
                    data = await self._read_blob(str(d["manifest_blob"]))
                    if data is None:
                        raise ValueError(f"revision {d['number']} refers to missing manifest blob")
                    manifest = data.decode()
                idx, whole = blob_refs(manifest)
                indexes |= idx
                live |= whole
            if not resp.more or not resp.kvs:
                break
            start = bytes(resp.kvs[-1].key) + b"\0"
        for digest in indexes:
            chunks = self._gc_index.get(digest)
            if chunks is None:
                data = await self._read_blob(digest)
                if data is None:
                    raise ValueError(f"pins index blob {digest} is missing")
                chunks = parse_index(data)
            self._gc_index[digest] = chunks
            live.add(digest)
            live.update(chunks)
        self._gc_index = {d: c for d, c in self._gc_index.items() if d in indexes}
        with self._map("list blobs"):
            request = aetcd.rpc.RangeRequest(key=self._blob_base, range_end=aetcd.utils.prefix_range_end(
                self._blob_base), keys_only=True)
            await self._client.connect()
            listing = await self._client.kvstub.Range(request, timeout=self.timeout, metadata=self._client.metadata)
        heads = {bytes(kv.key)[len(self._blob_base):].decode() for kv in listing.kvs}
        old = now() - self.blob_grace
        doomed: list[tuple[str, int]] = []
        for digest in sorted(h for h in heads if "/" not in h and h not in live):
            with self._map("read blob"):
                got = await self._range(self._blob_key(digest))
            if got.kvs and float(json.loads(got.kvs[0].value).get("time", 0.0)) <= old:
                doomed.append((digest, int(got.kvs[0].mod_revision)))
        removed = 0
        tx = self._client.transactions
        for i in range(0, len(doomed), TXN_OPS):
            part = doomed[i:i + TXN_OPS]
            with self._map("delete blobs"):
                # Each head unchanged since it was read: a commit that rewrote a blob meanwhile keeps it.
                ok, _ = await self._client.transaction(
                    compare=[tx.mod(self._blob_key(d)) == mod for d, mod in part],
                    success=[tx.delete(self._blob_key(d), aetcd.utils.prefix_range_end(self._blob_key(d)))
                             for d, _ in part],
                    failure=[])
            removed += len(part) if ok else 0
        return compacted, removed

    async def close(self) -> None:
        self._closing.set()
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._gc_task
        # Best effort and bounded: closing must not hang a shutdown while etcd is unreachable.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.close(), self.timeout)
