"""Fixtures for the adversarial review tests: the data plane's real-upstream fixture and the live admin app."""

from __future__ import annotations

# Re-exported so pytest registers them for this folder too; the originals stay the single definition.
from tests.admin.conftest import _no_ambient_token, admin
from tests.dataplane.conftest import pytest_asyncio_loop_factories, upstreams

__all__ = ["_no_ambient_token", "admin", "pytest_asyncio_loop_factories", "upstreams"]
