"""Which store `turnout serve` opens, and how it refuses one it cannot use: the default database lives in
--state-dir, and a damaged or read-only file is one line on stderr and exit status 1, not a traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import changes
from proxy.parse import parse_document
from proxy.store import SQLiteStore
from tests.e2e.helpers import ROOT, Turnout, free_port

ROUTES = """
versions:
  v1: {endpoints: ["http://127.0.0.1:9"]}
routes:
  - {name: web, split: {v1: 1}}
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME with no turnout variables, so the default state folder is one the test can see."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for name in ("TURNOUT_STATE_DIR", "TURNOUT_STORE", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return h


def without_store(t: Turnout) -> Turnout:
    i = t.args.index("--store")
    del t.args[i:i + 2]
    return t


def test_the_default_store_follows_state_dir(tmp_path: Path, home: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    a = without_store(Turnout(tmp_path, str(routes), state_dir=tmp_path / "a"))
    b = without_store(Turnout(tmp_path, None, state_dir=tmp_path / "b"))
    with a, b:
        status, sa = a.api("GET", "/api/v1/state")
        assert (status, sa["revision"], list(sa["routes"])) == (200, 1, ["web"])
        # b has its own, empty store: it does not serve what a was seeded with.
        status, sb = b.api("GET", "/api/v1/state")
        assert (status, sb["revision"], sb["routes"]) == (200, 0, {})
    assert (tmp_path / "a" / "state.db").is_file() and (tmp_path / "b" / "state.db").is_file()
    assert not (home / ".local" / "state" / "turnout" / "state.db").exists()


def serve(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "serve", "--state-dir", str(state),
                           "--store", f"sqlite://{state}/state.db",
                           "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)


def real_store(path: Path, revisions: int) -> None:
    """A store with enough revisions (and a pin set) to span many pages."""
    async def fill() -> None:
        store = SQLiteStore(path)
        doc = parse_document({"versions": {"v1": {"endpoints": ["http://127.0.0.1:9"]}},
                              "routes": [{"name": "web", "split": {"v1": 1},
                                          "pins": {f"c{i}": "v1" for i in range(3000)}}]})
        await store.update(lambda s: changes.apply_document(s, doc), actor="t")
        for i in range(revisions):
            await store.update(lambda s, i=i: changes.set_split(s, "web", {"v1": i + 2}), actor="t")
        await store.close()
    asyncio.run(fill())


def test_a_file_of_random_bytes_is_refused_in_one_line(tmp_path: Path, home: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(os.urandom(64 * 1024))
    out = serve(state)
    assert (out.returncode, out.stderr) == (
        1, f"turnout: cannot open store sqlite://{state}/state.db: file is not a database\n")


def test_a_truncated_file_is_refused_in_one_line(tmp_path: Path, home: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    real_store(state / "state.db", 30)
    size = (state / "state.db").stat().st_size
    assert size > 32 * 1024
    os.truncate(state / "state.db", size // 2)
    out = serve(state)
    assert (out.returncode, out.stderr) == (
        1, f"turnout: cannot open store sqlite://{state}/state.db: database disk image is malformed\n")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (root ignores file modes)")
def test_a_read_only_file_is_refused_in_one_line(tmp_path: Path, home: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    real_store(state / "state.db", 1)
    db = state / "state.db"
    # As root a chmod 0444 file is still writable; the immutable attribute is not (ext2/3/4, xfs, btrfs).
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True, check=False).returncode != 0:
            pytest.skip("this file system has no immutable attribute")
    else:
        db.chmod(0o444)
    try:
        out = serve(state)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(db)], check=True)
    assert (out.returncode, out.stderr) == (
        1, f"turnout: cannot open store sqlite://{state}/state.db: attempt to write a readonly database\n")
