"""The embedded revision store: one SQLite file in WAL mode.

Durability: `synchronous=FULL` with WAL means a commit is on disk before `commit()` returns, so a write
acknowledged to an operator survives kill -9 (and power loss). Compare-and-swap runs inside
`BEGIN IMMEDIATE`, which takes SQLite's write lock, so it is safe across processes (workers, CLI, admin).
Watching polls `PRAGMA data_version`, which changes only when *another* connection commits; commits from
this process wake watchers at once without waiting for the poll.

Retention: the state of the newest `keep` revisions (KEEP_REVISIONS) is kept; every GC_EVERY commits the
writer compacts older ones (their history line stays, their manifest goes: reading them is NotFoundError)
and deletes the blobs no kept revision refers to, in one write transaction, so the file stops growing
once the window is full (SQLite reuses the freed pages).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from proxy.errors import NotFoundError, StaleRevisionError, StoreUnavailableError
from proxy.model import State
from proxy.store.base import GENESIS, RecentRevisions, Revision, RevisionInfo, Store, now
from proxy.store.codec import Codec, blob_refs, parse_index

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    number INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    summary TEXT NOT NULL,
    routes TEXT NOT NULL,
    manifest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (hash TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# How often a watcher checks for commits made by other processes. Commits in this process wake watchers
# at once, and the supervisor tells its workers about each revision over a pipe, so this poll is only the
# safety net for other writers of the same file; 50 ms keeps it within the workers' 50 ms target.
POLL_INTERVAL = 0.050


# Revisions whose full state is kept (rollback targets); older ones keep only their history line. At
# 100,000 pins a pin change stores ~20 KB, so the window costs at most ~20 MB on top of the pins themselves.
KEEP_REVISIONS = 1000
# Compaction runs after every GC_EVERY-th revision: it reads every kept manifest and index, so not every commit.
GC_EVERY = 64
# Placeholder manifest of a compacted revision (the column is NOT NULL).
COMPACTED = ""
# Host parameters per IN (...) query, under SQLite's limit.
BATCH = 500


def default_path() -> Path:
    base = os.environ.get("TURNOUT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "turnout")
    return Path(base) / "state.db"


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _check(conn: sqlite3.Connection) -> None:
    """Refuse a damaged file at open: quick_check walks every page (about 15 ms for a 40 MB store), so a
    truncated file is caught here and not at the first read of a missing page."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise sqlite3.DatabaseError(f"database disk image is malformed ({rows[0][0]})")


def _check_writable(conn: sqlite3.Connection) -> None:
    """SQLite opens a file it may not write read-only without saying so; a proxy must write (instances,
    changes), so try one write and roll it back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('open.check', '')")
    finally:
        conn.execute("ROLLBACK")


class SQLiteStore(Store):
    gc_every = GC_EVERY

    def __init__(self, path: str | os.PathLike[str], *, keep: int = KEEP_REVISIONS) -> None:
        if keep < 1:
            raise ValueError(f"keep: at least 1 revision's state must be kept, got {keep}")
        self.keep = keep
        self.path = str(path)
        self.url = f"sqlite://{self.path}"
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._read = _connect(self.path)
            _check(self._read)
            self._read.executescript(SCHEMA)
            _check_writable(self._read)
        except (sqlite3.Error, OSError) as e:
            # The one place a damaged, truncated or read-only file is noticed: say which store and why,
            # rather than fail later (a traceback at start, or a refused write under load).
            reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
            raise StoreUnavailableError(f"cannot open store {self.url}: {reason}") from e
        self._read_lock = threading.Lock()
        self._codec = Codec()
        self._cache: Revision = GENESIS
        self._recent = RecentRevisions()  # old revisions read back: a rollback target is read again and again
        # Blocking commits (fsync) run on one writer thread so the event loop keeps serving.
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turnout-sqlite")
        self._writer: sqlite3.Connection | None = None
        # One event per watcher: a commit from this process wakes every watcher at once.
        self._watchers: set[asyncio.Event] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path} [revision {self._cache.number}]>"

    # reads

    def _latest_number(self) -> int:
        with self._read_lock:
            row = self._read.execute("SELECT MAX(number) FROM revisions").fetchone()
        return int(row[0] or 0)

    def _load(self, number: int, remember: bool = True) -> Revision:
        if number == 0:
            return GENESIS
        with self._read_lock:
            row = self._read.execute(
                "SELECT number, time, actor, reason, summary, routes, manifest FROM revisions WHERE number=?",
                (number,)).fetchone()
        if row is None:
            raise NotFoundError(f"no revision {number}")
        if row[6] == COMPACTED:
            raise NotFoundError(f"revision {number} was compacted: only the newest revisions' states are kept "
                                "(its history line remains)")
        info = RevisionInfo(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5])))
        state = self._codec.decode(row[6], self._blobs, remember)
        return Revision(info, state)

    def _blobs(self, digests: list[str]) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        with self._read_lock:
            for i in range(0, len(digests), BATCH):
                part = digests[i:i + BATCH]
                rows = self._read.execute(f"SELECT hash, data FROM blobs WHERE hash IN ({','.join('?' * len(part))})",
                                          part).fetchall()
                out.update((str(h), bytes(d)) for h, d in rows)
        return out

    async def current(self) -> Revision:
        n = self._latest_number()
        if n != self._cache.number:
            self._cache = self._load(n)
        return self._cache

    async def get(self, number: int) -> Revision:
        if number == self._cache.number:
            return self._cache
        rev = self._recent.get(number)
        if rev is None:
            rev = self._load(number, remember=False)
            self._recent.put(number, rev)
        return rev

    async def history(self, route: str | None = None, limit: int = 50,
                      before: int | None = None) -> list[RevisionInfo]:
        sql = "SELECT number, time, actor, reason, summary, routes FROM revisions"
        args: list[Any] = []
        where = []
        if before is not None:
            where.append("number < ?")
            args.append(before)
        if route is not None:
            # routes is a JSON list of names; the LIKE narrows, the exact check below decides.
            where.append("routes LIKE ?")
            args.append(f'%"{route}"%')
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY number DESC LIMIT ?"
        args.append(limit)
        with self._read_lock:
            rows = self._read.execute(sql, args).fetchall()
        out = [RevisionInfo(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5]))) for r in rows]
        return [i for i in out if route is None or route in i.routes]

    # writes

    def _commit_sync(self, manifest: str, blobs: dict[str, bytes], expected: int, info: RevisionInfo) -> None:
        if self._writer is None:
            self._writer = _connect(self.path)
        w = self._writer
        w.execute("BEGIN IMMEDIATE")
        try:
            row = w.execute("SELECT MAX(number) FROM revisions").fetchone()
            current = int(row[0] or 0)
            if current != expected:
                raise StaleRevisionError(expected, current)
            for digest, data in blobs.items():
                w.execute("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", (digest, data))
            w.execute(
                "INSERT INTO revisions (number, time, actor, reason, summary, routes, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (info.number, info.time, info.actor, info.reason, info.summary, json.dumps(list(info.routes)),
                 manifest))
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        if info.number % self.gc_every == 0:
            try:
                self._gc_sync(w)
            except sqlite3.Error as e:
                # The revision is committed and acknowledged; compaction is retried after the next GC_EVERY.
                log.warning("sqlite store %s: compaction failed: %s", self.path, e)

    def _gc_sync(self, w: sqlite3.Connection) -> tuple[int, int]:
        """Compact revisions older than the newest `keep` and delete unreferenced blobs.

        -> (revisions compacted, blobs deleted). One write transaction: commits (which insert their blobs
        in their own transaction) wait for it, so nothing a commit refers to is ever swept."""
        w.execute("BEGIN IMMEDIATE")
        try:
            latest = int(w.execute("SELECT MAX(number) FROM revisions").fetchone()[0] or 0)
            compacted = w.execute("UPDATE revisions SET manifest=? WHERE number<=? AND manifest!=?",
                                  (COMPACTED, latest - self.keep, COMPACTED)).rowcount
            live: set[str] = set()
            indexes: set[str] = set()
            for (manifest,) in w.execute("SELECT manifest FROM revisions WHERE manifest!=?", (COMPACTED,)):
                idx, whole = blob_refs(manifest)
                indexes |= idx
                live |= whole
            for digest in indexes:
                row = w.execute("SELECT data FROM blobs WHERE hash=?", (digest,)).fetchone()
                live.add(digest)
                if row is not None:
                    live.update(parse_index(bytes(row[0])))
            dead = [str(h) for (h,) in w.execute("SELECT hash FROM blobs") if h not in live]
            for i in range(0, len(dead), BATCH):
                part = dead[i:i + BATCH]
                w.execute(f"DELETE FROM blobs WHERE hash IN ({','.join('?' * len(part))})", part)
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        return compacted, len(dead)

    async def gc(self) -> tuple[int, int]:
        """Compact now (normally every GC_EVERY commits): -> (revisions compacted, blobs deleted)."""
        def run() -> tuple[int, int]:
            if self._writer is None:
                self._writer = _connect(self.path)
            return self._gc_sync(self._writer)

        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, run)

    async def commit(self, state: State, *, expected: int, actor: str, reason: str, summary: str,
                     routes: tuple[str, ...]) -> Revision:
        manifest, blobs = self._codec.encode(state)
        info = RevisionInfo(expected + 1, now(), actor, reason, summary, routes)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer_pool, self._commit_sync, manifest, blobs, expected, info)
        except BaseException as e:
            # The codec now believes these blobs are stored; forget that, or a retry would omit them.
            self._codec = Codec()
            if isinstance(e, sqlite3.Error):
                raise StoreUnavailableError(f"sqlite store {self.path}: {e}") from e
            raise
        rev = Revision(info, state)
        if rev.number > self._cache.number:
            self._cache = rev
        for ev in self._watchers:
            ev.set()
        return rev

    async def get_meta(self, key: str) -> str | None:
        with self._read_lock:
            row = self._read.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        with self._read_lock:
            self._read.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                               "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # watch

    def poke(self) -> None:
        """Another process says it committed: check now instead of at the next poll."""
        for ev in self._watchers:
            ev.set()

    async def watch(self, after: int) -> AsyncIterator[Revision]:
        wake = asyncio.Event()
        self._watchers.add(wake)
        try:
            async for rev in self._watch(after, wake):
                yield rev
        finally:
            self._watchers.discard(wake)

    async def _watch(self, after: int, wake: asyncio.Event) -> AsyncIterator[Revision]:
        seen = after
        with self._read_lock:
            version = self._read.execute("PRAGMA data_version").fetchone()[0]
        first = True
        while not self._closed:
            if not first:
                try:
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
                    wake.clear()
                except TimeoutError:
                    with self._read_lock:
                        v = self._read.execute("PRAGMA data_version").fetchone()[0]
                    if v == version:
                        continue
                    version = v
            first = False
            latest = self._latest_number()
            while seen < latest:
                seen += 1
                # Skipping to the newest revision is what a route table needs; intermediate ones are
                # still delivered so audit/metrics consumers see every change.
                if self._cache.number == seen:
                    yield self._cache
                    continue
                try:
                    rev = self._load(seen)
                except NotFoundError:
                    continue  # compacted while this watcher was far behind: the newer ones follow
                yield rev
            self._cache = await self.current() if self._cache.number < latest else self._cache

    async def close(self) -> None:
        self._closed = True
        self._writer_pool.shutdown(wait=True)
        with self._read_lock:
            self._read.close()
        if self._writer is not None:
            self._writer.close()

