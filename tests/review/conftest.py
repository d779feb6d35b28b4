"""Fixtures for the adversarial review tests of the data plane: its real-upstream fixture."""

from __future__ import annotations

# Re-exported so pytest registers them for this folder too; the originals stay the single definition.
from tests.dataplane.conftest import pytest_asyncio_loop_factories, upstreams

__all__ = ["pytest_asyncio_loop_factories", "upstreams"]
