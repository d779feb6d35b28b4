"""The CLI's pieces that need no server: durations, steps, and `--wait` following a rollout live."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from proxy.commands.client import Reply
from proxy.commands.release import duration, follow, steps


def test_duration_and_steps() -> None:
    assert [duration(t) for t in ("60s", "2m", "500ms", "0.2", "1h")] == [60.0, 120.0, 0.5, 0.2, 3600.0]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration like 60s"):
        duration("soon")
    assert steps("1,5,25,50,100") == [1.0, 5.0, 25.0, 50.0, 100.0]
    with pytest.raises(argparse.ArgumentTypeError):
        steps("1,five")


class Screen(io.StringIO):
    def isatty(self) -> bool:
        return True


class Replay:
    """Answers GETs with the next of a list of rollout records."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.calls = 0

    def get(self, path: str) -> Reply:
        r = self.records[min(self.calls, len(self.records) - 1)]
        self.calls += 1
        return Reply(200, {}, r)


def test_follow_redraws_in_place_on_a_terminal_and_exits_by_outcome() -> None:
    running = {"status": "running", "text": "web: 5%\n  waiting"}
    promoted = {"status": "promoted", "text": "web: 100%\n  promoted"}
    out = Screen()
    client = Replay([running, running, promoted])
    assert follow(client, "/x", 1.0, False, out=out, poll=0.0) == 0  # type: ignore[arg-type]
    # Drawn once, unchanged the second time, then redrawn over its two lines.
    assert out.getvalue() == "web: 5%\n  waiting\n\x1b[2F\x1b[Jweb: 100%\n  promoted\n"
    plain = io.StringIO()
    rolled = {"status": "rolled_back", "text": "web: 0%"}
    assert follow(Replay([running, rolled]), "/x", 1.0, False, out=plain, poll=0.0) == 1  # type: ignore[arg-type]
    assert plain.getvalue() == "web: 5%\n  waiting\nweb: 0%\n"


def test_follow_does_not_repeat_what_the_start_command_printed() -> None:
    running = {"status": "running", "text": "web: 5%"}
    promoted = {"status": "promoted", "text": "web: 100%"}
    out = Screen()
    assert follow(Replay([running, promoted]), "/x", 1.0, False, out=out, poll=0.0,  # type: ignore[arg-type]
                  shown="web: 5%") == 0
    assert out.getvalue() == "\x1b[1F\x1b[Jweb: 100%\n"
