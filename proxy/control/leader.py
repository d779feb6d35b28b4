"""Leader election: which replica acts, when several proxies share one etcd store.

Two roles are elected independently: `canary` (which replica steps rollouts) and `providers` (which replica
starts, replaces and removes instances: local processes and Docker containers). Every replica serves
traffic and answers the admin API either way; only the acting is single.

Design rule: an election never stops traffic. A replica that loses its lease stops acting at once (it
trusts a lease only for LEASE_TRUST of its TTL) but removes nothing, and a store that is not etcd has one
proxy, which always leads."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aetcd

from proxy.store.base import Store
from proxy.store.etcd import GRPC_OPTIONS

log = logging.getLogger("turnout.leader")

# How long a starting component waits for the first election round (a replica alone on a store then acts
# at once), and how often one that follows re-checks whether it leads now (seconds).
SETTLE_TIMEOUT = 3.0
FOLLOW_POLL = 1.0


class Leader(abc.ABC):
    """Whether this replica acts in one role: with several proxies on one etcd store exactly one does."""

    holder: str = ""  # who holds the role, as far as this replica knows (for status pages)

    @abc.abstractmethod
    def is_leader(self) -> bool: ...

    async def start(self) -> None:
        return None

    async def settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until the first election round is over, so a replica starting alone acts at once
        instead of following for a round."""
        return None

    async def stop(self) -> None:
        return None


class AlwaysLeader(Leader):
    """SQLite: one proxy per store, so this process always leads."""

    holder = "this process"

    def __repr__(self) -> str:
        return "<AlwaysLeader>"

    def is_leader(self) -> bool:
        return True


# Lease time-to-live: a crashed leader's role stands still at most this long before another replica leads.
LEASE_TTL = 5
# A leader trusts its lease for this share of the TTL after the keep-alive it last sent, so it stops acting
# before etcd could hand the key to another replica (etcd counts the TTL from when it got the keep-alive).
LEASE_TRUST = 0.6


class EtcdLeader(Leader):
    """Leadership as an etcd key created under a lease: the replica whose transaction created the key leads
    while it keeps the lease alive; a crashed or partitioned leader's lease lapses and another one takes over.
    `stop()` revokes the lease, so a clean shutdown hands over at once."""

    def __init__(self, host: str, port: int, key: str, *, ttl: int = LEASE_TTL, identity: str | None = None) -> None:
        import os
        import uuid

        self.host, self.port, self.key = host, port, key.encode()
        self.ttl = ttl
        self.identity = (identity or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}").encode()
        self._client: Any = None
        self._lease: Any = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self.holder = ""  # identity of the replica holding the key, as last seen
        self._first_round = asyncio.Event()
        self._users = 0  # components sharing this election (the local and Docker providers share one)

    def __repr__(self) -> str:
        return f"<EtcdLeader {self.key.decode()} [{'leading' if self.is_leader() else 'following'}]>"

    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    async def start(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        self._client = aetcd.Client(host=self.host, port=self.port, timeout=2.0, options=GRPC_OPTIONS)
        self._task = asyncio.create_task(self._run(), name=f"turnout-leader-{self.key.decode().rsplit('/', 1)[-1]}")

    async def settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._first_round.wait()

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leading = self.is_leader()
        self._valid_until = 0.0
        if self._client is not None:
            if leading and self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.revoke()
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def campaign(self) -> bool:
        """One round: keep the lease alive, then hold or try to take the key. True while leading."""
        c = self._client
        sent = time.monotonic()
        if self._lease is not None:
            reply = await self._lease.refresh()
            if reply is None or reply.TTL <= 0:  # expired while we could not reach etcd
                self._lease = None
                self._valid_until = 0.0
        if self._lease is None:
            self._lease = await c.lease(self.ttl)
        tx = c.transactions
        won, responses = await c.transaction(
            compare=[tx.version(self.key) == 0],
            success=[tx.put(self.key, self.identity, lease=self._lease)],
            failure=[tx.get(self.key)])
        holder = self.identity if won else (bytes(responses[0][0][0]) if responses and responses[0] else b"")
        self.holder = holder.decode(errors="replace")
        self._valid_until = sent + self.ttl * LEASE_TRUST if holder == self.identity else 0.0
        return self.is_leader()

    async def _run(self) -> None:
        while True:
            try:
                await self.campaign()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd unreachable: leadership lapses by itself (is_leader's deadline)
                log.warning("leader election (%s): %s", self.key.decode(), e)
            self._first_round.set()
            await asyncio.sleep(self.ttl / 5)


def leader_for(store: Store, role: str) -> Leader:
    """An etcd store is shared by replicas, which elect one per role; any other store has a single proxy."""
    if not store.url.startswith("etcd://"):
        return AlwaysLeader()
    parts = urlsplit(store.url)
    prefix = parts.path.strip("/") or "turnout"
    return EtcdLeader(parts.hostname or "127.0.0.1", parts.port or 2379, f"/{prefix}/leader/{role}")


class LedLoop:
    """A background loop that only its role's leader acts in (the canary controller, the re-check schedule):
    the start and stop every such service shares. Subclasses set `leader` and `task_name` and write _run."""

    leader: Leader
    task_name = "turnout-service"
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.leader.start()
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.leader.stop()

    async def _run(self) -> None:
        raise NotImplementedError
