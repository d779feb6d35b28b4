"""Fixtures for the benchmark harness tests: the Debian tools it drives, or a skip (a failure in CI)."""

from __future__ import annotations

import os

import pytest

from benchmarks.__main__ import missing_tools


@pytest.fixture
def bench_tools() -> None:
    missing = missing_tools()
    if missing:
        why = (f"benchmark tools missing: {', '.join(sorted(missing))} "
               f"(apt-get install -y {' '.join(sorted(set(missing.values())))})")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
