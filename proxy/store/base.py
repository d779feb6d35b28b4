"""The revision store interface: every change to the state is a numbered revision with who, when and why.

Two back ends implement it: SQLite (embedded default) and etcd (several replicas). Writers use
compare-and-swap on the revision number, so two operators never silently overwrite each other; readers
subscribe with `watch(after)` and receive every later revision in order.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from proxy.changes import Change, route_changes
from proxy.errors import StaleRevisionError
from proxy.model import EMPTY_STATE, State


@dataclass(frozen=True, slots=True)
class RevisionInfo:
    number: int
    time: float
    actor: str
    reason: str
    summary: str
    routes: tuple[str, ...]  # routes this revision changed


@dataclass(frozen=True, slots=True)
class Revision:
    info: RevisionInfo
    state: State

    @property
    def number(self) -> int:
        return self.info.number


GENESIS = Revision(RevisionInfo(0, 0.0, "", "", "empty state", ()), EMPTY_STATE)


class RecentRevisions:
    """The last few old revisions read back, decoded. Revisions never change once committed, so nothing
    here goes stale; the bound keeps a series of reads of 100,000-pin states from growing memory."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._revs: dict[int, Revision] = {}

    def get(self, number: int) -> Revision | None:
        rev = self._revs.pop(number, None)
        if rev is not None:
            self._revs[number] = rev  # most recently used last
        return rev

    def put(self, number: int, rev: Revision) -> None:
        self._revs[number] = rev
        while len(self._revs) > self.size:
            del self._revs[next(iter(self._revs))]


class Store(abc.ABC):
    """Async interface; SQLite runs its blocking work off the event loop, etcd is natively async."""

    url: str

    @abc.abstractmethod
    async def current(self) -> Revision: ...

    @abc.abstractmethod
    async def get(self, number: int) -> Revision:
        """Revision `number` in full; NotFoundError when it does not exist (or was compacted away)."""

    @abc.abstractmethod
    async def commit(self, state: State, *, expected: int, actor: str, reason: str, summary: str,
                     routes: tuple[str, ...]) -> Revision:
        """Store `state` as revision expected+1; StaleRevisionError when the current one is not `expected`.

        Returns only once the revision is durable.
        """

    @abc.abstractmethod
    async def history(self, route: str | None = None, limit: int = 50,
                      before: int | None = None) -> list[RevisionInfo]:
        """Newest first."""

    @abc.abstractmethod
    def watch(self, after: int) -> AsyncIterator[Revision]:
        """Every revision > `after`, in order, as it is committed (by any process or replica)."""

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def update(self, change: Callable[[State], Change], *, actor: str, reason: str = "",
                     expected: int | None = None, attempts: int = 20) -> Revision:
        """Apply a pure state transition with compare-and-swap.

        With `expected` (an operator's If-Match) a moved-on state is an error; without it the change is
        re-applied to the newer state, because it was computed from intent, not from a stale snapshot.
        A change that alters nothing writes no revision and returns the current one.
        """
        for _ in range(attempts):
            cur = await self.current()
            if expected is not None and cur.number != expected:
                raise StaleRevisionError(expected, cur.number)
            new_state, summary = change(cur.state)
            if not summary or new_state == cur.state:
                return cur
            try:
                return await self.commit(new_state, expected=cur.number, actor=actor, reason=reason,
                                         summary=summary, routes=tuple(sorted(route_changes(cur.state, new_state))))
            except StaleRevisionError:
                if expected is not None:
                    raise
        raise StaleRevisionError(-1, (await self.current()).number)


def now() -> float:
    return time.time()
