"""Session-wide guard: the tests must run the code in the work tree.

`pip install -e .` compiles the data plane's per-request modules with mypyc (setup.py) into `.so` files next
to their sources, and Python imports those before the `.py`. After an edit the `.so` would silently run the
old code, so the session stops and says how to rebuild.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = []
    for so in ROOT.glob("proxy/**/*.so"):
        source = so.with_name(so.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(source.relative_to(ROOT)))
    if stale:
        pytest.exit(f"compiled modules are older than their sources ({', '.join(sorted(stale))}): rebuild them "
                    "with `./dev test` or `.venv/bin/pip install -e .` (or delete proxy/**/*.so to test "
                    "pure Python)", returncode=3)
