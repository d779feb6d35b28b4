"""`turnout canary start|status|pause|resume|abort` and `turnout drain`: progressive delivery through a
running proxy's admin API.

Design rule: the CLI only asks; the proxy's canary controller decides. Exit status: 0 done (with --wait:
promoted / drained), 1 the API refused or the rollout was rolled back,
2 bad usage, 3 the admin API could not be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from proxy.admin.tokens import TOKEN_ENV, TokenFileError, client_token
from proxy.commands.client import DEFAULT_ADMIN, AdminClient, ProblemError, UnreachableError, problem_document

API = "/api/v1"
DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Starting a rollout or drain may wait for the version's check command (proxy.control.gates.CHECK_TIMEOUT, 300 s).
START_TIMEOUT = 330.0
# --wait polls the API this often at most; a rollout's own interval is usually much longer.
POLL_MAX = 1.0
FINAL_OK = ("promoted", "drained")
# `--wait` on a rollout the judge paused: not a failure, but someone has to decide.
PAUSED_INCONCLUSIVE = 4
FINAL_BAD = ("rolled_back", "aborted", "failed", "cancelled")

Command = Callable[[argparse.Namespace, AdminClient], int]


class UsageError(Exception):
    pass


def duration(text: str) -> float:
    """'60s', '2m', '500ms', '0.2' (seconds) -> seconds."""
    m = DURATION_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 60s, 2m or 500ms, got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def check_rule(text: str) -> tuple[str, str, str]:
    """'p99<=1.2x baseline' -> ("p99", "pass", "1.2x baseline"); 'p99>2x baseline' -> (..., "fail", ...).
    The bound itself is checked by the API, which names the field."""
    for op, side in (("<=", "pass"), (">", "fail")):
        metric, found, bound = text.partition(op)
        if found and metric.strip() and bound.strip():
            return metric.strip(), side, bound.strip()
    raise argparse.ArgumentTypeError(f"expected METRIC<=BOUND or METRIC>BOUND, got {text!r}")


def steps(text: str) -> list[float]:
    try:
        out = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percentages like 1,5,25,50,100, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one step")
    return out


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admin API")
    g.add_argument("--admin", metavar="URL", help=f"admin API address (default: $TURNOUT_ADMIN or {DEFAULT_ADMIN})")
    g.add_argument("--token-file", metavar="PATH",
                   help=f"file holding the admin token (default: ${TOKEN_ENV}, then <state dir>/admin-token)")
    g.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")


def register(sub: Any) -> None:
    canary = sub.add_parser("canary", help="automated canary rollouts: start, status, pause, resume, abort",
                            description="Step a new version's share of a route up while its error rate and p99 "
                            "latency stay within limits of the version(s) it replaces; roll back at once when not.")
    csub = canary.add_subparsers(dest="canary_command", metavar="ACTION", required=True)

    p = csub.add_parser("start", help="start a rollout of VERSION on ROUTE")
    p.add_argument("route")
    p.add_argument("--to", required=True, metavar="VERSION", help="the canary version")
    p.add_argument("--steps", type=steps, metavar="P,P,...", help="canary shares in percent (default 1,5,25,50,100)")
    p.add_argument("--interval", type=duration, metavar="DURATION",
                   help="time between analyses / steps, e.g. 60s (default 60s)")
    p.add_argument("--max-error-rate", type=float, metavar="R",
                   help="largest canary error rate (5xx + upstream errors) allowed (default 0.01)")
    p.add_argument("--max-p99-ratio", type=float, metavar="X",
                   help="largest canary p99 as a multiple of the baseline's (default 1.5)")
    p.add_argument("--min-requests", type=int, metavar="N",
                   help="canary requests needed since the last step before deciding (default 200)")
    p.add_argument("--prometheus", metavar="URL", help="read the numbers from this Prometheus server instead")
    p.add_argument("--check", action="append", type=check_rule, metavar="RULE", dest="checks",
                   help="a judge rule, repeatable: METRIC<=BOUND passes, METRIC>BOUND fails, both for one metric: "
                   "between them is inconclusive (pauses). METRIC: error_rate, p50, p90, p99; BOUND: 1%%, 250ms, "
                   "1.2x baseline, baseline + 0.5%%. Replaces --max-error-rate/--max-p99-ratio")
    p.add_argument("--sample-wait", type=int, metavar="N",
                   help="intervals a step waits for --min-requests before it is inconclusive (default 3)")
    p.add_argument("--force", action="store_true", help="skip the readiness and check-command gates")
    p.add_argument("--wait", action="store_true", help="follow the rollout live until it ends (or pauses "
                   "inconclusive: exit 4)")
    _common(p)
    p.set_defaults(func=_entry(cmd_start))

    p = csub.add_parser("status", help="each rollout: progress, step, last analysis")
    p.add_argument("route", nargs="?")
    _common(p)
    p.set_defaults(func=_entry(cmd_status))

    for action, text in (("pause", "stop stepping (traffic stays where it is)"),
                         ("resume", "continue a paused rollout from its current step"),
                         ("abort", "roll back now: the canary to 0%%, the baselines restored"),
                         ("promote", "skip the remaining steps: the canary to 100%% now")):
        p = csub.add_parser(action, help=text)
        p.add_argument("route")
        p.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
        _common(p)
        p.set_defaults(func=_entry(cmd_action), action=action)

    p = sub.add_parser("drain", help="move new sessions of a sticky route to another version; old ones stay",
                       description="Give VERSION --to the weight of VERSION --from; sessions carrying an "
                       "assignment cookie for --from stay on it. Reports --from drained once it served no "
                       "session request for --quiet.")
    p.add_argument("route")
    p.add_argument("--from", dest="old", metavar="VERSION", help="the version to drain")
    p.add_argument("--to", dest="new", metavar="VERSION", help="the version new sessions go to")
    p.add_argument("--quiet", type=duration, metavar="DURATION",
                   help="no session traffic for this long counts as drained (default 120s)")
    p.add_argument("--force", action="store_true", help="skip the readiness and check-command gates")
    p.add_argument("--wait", action="store_true", help="follow the drain until it is drained")
    p.add_argument("--status", action="store_true", help="show the route's drain instead of starting one")
    p.add_argument("--cancel", action="store_true", help="stop watching the drain (the split stays)")
    _common(p)
    p.set_defaults(func=_entry(cmd_drain))


def _entry(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        name = f"turnout {args.command}" + (f" {args.canary_command}" if getattr(args, "canary_command", None) else "")
        try:
            return command(args, AdminClient(args.admin, client_token(args.token_file)))
        except (UsageError, TokenFileError) as e:
            code = 2
            failure: Exception = e
        except ProblemError as e:
            code = 1
            failure = e
        except UnreachableError as e:
            code = 3
            failure = e
        if getattr(args, "json", False):
            # One problem document on stdout, as for the other commands' --json.
            print(json.dumps(problem_document(failure), indent=2))
        elif isinstance(failure, ProblemError):
            print(f"error: {failure}", file=sys.stderr)
            for path, message in failure.errors:
                print(f"  {path}: {message}" if path else f"  {message}", file=sys.stderr)
        else:
            print(f"{name}: {failure}", file=sys.stderr)
        return code

    return run


def _path(*parts: str) -> str:
    return API + "".join("/" + quote(p, safe="") for p in parts)


def _text(args: argparse.Namespace, data: Any) -> str:
    return json.dumps(data) if args.json else str(data.get("text", ""))


def _show(args: argparse.Namespace, data: Any) -> None:
    print(json.dumps(data, indent=2) if args.json else data.get("text", ""))


def cmd_start(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"to": args.to}
    for key in ("steps", "interval", "max_error_rate", "max_p99_ratio", "min_requests", "prometheus",
                "sample_wait"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.checks:
        rules: dict[str, dict[str, str]] = {}
        for metric, side, bound in args.checks:
            rules.setdefault(metric, {"metric": metric})[side] = bound
        body["checks"] = list(rules.values())
    if args.force:
        body["force"] = True
    client.timeout = START_TIMEOUT
    reply = client.request("POST", _path("canary", args.route), body)
    _show(args, reply.data)
    if not args.wait:
        return 0
    return follow(client, _path("canary", args.route), float(reply.data["config"]["interval"]), args.json,
                  shown=_text(args, reply.data))


def cmd_status(args: argparse.Namespace, client: AdminClient) -> int:
    if args.route:
        _show(args, client.get(_path("canary", args.route)).data)
        return 0
    data = client.get(_path("canary")).data
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rollouts = data.get("rollouts") or []
    if not rollouts:
        print("no rollouts")
    for r in rollouts:
        print(r["text"])
    if not data.get("driven", True):
        print("note: no canary controller runs in this proxy process; running rollouts do not advance")
    return 0


def cmd_action(args: argparse.Namespace, client: AdminClient) -> int:
    reply = client.request("POST", _path("canary", args.route, args.action))
    _show(args, reply.data)
    return 0


def cmd_drain(args: argparse.Namespace, client: AdminClient) -> int:
    path = _path("drains", args.route)
    if args.status:
        _show(args, client.get(path).data)
        return 0
    if args.cancel:
        _show(args, client.request("DELETE", path).data)
        return 0
    if not args.old or not args.new:
        raise UsageError("give --from VERSION and --to VERSION (or --status / --cancel)")
    body: dict[str, Any] = {"from": args.old, "to": args.new}
    if args.quiet is not None:
        body["quiet"] = args.quiet
    if args.force:
        body["force"] = True
    client.timeout = START_TIMEOUT
    reply = client.request("POST", path, body)
    _show(args, reply.data)
    if not args.wait:
        return 0
    return follow(client, path, float(reply.data["quiet"]), args.json, shown=_text(args, reply.data))


def follow(client: AdminClient, path: str, interval: float, as_json: bool,
           out: Any = None, poll: float | None = None, shown: str = "") -> int:
    """Print the record at `path` as it changes until it reaches a final status; live in a terminal.

    `shown` is what the caller already printed (the start command's answer), redrawn over, not repeated.
    """
    out = out or sys.stdout
    live = out.isatty() and not as_json
    period = poll if poll is not None else min(POLL_MAX, max(0.05, interval / 4))
    last = shown
    drawn = shown.count("\n") + 1 if shown else 0
    while True:
        data = client.get(path).data
        text = json.dumps(data) if as_json else str(data.get("text", ""))
        if text != last:
            if live and drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")  # back to the first line drawn, clear to the end
            out.write(text + "\n")
            out.flush()
            drawn = text.count("\n") + 1
            last = text
        status = data.get("status")
        if status in FINAL_OK:
            return 0
        if status == "paused" and data.get("pause_cause") == "inconclusive":
            return PAUSED_INCONCLUSIVE
        if status in FINAL_BAD:
            return 1
        time.sleep(period)
