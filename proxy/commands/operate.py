"""Operator commands that talk to a running proxy's admin API: status, split, pin, unpin, rollback,
history, apply, versions.

Design rule: one exit status per outcome, the same for every command: 0 done (including "no change"),
1 the API refused (its field-path messages are printed), 2 bad usage or an unreadable local file, 3 the
admin API could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import quote

from proxy.admin.tokens import TOKEN_ENV, TokenFileError, client_token
from proxy.commands.client import DEFAULT_ADMIN, AdminClient, ProblemError, Reply, UnreachableError, problem_document
from proxy.commands.describe import route_lines

API = "/api/v1"
BAR_WIDTH = 50
# One fill character per version in the split bar, cycled; distinct at a glance in any terminal.
BAR_CHARS = "#=*+~%@o"

Command = Callable[[argparse.Namespace, AdminClient], int]


class UsageError(Exception):
    pass


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="routes, weights, pins and healthy endpoints of a running proxy",
                       description="Show each route of a running proxy: versions, weights (with a bar), "
                       "pins and healthy endpoints, and the current revision.")
    _common(p)
    p.set_defaults(func=_entry(cmd_status))

    p = sub.add_parser("split", help="set a route's traffic weights, e.g. `split web v1=90 v2=10`",
                       description="Set weights of versions on a route; versions not named keep their weight "
                       "(set one to 0 to take it out).")
    p.add_argument("route")
    p.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    p.add_argument("--force", action="store_true",
                   help="give weight even to a version with no healthy endpoint or a failed check command")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_split))

    p = sub.add_parser("pin", help="send one client to a dedicated version",
                       description="Pin CLIENT (its identity value) to VERSION on ROUTE.")
    p.add_argument("route")
    p.add_argument("client")
    p.add_argument("version")
    p.add_argument("--force", action="store_true",
                   help="even to a version whose check command failed")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_pin))

    p = sub.add_parser("unpin", help="remove a client's pin", description="Remove CLIENT's pin on ROUTE.")
    p.add_argument("route")
    p.add_argument("client")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_unpin))

    p = sub.add_parser("rollback", help="put a route back as it was before its last change (or at --to N)",
                       description="Restore ROUTE as it was one revision before its most recent change, or as "
                       "it was at revision --to N. The rollback is itself a new revision.")
    p.add_argument("route")
    p.add_argument("--to", type=int, metavar="N", help="the revision to restore the route from")
    p.add_argument("--force", action="store_true",
                   help="even if the route then sends traffic to a version whose check command failed")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_rollback))

    p = sub.add_parser("history", help="revisions: number, time, actor, summary and reason",
                       description="List revisions, newest first, optionally only those that changed ROUTE.")
    p.add_argument("route", nargs="?")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N revisions (default 20)")
    p.add_argument("--diff", action="store_true", help="under each revision, what it changed (as `turnout diff`)")
    _common(p)
    p.set_defaults(func=_entry(cmd_history))

    p = sub.add_parser("apply", help="replace routes and versions with a route file's (via the admin API)",
                       description="Send a route file to a running proxy; it is validated and committed as "
                       "one revision. Unlisted, unreferenced versions are retired.")
    p.add_argument("file", help="route file (YAML or JSON), - for standard input")
    p.add_argument("--dry-run", action="store_true", help="validate and show the change without committing")
    p.add_argument("--force", action="store_true",
                   help="even if the file gives traffic to a version whose check command failed")
    _common(p, write=True)
    p.set_defaults(func=_entry(cmd_apply))

    p = sub.add_parser("versions", help="registered versions: kind, instances, created, routes using them",
                       description="List the versions registered in a running proxy.")
    _common(p)
    p.set_defaults(func=_entry(cmd_versions))


def _common(p: argparse.ArgumentParser, write: bool = False) -> None:
    g = p.add_argument_group("admin API")
    g.add_argument("--admin", metavar="URL",
                   help=f"admin API address (default: $TURNOUT_ADMIN or {DEFAULT_ADMIN})")
    g.add_argument("--token-file", metavar="PATH",
                   help=f"file holding the admin token (default: ${TOKEN_ENV}, then <state dir>/admin-token)")
    g.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")
    if write:
        g.add_argument("--reason", default="", help="why; recorded in the history with your token's name")
        g.add_argument("--if-match", type=int, metavar="N",
                       help="refuse (412) unless the current revision is still N")


def _entry(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            client = AdminClient(args.admin, client_token(args.token_file))
            return command(args, client)
        except (UsageError, TokenFileError) as e:
            return _fail(args, e, 2)
        except ProblemError as e:
            return _fail(args, e, 1)
        except UnreachableError as e:
            return _fail(args, e, 3)

    return run


def _fail(args: argparse.Namespace, e: Exception, code: int) -> int:
    """Report a failed command: a problem document on stdout under --json (scripts parse one stream), else
    text on stderr. The exit status is the same either way."""
    if getattr(args, "json", False):
        print(json.dumps(problem_document(e), indent=2))
    elif isinstance(e, ProblemError):
        _print_problem(e, sys.stderr)
    else:
        print(f"turnout {args.command}: {e}", file=sys.stderr)
    return code


def _print_problem(e: ProblemError, out: TextIO) -> None:
    print(f"error: {e}", file=out)
    for path, message in e.errors:
        print(f"  {path}: {message}" if path else f"  {message}", file=out)
    if e.status == 401:
        print(f"  (give the token with --token-file PATH or ${TOKEN_ENV}; `turnout serve` prints where it "
              "wrote a generated one)", file=out)
    current = e.problem.get("current_revision")
    if e.status == 412 and current is not None:
        print(f"  (the current revision is {current})", file=out)


def _path(*parts: str) -> str:
    return API + "".join("/" + quote(p, safe="") for p in parts)


def _write_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"if_match": args.if_match, "reason": args.reason or None}


def _force(args: argparse.Namespace) -> dict[str, str] | None:
    """The check gate's override (the admin API's ?force=true) for writes that may give a version traffic."""
    return {"force": "true"} if args.force else None


def _report_write(args: argparse.Namespace, reply: Reply) -> int:
    data = reply.data or {}
    if args.json:
        print(json.dumps(data, indent=2))
    elif data.get("changed"):
        print(f"revision {data['revision']}: {data.get('summary', '')}")
    else:
        print(f"no change (revision {data.get('revision')})")
    return 0


# writes

def cmd_split(args: argparse.Namespace, client: AdminClient) -> int:
    weights: dict[str, float] = {}
    for item in args.weights:
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not name or not value or not math.isfinite(w) or w < 0:
            raise UsageError(f"expected VERSION=WEIGHT with a weight >= 0, got {item!r}")
        weights[name] = int(w) if w == int(w) else w
    reply = client.request("PATCH", _path("routes", args.route) + "/split", weights,
                           query={"force": "true"} if args.force else None, **_write_options(args))
    return _report_write(args, reply)


def cmd_pin(args: argparse.Namespace, client: AdminClient) -> int:
    reply = client.request("PUT", _path("routes", args.route, "pins", args.client), {"version": args.version},
                           query=_force(args), **_write_options(args))
    return _report_write(args, reply)


def cmd_unpin(args: argparse.Namespace, client: AdminClient) -> int:
    reply = client.request("DELETE", _path("routes", args.route, "pins", args.client), **_write_options(args))
    return _report_write(args, reply)


def cmd_rollback(args: argparse.Namespace, client: AdminClient) -> int:
    body = {} if args.to is None else {"revision": args.to}
    reply = client.request("POST", _path("routes", args.route, "rollback"), body, query=_force(args),
                           **_write_options(args))
    return _report_write(args, reply)


def cmd_apply(args: argparse.Namespace, client: AdminClient) -> int:
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        raise UsageError(f"{args.file}: {e.strerror}") from e
    query = {**({"dry_run": "true"} if args.dry_run else {}), **(_force(args) or {})} or None
    try:
        reply = client.request("POST", API + "/apply", raw=data, content_type="application/yaml", query=query,
                               **_write_options(args))
    except ProblemError as e:
        if e.status == 422 and not args.json:
            # Same shape as `turnout check`: file: path: message.
            for path, message in e.errors:
                print(f"{args.file}: {path}: {message}" if path else f"{args.file}: {message}", file=sys.stderr)
            print(f"{args.file}: {len(e.errors)} error(s); nothing applied", file=sys.stderr)
            return 1
        raise
    if not args.json:
        # What an HTTPRoute stream's translation ignored (the JSON answer carries them as `warnings`).
        for w in (reply.data or {}).get("warnings", []):
            print(f"{args.file}: warning: {w['path']}: {w['message']}", file=sys.stderr)
    if args.dry_run and not args.json:
        d = reply.data or {}
        summary = str(d.get("summary")) if d.get("changed") else "no change"
        print(f"dry run at revision {d.get('revision')}: {summary}")
        return 0
    return _report_write(args, reply)


# reads

def cmd_history(args: argparse.Namespace, client: AdminClient) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    query = {"limit": str(args.limit)}
    if args.route:
        query["route"] = args.route
    data = client.get(API + "/revisions", query).data
    with_diff = getattr(args, "diff", False)
    diffs = history_diffs(client, [r["revision"] for r in data["revisions"]]) if with_diff else {}
    if args.json:
        if with_diff:
            for r in data["revisions"]:
                r["diff"] = diffs.get(r["revision"])
        print(json.dumps(data, indent=2))
        return 0
    rows = [[str(r["revision"]), _time(r["time"]), r["actor"] or "-", r["summary"], r["reason"]]
            for r in data["revisions"]]
    if not rows:
        print("no revisions" + (f" changed route {args.route}" if args.route else ""))
        return 0
    if not with_diff:
        print(_table(["REV", "TIME (UTC)", "ACTOR", "SUMMARY", "REASON"], rows))
        return 0
    header, *lines = _table(["REV", "TIME (UTC)", "ACTOR", "SUMMARY", "REASON"], rows).splitlines()
    print(header)
    for r, line in zip(data["revisions"], lines, strict=True):
        print(line)
        diff = diffs.get(r["revision"])
        if diff is not None:
            text = diff["text"] if isinstance(diff, dict) else diff
            print("\n".join("    " + printable(d) for d in text.splitlines()))
    return 0


def history_diffs(client: AdminClient, numbers: list[int]) -> dict[int, Any]:
    """Each revision's diff from the one before it (the API's JSON; its "text" is the table); a compacted
    revision gets the problem's detail as a string instead."""
    out: dict[int, Any] = {}
    for n in numbers:
        if n < 1:
            continue
        try:
            out[n] = client.get(_path("revisions", str(n - 1), "diff", str(n))).data
        except ProblemError as e:
            if e.status != 404:
                raise
            out[n] = f"no diff: {e.problem.get('detail') or e}"
    return out


def cmd_versions(args: argparse.Namespace, client: AdminClient) -> int:
    data = client.get(API + "/versions").data
    health = client.get(API + "/health").data.get("versions", {})
    docker: dict[str, Any] = {}
    try:
        for d in client.get(API + "/docker/versions").data.get("versions", []):
            docker[d["name"]] = d
    except ProblemError:
        pass  # no docker provider on this proxy: the other columns still say everything
    if args.json:
        print(json.dumps({**data, "health": health, "docker": docker}, indent=2))
        return 0
    rows = []
    for v in data["versions"]:
        d = docker.get(v["name"])
        h = health.get(v["name"], {})
        if d is not None:
            source = d.get("image_id") or d.get("image") or ""
            replicas = f"{d.get('healthy', 0)}/{d.get('desired', 0)}"
            if d.get("zones"):
                replicas += " (" + ", ".join(f"{z['zone']} {z['healthy']}/{z['desired']}" for z in d["zones"]) + ")"
        else:
            source = v["spec"].get("image") or " ".join(v["spec"].get("command", [])) or ""
            replicas = f"{h.get('healthy', 0)}/{h.get('total', len(v['instances']))}"
        instances = ", ".join(v["instances"]) or "-"
        proto = v["spec"].get("protocol")
        kind = f"{v['kind']}/{proto}" if proto else v["kind"]
        rows.append([v["name"], kind, replicas, instances, _time(v["created"]) if v["created"] else "-",
                     ", ".join(v["routes"]) or "-", _check_cell(v.get("check")), source])
    if not rows:
        print(f"no versions (revision {data['revision']})")
        return 0
    print(_table(["VERSION", "KIND", "HEALTHY", "INSTANCES", "CREATED (UTC)", "ROUTES", "CHECK (UTC)",
                  "IMAGE / COMMAND"], rows))
    return 0


def _check_cell(check: dict[str, Any] | None) -> str:
    """The last check's result and time: `passed 2026-12-01 10:00:00`, `FLAGGED ...` for a live failure."""
    if not check:
        return "-"
    verdict = "FLAGGED" if check.get("flagged") else ("passed" if check.get("ok") else "failed")
    return f"{verdict} {_time(check['time'])}"


def cmd_status(args: argparse.Namespace, client: AdminClient) -> int:
    state = client.get(API + "/state").data
    health = client.get(API + "/health").data
    if args.json:
        print(json.dumps({"state": state, "health": health}, indent=2))
        return 0
    print(render_status(state, health))
    return 0


def render_status(state: dict[str, Any], health: dict[str, Any]) -> str:
    lines = [f"revision {state['revision']} ({len(state['routes'])} route(s), {len(state['versions'])} "
             f"version(s)); data plane at revision {health.get('revision', '?')}"]
    seen_health = health.get("versions", {})
    for name, r in state["routes"].items():
        m = r.get("match", {})
        where = f"host {m['host']}" if m.get("host") else "any host"
        pins: dict[str, str] = r.get("pins", {})
        # Without an identity source there is no client id to stick by, whatever `sticky` says.
        sticky = "on" if r.get("identity") else "off (no identity source)"
        # Several matches (ORed) are listed one per line below (proxy.commands.describe).
        ways = [f"{len(r['matches'])} matches"] if r.get("matches") else [where, f"prefix {m.get('path_prefix', '/')}"]
        extras = [*ways, f"sticky {sticky if r.get('sticky') else 'off'}", f"{len(pins)} pin(s)"]
        if r.get("fallback"):
            extras.append("fallback " + " > ".join(r["fallback"]))
        lines.append("")
        lines.append(f"route {name}: " + ", ".join(extras))
        lines.extend(route_lines(r))
        split: dict[str, float] = r.get("split", {})
        total = sum(split.values())
        listed = list(split) + [v for v in [*pins.values(), *r.get("fallback", [])] if v not in split]
        rows = []
        for v in dict.fromkeys(listed):
            w = split.get(v)
            share = f"{100 * w / total:.1f}%" if w is not None and total > 0 else "-"
            npins = sum(1 for pv in pins.values() if pv == v)
            rows.append(["  " + v, "-" if w is None else f"{w:g}", share, str(npins),
                         _healthy(v, state["versions"].get(v, {}), seen_health)])
        lines.append(_table(["  VERSION", "WEIGHT", "SHARE", "PINS", "HEALTHY"], rows))
        lines.append("  " + split_bar(list(split.items())))
    if not state["routes"]:
        lines.append("no routes")
    return "\n".join(lines)


def _healthy(version: str, stored: dict[str, Any], seen: dict[str, Any]) -> str:
    h = seen.get(version)
    if h is not None:
        return f"{h['healthy']}/{h['total']}"
    # The data plane has not reported this version: show what is registered, health unknown.
    n = len(stored.get("instances", stored.get("endpoints", [])))
    return f"?/{n}"


def split_bar(split: Sequence[tuple[str, float]], width: int = BAR_WIDTH) -> str:
    """`[#####=====] # v1 50%  = v2 50%`: cells by largest remainder, at least one per non-zero weight."""
    total = sum(w for _, w in split)
    if total <= 0:
        return "[" + " " * width + "]"
    exact = [w * width / total for _, w in split]
    cells = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - cells[i], reverse=True):
        if sum(cells) >= width:
            break
        cells[i] += 1
    for i, (_, w) in enumerate(split):
        if w > 0 and cells[i] == 0:
            cells[i] = 1
            cells[cells.index(max(cells))] -= 1
    bar = "".join(BAR_CHARS[i % len(BAR_CHARS)] * n for i, n in enumerate(cells))
    legend = "  ".join(f"{BAR_CHARS[i % len(BAR_CHARS)]} {v} {100 * w / total:.4g}%"
                       for i, (v, w) in enumerate(split))
    return f"[{bar}] {legend}"


def printable(text: object) -> str:
    """Control characters (ESC, OSC, C1, bidi overrides) shown escaped, never sent to the terminal raw:
    reasons, client ids and summaries come from whoever holds a token."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def _table(header: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    out = []
    for row in [header, *rows]:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)


def _time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
