"""Operator command output: text from the history is attacker-influenced (any token holder writes reasons)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.commands.operate import cmd_history


@dataclass
class _Reply:
    data: Any


class _FakeClient:
    def __init__(self, data: Any) -> None:
        self.data = data

    def get(self, path: str, query: dict[str, str] | None = None) -> _Reply:
        return _Reply(self.data)


def test_history_table_does_not_pass_terminal_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    evil = "fine\x1b[2K\x1b[1A\x1b]52;c;ZXZpbA==\x07\rsplit web v1=100\x9b2J"
    data = {"revisions": [{"revision": 5, "time": 0.0, "actor": "ci\x1b[8m", "summary": "pin acme\x1b[0m",
                           "reason": evil}]}
    args = argparse.Namespace(limit=10, route=None, json=False)
    assert cmd_history(args, _FakeClient(data)) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert not any(c in out for c in ("\x1b", "\x07", "\r", "\x9b"))
