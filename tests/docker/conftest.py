"""Fixtures for the Docker provider: a private engine per session (one per test for tests that stop it)
and the test images v1, v2 and broken."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import docker.errors
import pytest

from .engine import BROKEN, BUSYBOX, SERVE, Dockerd, find_dockerd, import_image


def _require_engine() -> None:
    reason = None
    if find_dockerd() is None:
        reason = "dockerd not installed (Debian package docker.io provides /usr/sbin/dockerd)"
    elif os.geteuid() != 0:
        reason = "running a private dockerd needs root"
    elif not os.path.exists(BUSYBOX):
        reason = "test images need a static busybox (Debian package busybox-static)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class Images:
    v1: str  # digest pins (name@<image id>) of the test images
    v2: str
    broken: str


def _images(engine: Dockerd) -> Images:
    client = engine.client()
    try:
        return Images(
            v1=import_image(client, "v1", "v1\n", SERVE),
            v2=import_image(client, "v2", "v2\n", SERVE),
            broken=import_image(client, "broken", "broken\n", BROKEN),
        )
    finally:
        client.close()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    _require_engine()
    engine = Dockerd()
    try:
        engine.start()
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def images(dockerd: Dockerd) -> Images:
    return _images(dockerd)


@pytest.fixture
def own_dockerd() -> Iterator[tuple[Dockerd, Images]]:
    """A private engine with live restore, for tests that stop and restart it."""
    _require_engine()
    engine = Dockerd(live_restore=True)
    try:
        engine.start()
        yield engine, _images(engine)
    finally:
        if engine.proc is None:
            engine.start()  # so close() can remove the containers that outlived the stop
        engine.close()


@pytest.fixture
def clean_engine(dockerd: Dockerd) -> Iterator[Dockerd]:
    """The session engine, with every container a test left removed afterwards."""
    yield dockerd
    client = dockerd.client()
    try:
        for c in client.containers.list(all=True):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):  # already being removed
                c.remove(force=True)
    finally:
        client.close()
