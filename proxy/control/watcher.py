"""The one install path: every revision, from the store's watch or from this process's own commit, reaches
the data plane through the Watcher.

Design rule (Traefik's provider -> watcher model): one object receives every new revision, drops the ones
it has already installed (or older ones), builds the RouteTable once per revision (handing it the
previous table, so compiled pins are reused across revisions: that cache lives only there), swaps the
TableHolder and then tells its listeners (the in-process data plane, the worker pipes). The admin API never
builds a table: it commits, gives the watcher the revision it got back (`receive`, so the operator's
rollback is installed at once instead of at the next watch poll), and answers after `installed`, which also
waits, bounded, for every worker process to route with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable

from proxy.errors import TurnoutError
from proxy.store.base import Revision, Store
from proxy.table import RouteTable, TableHolder
from proxy.telemetry.stats import Stats

Listener = Callable[[RouteTable], None]
# Returns once every worker process routes with the revision (bounded by its owner), see
# proxy.supervisor.workers.Workers.routed.
RoutedWait = Callable[[int], Awaitable[None]]

_log = logging.getLogger("turnout.watcher")


class UncompiledRevisionError(TurnoutError):
    """The revision is committed (durable) but its route table could not be built, so it does not serve."""


def log(msg: str) -> None:
    print(f"turnout: {msg}", file=sys.stderr, flush=True)


class Watcher:
    """Follows the store and installs every new revision into `holder`, once."""

    def __init__(self, store: Store, holder: TableHolder, stats: Stats) -> None:
        self.store = store
        self.holder = holder
        self.stats = stats
        self.listeners: list[Listener] = []
        # Set by the supervisor when worker processes serve: `installed` then also waits for them.
        self.routed: RoutedWait | None = None
        self._failed = 0  # the newest revision whose table could not be built
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Watcher revision {self.holder.table.revision} [listeners: {len(self.listeners)}]>"

    def receive(self, rev: Revision) -> None:
        """Install `rev` unless it (or a newer one) is installed already."""
        current = self.holder.table
        if rev.number <= current.revision and current.revision != 0:
            return
        try:
            table = RouteTable(rev.state, rev.number, previous=current)
        except Exception as e:  # a table that cannot compile must never take the old one down
            self.stats.apply_errors += 1
            self._failed = max(self._failed, rev.number)
            log(f"revision {rev.number} could not be compiled, still serving {current.revision}: {e}")
            self._wake()
            return
        if not self.holder.offer(table):
            return
        self.stats.applied += 1
        for listener in self.listeners:
            try:
                listener(table)
            except Exception:
                # The revision is committed and installed here; one failing listener must not keep the
                # others from hearing of it, nor turn an operator's successful write into an error.
                _log.exception("listener %r failed for revision %d", listener, rev.number)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def installed(self, number: int) -> None:
        """Return once revision `number` (or a newer one) serves here and, with worker processes, in each of
        them (that wait is bounded). UncompiledRevisionError when its table could not be built."""
        while self.holder.table.revision < number:
            if self._failed >= number:
                raise UncompiledRevisionError(f"revision {number} is committed but could not be compiled; still "
                                              f"serving revision {self.holder.table.revision}")
            await self._changed.wait()
        if self.routed is not None:
            await self.routed(number)

    # following the store

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for rev in self.store.watch(self.holder.table.revision):
                    self.receive(rev)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log(f"store watch failed ({e}); serving revision {self.holder.table.revision}, retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
