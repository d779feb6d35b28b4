"""Endpoint health: active checks on an interval, passive ejection with exponential re-admission.

Design rule: health is a pair of booleans on each Endpoint (active_ok, ejected) that checks and timers
flip through the Endpoint's methods; the request path reads them and never waits for a check. New
endpoints start healthy (optimistic) and their first check runs at once, so a dead one is found within
one check timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

import aiohttp

from proxy.dataplane import h2check
from proxy.model import HealthCheck

if TYPE_CHECKING:
    from proxy.dataplane.pool import Endpoint

# First ejection lasts this long; each consecutive ejection doubles it, up to EJECT_MAX.
EJECT_BASE = 1.0
EJECT_MAX = 60.0


class Health:
    def __init__(self, eject_after: int) -> None:
        self.eject_after = max(1, eject_after)
        self.eject_base = EJECT_BASE
        self.eject_max = EJECT_MAX
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<Health [Checks: {len(self._tasks)} | eject after {self.eject_after}]>"

    # -- passive

    def failure(self, ep: Endpoint) -> None:
        if ep.failed() >= self.eject_after and not ep.ejected:
            self._eject(ep)

    def success(self, ep: Endpoint) -> None:
        ep.succeeded()

    def _eject(self, ep: Endpoint) -> None:
        delay = min(self.eject_base * 2 ** ep.ejections, self.eject_max)
        ep.eject(asyncio.get_running_loop().call_later(delay, self._readmit, ep))

    def _readmit(self, ep: Endpoint) -> None:
        # Probation: one more failure ejects again, for twice as long; a success clears the record.
        ep.readmit(self.eject_after - 1)

    # -- active

    def watch(self, ep: Endpoint, check: HealthCheck) -> None:
        if ep not in self._tasks:
            self._tasks[ep] = asyncio.get_running_loop().create_task(self._run(ep, check))

    def forget(self, ep: Endpoint) -> None:
        task = self._tasks.pop(ep, None)
        if task is not None:
            task.cancel()
        ep.cancel_readmit()
        ep.close_idle()

    async def _run(self, ep: Endpoint, check: HealthCheck) -> None:
        url = f"{'https' if ep.https else 'http'}://{ep.address}{check.path}"
        while True:
            # An https endpoint is checked with the context its requests use: a certificate the data plane
            # would refuse fails the check. Without a context (unloadable files) it is never healthy.
            if ep.https and ep.ssl is None:
                ok = False
            elif ep.mux is not None or check.grpc is not None:
                # An HTTP/2 version is checked over HTTP/2 (a gRPC one with grpc.health.v1.Health/Check).
                ok = await h2check.check(ep.host, ep.port, ep.ssl, ep.server_hostname, check.path, check.grpc,
                                         check.timeout)
            else:
                ok = await self._check(url, check.timeout, ep.ssl, ep.server_hostname)
            ep.checked(ok)
            await asyncio.sleep(check.interval)

    async def _check(self, url: str, timeout: float, ctx: ssl.SSLContext | None = None,
                     server_hostname: str | None = None) -> bool:
        if self._session is None:
            # force_close: a check must not hold a keep-alive slot the upstream counts against real traffic.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                                         ssl=ctx if ctx is not None else True,
                                         server_hostname=server_hostname) as resp:
                await resp.read()
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for ep in list(self._tasks):
            self.forget(ep)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
