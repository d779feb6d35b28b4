"""Fixtures that run a real etcd: one per session for most tests, a private one for tests that stop it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from .etcd_server import EtcdServer, find_etcd

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    # `turnout serve` runs on uvloop, and gRPC's asyncio support is the part most likely to differ between
    # loops (stream errors, reconnects), so every store test runs on both.
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _require_etcd() -> None:
    if find_etcd() is None:
        reason = "etcd not installed (Debian package etcd-server provides /usr/bin/etcd)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    _require_etcd()
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """A private etcd for tests that stop, restart or compact it."""
    _require_etcd()
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_url(etcd_server: EtcdServer) -> str:
    """A store URL with a prefix of its own, so tests sharing the session's etcd never see each other."""
    return etcd_server.url(f"t-{uuid.uuid4().hex[:12]}")
