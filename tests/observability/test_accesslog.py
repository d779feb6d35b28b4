"""proxy.telemetry.accesslog: JSON lines written off the event loop, client ids hashed, a bounded buffer."""

from __future__ import annotations

import io
import json
import stat
import threading
from pathlib import Path

from proxy.settings import Settings
from proxy.telemetry.accesslog import SALT_FILE, AccessLog
from proxy.telemetry.stats import Stats


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_off_by_default() -> None:
    assert AccessLog.open(Settings()) is None


def test_lines_hash_client_ids_with_a_shared_salt_and_drop_the_query(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    settings = Settings(access_log=str(out), state_dir=str(tmp_path / "state"))
    log = AccessLog.open(settings)
    assert log is not None
    log.record("web", "v2", "GET", "/cart?client=acme", 200, 12, 3456, 0.0123456789, "http://127.0.0.1:9202",
               False, True, "acme")
    log.record("web", "v1", "POST", "/x", 502, 0, 0, 0.5, "", True, False)
    log.close()
    first, second = lines(out)
    client = first.pop("client")
    assert first.pop("time").endswith("Z")
    assert first == {"route": "web", "version": "v2", "method": "GET", "path": "/cart", "status": 200,
                     "bytes_in": 12, "bytes_out": 3456, "duration": 0.012346, "upstream": "http://127.0.0.1:9202",
                     "retried": False, "fallback": True}
    assert isinstance(client, str) and len(client) == 12 and client != "acme"
    assert (second["client"], second["retried"], second["status"]) == (None, True, 502)
    salt = tmp_path / "state" / SALT_FILE
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600
    # Another process (worker) using the same state dir hashes the client the same way.
    other = AccessLog.open(settings)
    assert other is not None
    assert other.client_hash("acme") == client
    other.close()
    assert lines(out) == [{**first, "client": client, "time": lines(out)[0]["time"]}, lines(out)[1]]


def test_raw_client_ids_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog.open(Settings(access_log=str(out), access_log_client_ids=True))
    assert log is not None
    log.record("web", "v1", "GET", "/a?client=acme", 200, 0, 0, 0.001, "http://127.0.0.1:9201", client_id="acme")
    log.close()
    (line,) = lines(out)
    assert (line["client"], line["path"]) == ("acme", "/a?client=acme")


class BlockingOut(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(s)


def test_a_full_buffer_drops_and_counts_instead_of_blocking() -> None:
    out = BlockingOut()
    stats = Stats()
    log = AccessLog(out, stats=stats, max_buffered=2, close_out=False)
    log.record("web", "v1", "GET", "/0", 200, 0, 0, 0.001, "")
    assert out.entered.wait(10)  # the writer holds line 0 and is stuck in write()
    for i in range(1, 6):
        log.record("web", "v1", "GET", f"/{i}", 200, 0, 0, 0.001, "")
    assert (log.dropped, stats.access_log_dropped) == (3, 3)
    assert repr(log).endswith("[Buffered: 2 | Written: 0 | Dropped: 3]>")
    out.release.set()
    log.close()
    assert [json.loads(x)["path"] for x in out.getvalue().splitlines()] == ["/0", "/1", "/2"]
    assert log.written == 3


def test_workers_sharing_one_file_never_interleave_lines(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    settings = Settings(access_log=str(out), state_dir=str(tmp_path / "state"))
    logs = [AccessLog.open(settings), AccessLog.open(settings)]  # as two worker processes would
    long_path = "/" + "x" * 3000  # lines near PIPE_BUF: several per write, never split
    for i in range(3000):
        for n, log in enumerate(logs):
            assert log is not None
            log.record("web", f"v{n}", "GET", f"{long_path}/{i}", 200, 0, 0, 0.001, "")
    for log in logs:
        assert log is not None
        log.close()
        assert repr(log) == f"<AccessLog {out} [Buffered: 0 | Written: 3000 | Dropped: 0]>"
    got = lines(out)
    assert len(got) == 6000
    assert sorted(int(str(x["path"]).rsplit("/", 1)[1]) for x in got if x["version"] == "v0") == list(range(3000))
    assert sum(1 for x in got if x["version"] == "v1") == 3000
