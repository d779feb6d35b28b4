from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from proxy.model import Match
from proxy.settings import Settings
from tests.dataplane.helpers import FAST, SLOW_BODY, SMALL, Proxy, Upstream, simple_route, start_proxy, table, version


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item,
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs on uvloop in production; its transports' flow control is what the tests exercise.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., asyncio.Future[Upstream]]]:
    started: list[Upstream] = []

    async def make(handler=None, name: str = "up") -> Upstream:  # type: ignore[no-untyped-def]
        up = await Upstream(handler=handler, name=name).start()
        started.append(up)
        return up

    yield make  # type: ignore[misc]
    for up in started:
        await up.stop()


@pytest.fixture
async def slow_body_proxy(upstreams) -> AsyncIterator[tuple[Proxy, Upstream]]:  # type: ignore[no-untyped-def]
    """A proxy for host "app" with small header and buffer limits and a long body timeout, and its upstream."""
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=SLOW_BODY, limits=SMALL))
    yield p, a
    await p.dp.shutdown(0.5)


@pytest.fixture
async def fast_proxy(upstreams) -> AsyncIterator[tuple[Proxy, Upstream]]:  # type: ignore[no-untyped-def]
    """A proxy for host "app" with short client-side timeouts, and its upstream."""
    a = await upstreams(name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0), match=Match(host="app"))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=FAST))
    yield p, a
    await p.dp.shutdown(0.5)
