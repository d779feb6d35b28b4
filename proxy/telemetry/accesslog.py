"""The access log: one JSON object per proxied request, written off the event loop.

Design rule: `record()` only appends a tuple to a deque (thread-safe, O(1)); a writer thread formats and
writes batches every FLUSH_INTERVAL. When the writer falls behind (a slow disk, a blocked pipe) and the
buffer is full, new lines are dropped and counted (Stats.access_log_dropped ->
turnout_access_log_dropped_total), so logging never slows or blocks the proxy.

Privacy: a client id is logged raw only with settings.access_log_client_ids. Otherwise the `client`
field is a keyed hash (BLAKE2b, 12 hex digits) whose key is kept in `<state dir>/access-log.salt`
(created once, mode 0600), so all workers and restarts hash a client the same way and lines of one
client can be correlated without the log revealing who it is. Without a state dir the key is random per
process. The query string is left out of `path` for the same reason (an identity can be a query parameter).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import select
import stat
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from proxy.settings import Settings
from proxy.telemetry.stats import Stats

# Lines buffered before new ones are dropped: ~5 s of a 20k req/s worker, a few MB of tuples at most.
MAX_BUFFERED = 100_000
# Writer wake-up period: lines reach the file within this (and then `tail -f` shows them).
FLUSH_INTERVAL = 0.2
SALT_FILE = "access-log.salt"
# Client hashes remembered by the writer (a busy client is hashed once, not per line); cleared when full.
HASH_CACHE = 10_000
# JSON string literal, non-ASCII escaped (also lone surrogates from undecodable bytes), C-accelerated.
_str = json.encoder.encode_basestring_ascii

# (time, route, version, method, path, status, bytes_in, bytes_out, duration, upstream, retried, fallback, client)
Entry = tuple[float, str, str, str, str, int, int, int, float, str, bool, bool, str | None]


class AccessLog:
    def __init__(self, out: IO[str] | int, *, client_ids: bool = False, salt: bytes | None = None,
                 stats: Stats | None = None, max_buffered: int = MAX_BUFFERED, close_out: bool = True,
                 name: str = "") -> None:
        """`out`: a file descriptor (how `open` writes: whole lines per write(), safe to share between
        worker processes) or a text stream (tests)."""
        self._out = out
        self._close_out = close_out
        self.name = name or str(getattr(out, "name", out))
        # Largest write that stays one piece when several workers append to the same file or pipe.
        self._chunk = 1 << 20
        if isinstance(out, int) and not stat.S_ISREG(os.fstat(out).st_mode):
            self._chunk = select.PIPE_BUF
        self.client_ids = client_ids
        self._salt = salt if salt is not None else secrets.token_bytes(16)
        self._stats = stats
        self._max = max_buffered
        self._queue: deque[Entry] = deque()
        self.dropped = 0
        self.written = 0
        self._hashes: dict[str, str] = {}
        self._sec = -1
        self._sec_text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turnout-access-log", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        name = self.name
        return f"<AccessLog {name} [Buffered: {len(self._queue)} | Written: {self.written} | Dropped: {self.dropped}]>"

    @classmethod
    def open(cls, settings: Settings, stats: Stats | None = None,
             state_dir: Path | str | None = None) -> AccessLog | None:
        """None when the access log is off. `state_dir` (default settings.state_dir) holds the hash key."""
        target = settings.access_log
        if not target:
            return None
        sdir = state_dir if state_dir is not None else settings.state_dir
        salt = None if settings.access_log_client_ids or sdir is None else load_salt(Path(sdir))
        ids = settings.access_log_client_ids
        if target == "-":
            try:
                return cls(sys.stdout.fileno(), client_ids=ids, salt=salt, stats=stats, close_out=False, name="-")
            except (AttributeError, OSError, ValueError):  # a replaced stdout without a descriptor
                return cls(sys.stdout, client_ids=ids, salt=salt, stats=stats, close_out=False, name="-")
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, client_ids=ids, salt=salt, stats=stats, name=target)

    # -- request path (event loop thread) -------------------------------------------------------------

    def record(self, route: str, version: str, method: str, path: str, status: int, bytes_in: int, bytes_out: int,
               duration: float, upstream: str, retried: bool = False, fallback: bool = False,
               client_id: str | None = None) -> None:
        """One finished request. `duration` in seconds; `upstream` the endpoint URL that answered ("" when none)."""
        q = self._queue
        if len(q) >= self._max:
            self.dropped += 1
            if self._stats is not None:
                self._stats.access_log_dropped += 1
            return
        q.append((time.time(), route, version, method, path, status, bytes_in, bytes_out, duration, upstream,
                  retried, fallback, client_id))

    # -- writer thread ----------------------------------------------------------------------------------

    def client_hash(self, client_id: str) -> str:
        h = self._hashes.get(client_id)
        if h is None:
            if len(self._hashes) >= HASH_CACHE:
                self._hashes.clear()
            h = self._hashes[client_id] = hashlib.blake2b(
                client_id.encode("utf-8", "surrogateescape"), key=self._salt, digest_size=6).hexdigest()
        return h

    def format(self, e: Entry) -> str:
        """One JSON line, assembled by hand: json.dumps of a dict costs about twice as much."""
        t, route, version, method, path, status, bin_, bout, dur, upstream, retried, fallback, client = e
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        client_field = "null" if client is None else _str(client if self.client_ids else self.client_hash(client))
        if not self.client_ids:
            path = path.partition("?")[0]
        return (f'{{"time":"{self._sec_text}.{int((t - sec) * 1000):03d}Z","route":{_str(route)},'
                f'"version":{_str(version)},"method":{_str(method)},"path":{_str(path)},"status":{int(status)},'
                f'"bytes_in":{int(bin_)},"bytes_out":{int(bout)},"duration":{dur:.6f},"upstream":{_str(upstream)},'
                f'"retried":{"true" if retried else "false"},"fallback":{"true" if fallback else "false"},'
                f'"client":{client_field}}}')

    def _write_queued(self) -> None:
        q = self._queue
        lines: list[str] = []
        while True:
            try:
                lines.append(self.format(q.popleft()))
            except IndexError:
                break
            if len(lines) >= 4096:
                self._write(lines)
                lines = []
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            if isinstance(self._out, int):
                self._write_fd(self._out, lines)
            else:
                self._out.write("\n".join(lines) + "\n")
                self._out.flush()
            self.written += len(lines)
        except (OSError, ValueError):
            # A full disk or closed pipe must not kill the writer; the lines are lost, and counted.
            self.dropped += len(lines)

    def _write_fd(self, fd: int, lines: list[str]) -> None:
        """O_APPEND writes of whole lines: lines of different workers never interleave mid-line."""
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            b = line.encode("ascii") + b"\n"  # format() escapes everything non-ASCII
            if chunk and size + len(b) > self._chunk:
                _write_all(fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(b)
            size += len(b)
        if chunk:
            _write_all(fd, b"".join(chunk))

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self._write_queued()
        self._write_queued()

    def close(self) -> None:
        """Write what is buffered and stop the writer (blocks briefly; use `aclose` on an event loop)."""
        self._stop.set()
        self._thread.join()
        if self._close_out:
            with contextlib.suppress(OSError):
                if isinstance(self._out, int):
                    os.close(self._out)
                else:
                    self._out.close()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def load_salt(state_dir: Path) -> bytes:
    """The hash key shared by every process using `state_dir`; created on first use."""
    path = state_dir / SALT_FILE
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{SALT_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    # link() fails when another worker won the race; then everyone uses the winner's key.
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)
    os.unlink(tmp)
    return path.read_bytes()
