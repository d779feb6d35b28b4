"""Operator commands that compare and re-check: `turnout diff A B` (what changed between two revisions)
and `turnout check-version NAME` (run a version's check now).

Design rule: the admin API computes (proxy.revdiff, proxy.control.rechecks); these only ask and print, so the
command line imports nothing beyond the API client and starts fast. Exit statuses as in
proxy.commands.operate.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from proxy.commands.client import AdminClient
from proxy.commands.operate import _common, _entry, _path, _time, printable

# The check command's own timeout (300 s) plus the time to record its verdict.
CHECK_WAIT = 330.0


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="what changed between two revisions, per route and per version",
                       description="Show what changed from revision A to revision B: weights, pins (counts and "
                       "a few examples), fallback, mirrors, matches and the other route fields, and versions "
                       "added, removed or changed. B may be older than A (the change a rollback would apply).")
    p.add_argument("a", type=int, metavar="A")
    p.add_argument("b", type=int, metavar="B")
    _common(p)
    p.set_defaults(func=_entry(cmd_diff))

    p = sub.add_parser("check-version", help="run a version's check command now (a re-check)",
                       description="Run NAME's check command now, as the scheduled re-check does: a live version "
                       "that fails is flagged (and, with on_check_fail: shift, its traffic moves to the fallback); "
                       "one that passes is unflagged. Exit 0 when it passed, 1 when it failed.")
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=_entry(cmd_check_version))


def cmd_diff(args: argparse.Namespace, client: AdminClient) -> int:
    data = client.get(_path("revisions", str(args.a), "diff", str(args.b))).data
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"revision {args.a} -> {args.b}")
    print("\n".join(printable(line) for line in data["text"].splitlines()))
    return 0


def render_check(name: str, check: dict[str, Any] | None) -> str:
    if check is None:
        return f"{name}: no check result"
    flag = "  FLAGGED (receives traffic, gains no more)" if check.get("flagged") else ""
    return f"{check['summary']}  at {_time(check['time'])} UTC{flag}"


def cmd_check_version(args: argparse.Namespace, client: AdminClient) -> int:
    # A scanner may take minutes (proxy.control.gates.CHECK_TIMEOUT): wait for it, not the usual 30 s.
    client.timeout = max(client.timeout, CHECK_WAIT)
    data = client.request("POST", _path("versions", args.name, "check"), {}).data
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_check(args.name, data.get("check")))
    check = data.get("check") or {}
    return 0 if check.get("ok") else 1


