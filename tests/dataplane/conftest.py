from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from tests.dataplane.helpers import Upstream


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
