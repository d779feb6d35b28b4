"""The operator CLI end to end: `proxy.cli.main([...])` in a thread against a live admin app."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import COMMAND_MODULES, main
from proxy.commands.client import AdminClient
from proxy.commands.operate import cmd_history, split_bar
from tests.admin.conftest import ALICE, BOB, EP1, EP2, Admin

ROUTES = f"""
versions:
  v1: {{endpoints: ["{EP1}"]}}
  v2: {{endpoints: ["{EP2}"]}}
routes:
  - name: web
    identity: [{{header: X-Client-Id}}]
    split: {{v1: 100}}
    fallback: [v1]
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    f = tmp_path / "alice.token"
    f.write_text(f"alice:{ALICE}\n")
    return f


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    f = tmp_path / "routes.yaml"
    f.write_text(ROUTES)
    return f


class Cli:
    def __init__(self, admin: Admin, token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.admin = admin
        self.token_file = token_file
        self.capsys = capsys

    async def __call__(self, *argv: str, auth: bool = True) -> Result:
        args = [*argv, "--admin", self.admin.url]
        if auth:
            args += ["--token-file", str(self.token_file)]
        self.capsys.readouterr()
        # The server runs on this event loop; the blocking CLI must not.
        code = await asyncio.to_thread(main, args)
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def cli(admin: Admin, token_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(admin, token_file, capsys)


def test_ops_commands_are_registered() -> None:
    assert "proxy.commands.operate" in COMMAND_MODULES


async def test_apply_then_status(cli: Cli, routes_file: Path) -> None:
    r = await cli("apply", str(routes_file), "--reason", "first deploy")
    assert (r.code, r.out) == (0, "revision 1: apply file: 1 route(s) +v1,v2\n")
    again = await cli("apply", str(routes_file))
    assert (again.code, again.out) == (0, "no change (revision 1)\n")
    cli.admin.health.update({"v1": {EP1: True}})
    await cli("split", "web", "v1=75", "v2=25")
    await cli("pin", "web", "acme", "v2")
    status = await cli("status")
    assert status.code == 0
    assert status.out.splitlines() == [
        "revision 3 (1 route(s), 2 version(s)); data plane at revision 3",
        "",
        "route web: any host, prefix /, sticky on, 1 pin(s), fallback v1",
        "  VERSION  WEIGHT  SHARE  PINS  HEALTHY",
        "  v1       75      75.0%  0     1/1",
        "  v2       25      25.0%  1     ?/1",
        "  [" + "#" * 38 + "=" * 12 + "] # v1 75%  = v2 25%",
    ]


async def test_split_pin_unpin_and_history(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))
    r = await cli("split", "web", "v1=90", "v2=10", "--reason", "canary v2")
    assert (r.code, r.out) == (0, "revision 2: split web: v1=100 -> v1=90 v2=10\n")
    r = await cli("pin", "web", "acme", "v2", "--reason", "acme asked")
    assert (r.code, r.out) == (0, "revision 3: pin web: acme -> v2\n")
    r = await cli("unpin", "web", "acme")
    assert (r.code, r.out) == (0, "revision 4: unpin web: acme\n")
    h = await cli("history", "web", "--limit", "3")
    lines = h.out.splitlines()
    assert lines[0].split() == ["REV", "TIME", "(UTC)", "ACTOR", "SUMMARY", "REASON"]
    assert [line.split()[0] for line in lines[1:]] == ["4", "3", "2"]
    assert re.split(r"\s{2,}", lines[2])[2:] == ["alice", "pin web: acme -> v2", "acme asked"]
    as_json = await cli("history", "--json", "--limit", "1")
    assert json.loads(as_json.out)["revisions"][0]["summary"] == "unpin web: acme"


async def test_rollback_commands(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))  # 1
    await cli("split", "web", "v2=50")  # 2
    await cli("split", "web", "v1=0")  # 3
    r = await cli("rollback", "web", "--reason", "v2 is failing")
    assert (r.code, r.out) == (0, "revision 4: rollback web to revision 2: v1=100 v2=50\n")
    r = await cli("rollback", "web", "--to", "1")
    assert (r.code, r.out) == (0, "revision 5: rollback web to revision 1: v1=100\n")
    assert cli.admin.ctx.holder.table.revision == 5


async def test_versions_command(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))
    r = await cli("versions")
    lines = r.out.splitlines()
    assert lines[0].split() == ["VERSION", "KIND", "HEALTHY", "INSTANCES", "CREATED", "(UTC)", "ROUTES", "CHECK",
                                "(UTC)", "IMAGE", "/", "COMMAND"]
    # This test's proxy reports no health yet: 0 of the version's 1 instance is known healthy; no checks.
    assert [line.split()[:4] + line.split()[6:] for line in lines[1:]] == [
        ["v1", "static", "0/1", EP1, "web", "-"], ["v2", "static", "0/1", EP2, "-", "-"]]
    data = json.loads((await cli("versions", "--json")).out)
    assert [v["name"] for v in data["versions"]] == ["v1", "v2"]


async def test_api_errors_print_field_paths_and_exit_1(cli: Cli, routes_file: Path, tmp_path: Path) -> None:
    await cli("apply", str(routes_file))
    r = await cli("split", "web", "v9=10")
    assert (r.code, r.out) == (1, "")
    assert r.err == "error: Invalid request body (422): 1 error(s); nothing was changed\n  v9: unknown version 'v9'\n"
    stale = await cli("pin", "web", "acme", "v2", "--if-match", "0")
    assert stale.code == 1
    assert stale.err.splitlines()[-1] == "  (the current revision is 1)"
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROUTES.replace("v1: 100", "v3: 100"))
    r = await cli("apply", str(bad))
    assert r.code == 1
    assert r.err == (f"{bad}: routes[0].split.v3: unknown version 'v3'\n"
                     f"{bad}: 1 error(s); nothing applied\n")
    assert await cli.admin.revision() == 1


async def test_usage_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    r = await cli("split", "web", "v1:10")
    assert (r.code, r.err) == (2, "turnout split: expected VERSION=WEIGHT with a weight >= 0, got 'v1:10'\n")
    r = await cli("apply", str(tmp_path / "missing.yaml"))
    assert (r.code, r.err) == (2, f"turnout apply: {tmp_path / 'missing.yaml'}: No such file or directory\n")


async def test_wrong_or_missing_token(cli: Cli, tmp_path: Path) -> None:
    r = await cli("status", auth=False)
    assert r.code == 1
    assert r.err.startswith("error: Missing or wrong token (401)")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    r = await cli("pin", "web", "acme", "v2", "--token-file", str(wrong), auth=False)
    assert r.code == 1 and await cli.admin.revision() == 0


async def test_token_from_the_default_state_dir(cli: Cli, routes_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "state-dir"  # TURNOUT_STATE_DIR, set by the autouse fixture
    state_dir.mkdir()
    (state_dir / "admin-token").write_text(BOB + "\n")
    r = await cli("apply", str(routes_file), auth=False)
    assert r.code == 0
    hist = await cli.admin.call("GET", "/api/v1/revisions")
    assert hist.body["revisions"][0]["actor"] == "bob"
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "nope")
    assert (await cli("status", auth=False)).code == 1


async def test_unreachable_admin_exits_3(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = await asyncio.to_thread(main, ["status", "--admin", f"127.0.0.1:{port}"])
    err = cli.capsys.readouterr().err
    assert code == 3
    assert err.startswith(f"turnout status: cannot reach the admin API at http://127.0.0.1:{port}:")


async def test_apply_dry_run(cli: Cli, routes_file: Path) -> None:
    r = await cli("apply", str(routes_file), "--dry-run")
    assert (r.code, r.out) == (0, "dry run at revision 0: apply file: 1 route(s) +v1,v2\n")
    assert await cli.admin.revision() == 0


@pytest.mark.parametrize(("split", "bar"), [
    ([("v1", 90), ("v2", 10)], "[" + "#" * 45 + "=" * 5 + "] # v1 90%  = v2 10%"),
    ([("a", 1), ("b", 1), ("c", 1)], "[" + "#" * 17 + "=" * 17 + "*" * 16 + "] # a 33.33%  = b 33.33%  * c 33.33%"),
    ([("v1", 999), ("v2", 1)], "[" + "#" * 49 + "=] # v1 99.9%  = v2 0.1%"),
    ([("v1", 100), ("v2", 0)], "[" + "#" * 50 + "] # v1 100%  = v2 0%"),
])
def test_split_bar(split: list[tuple[str, float]], bar: str) -> None:
    assert split_bar(split) == bar


async def test_cli_as_a_separate_process(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))
    root = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "split", "web", "v2=5", "--reason", "from a shell",
        "--admin", cli.admin.url, "--token-file", str(cli.token_file),
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out.decode(), err.decode()) == (0, "revision 2: split web: v1=100 -> v1=100 v2=5\n", "")
    assert cli.admin.ctx.holder.table.revision == 2


def test_client_repr_and_host_port_spelling() -> None:
    assert repr(AdminClient("127.0.0.1:9", "t")) == "<AdminClient http://127.0.0.1:9 [token: set]>"
    assert repr(AdminClient("http://[::1]:9/", None)) == "<AdminClient http://[::1]:9 [token: none]>"


async def test_pin_to_a_version_whose_check_fails_is_refused_unless_forced(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))  # 1
    failing = [sys.executable, "-c", "print('CVE-2026-0001 critical'); raise SystemExit(3)"]
    r4 = await cli.admin.call("PUT", "/api/v1/versions/v4", {"endpoints": ["http://127.0.0.1:9004"], "check": failing})
    assert r4.status == 201  # 2
    r = await cli("pin", "web", "bob", "v4")
    assert r.code == 1
    assert r.err.startswith("error: Conflicts with the current state (409): check v4: FAILED (exit 3, ")
    assert r.err.endswith("s): CVE-2026-0001 critical (version gets no traffic until its check passes)\n")
    assert "bob" not in (await cli.admin.call("GET", "/api/v1/routes/web")).body.get("pins", {})
    r = await cli("pin", "web", "bob", "v4", "--force")
    assert (r.code, r.out) == (0, "revision 5: pin web: bob -> v4\n")  # 3 and 4: the two verdicts


async def test_json_errors_are_problem_documents_on_stdout(cli: Cli, routes_file: Path, tmp_path: Path) -> None:
    """Under --json every failure is one JSON problem document on stdout (nothing on stderr), and the exit
    status is the same as without --json: 1 refused, 2 bad usage or token file, 3 unreachable."""
    await cli("apply", str(routes_file))
    r = await cli("split", "web", "v9=10", "--json")
    assert (r.code, r.err) == (1, "")
    assert json.loads(r.out) == {"type": "urn:turnout:problem:invalid", "title": "Invalid request body",
                                 "status": 422, "detail": "1 error(s); nothing was changed",
                                 "errors": [{"path": "v9", "message": "unknown version 'v9'"}]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROUTES.replace("v1: 100", "v3: 100"))
    r = await cli("apply", str(bad), "--json")
    assert (r.code, r.err) == (1, "")
    assert json.loads(r.out)["errors"] == [{"path": "routes[0].split.v3", "message": "unknown version 'v3'"}]
    r = await cli("split", "web", "v1:10", "--json")
    assert (r.code, r.err) == (2, "")
    assert json.loads(r.out) == {"type": "urn:turnout:problem:usage", "title": "Bad usage",
                                 "detail": "expected VERSION=WEIGHT with a weight >= 0, got 'v1:10'", "errors": []}
    r = await cli("status", "--json", "--token-file", str(tmp_path / "nope"), auth=False)
    assert (r.code, r.err) == (2, "")
    assert json.loads(r.out) == {"type": "urn:turnout:problem:usage", "title": "Bad usage",
                                 "detail": f"{tmp_path / 'nope'}: No such file or directory", "errors": []}
    r = await cli("canary", "status", "web", "--json")
    assert (r.code, r.err) == (1, "")
    assert json.loads(r.out)["status"] == 404
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = await asyncio.to_thread(main, ["status", "--json", "--admin", f"127.0.0.1:{port}"])
    out, err = cli.capsys.readouterr()
    assert (code, err) == (3, "")
    doc = json.loads(out)
    assert (doc["type"], doc["title"]) == ("urn:turnout:problem:unreachable", "Admin API unreachable")
    assert doc["detail"].startswith(f"cannot reach the admin API at http://127.0.0.1:{port}:")


async def test_history_of_an_unknown_route_exits_1(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))
    r = await cli("history", "nosuch")
    assert (r.code, r.out, r.err) == (
        1, "", "error: Not found (404): no route named 'nosuch' now or in any revision\n")
    # A route that existed once still has its history.
    gone = routes_file.parent / "gone.yaml"
    gone.write_text(ROUTES.replace("  - name: web", "  - name: www"))
    await cli("apply", str(gone))
    h = await cli("history", "web")
    assert (h.code, [line.split()[0] for line in h.out.splitlines()[1:]]) == (0, ["2", "1"])


def test_unknown_command_does_not_list_the_internal_worker() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "proxy", "bogus"], cwd=root, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines()[-1] == (
        "turnout: error: argument COMMAND: invalid choice: 'bogus' (choose from 'serve', 'demo', 'check', "
        "'status', 'split', 'pin', 'unpin', 'rollback', 'history', 'apply', 'versions', 'diff', 'check-version', "
        "'export', 'deploy', 'scale', 'retire', 'docker-versions', 'canary', 'drain')")


def _run_cli(*argv: str) -> tuple[int, str, str]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "proxy", *argv], cwd=root, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_json_usage_errors_from_the_parser_are_problem_documents() -> None:
    code, out, err = _run_cli("history", "--limit", "many", "--json")
    assert (code, err) == (2, "")
    assert json.loads(out) == {"type": "urn:turnout:problem:usage", "title": "Bad usage",
                               "detail": "turnout history: argument --limit: invalid int value: 'many'",
                               "errors": []}
    code, out, err = _run_cli("history", "--limit", "many")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == "turnout history: error: argument --limit: invalid int value: 'many'"


async def test_status_says_sticky_only_with_an_identity_source(cli: Cli, routes_file: Path) -> None:
    both = routes_file.parent / "both.yaml"
    both.write_text(ROUTES + "  - name: api\n    match: {path_prefix: /api}\n    split: {v1: 100}\n")
    await cli("apply", str(both))
    lines = (await cli("status")).out.splitlines()
    assert [line for line in lines if line.startswith("route ")] == [
        "route web: any host, prefix /, sticky on, 0 pin(s), fallback v1",
        "route api: any host, prefix /api, sticky off (no identity source), 0 pin(s)",
    ]


async def test_status_shows_matches_filters_timeouts_and_retry(cli: Cli, routes_file: Path) -> None:
    gw = routes_file.parent / "gw.yaml"
    gw.write_text(ROUTES + """  - name: api
    matches:
      - {host: shop.example.com, path: {type: Exact, value: /cart}, method: GET,
         headers: [{name: X-Build, value: "^v[0-9]+$", type: RegularExpression}], query: {debug: "1"}}
      - {path_prefix: /api}
    filters:
      request_headers: {set: {X-A: "1"}, remove: [X-C]}
      rewrite: {hostname: api.internal, path: {type: ReplaceFullPath, value: /v2}}
    version_filters: {v2: {response_headers: {remove: [X-Debug]}}}
    timeouts: {request: 10, backend_request: 2.5}
    retry: {attempts: 2, codes: [502, 503], backoff: 0.1}
    split: {v1: 100}
""")
    applied = await cli("apply", str(gw))
    assert applied.code == 0, applied.err
    lines = (await cli("status")).out.splitlines()
    start = lines.index("route api: 2 matches, sticky off (no identity source), 0 pin(s)")
    assert lines[start + 1:start + 9] == [
        "  match 0: host shop.example.com, path Exact /cart, method GET, headers x-build~^v[0-9]+$, query debug=1",
        "  match 1: any host, prefix /api",
        "  request headers: set X-A=1, remove X-C",
        "  rewrite: host api.internal, path ReplaceFullPath /v2",
        "  version v2 response headers: remove X-Debug",
        "  timeouts: request 10s, backend_request 2.5s",
        "  retry: 2 attempt(s) on 502 503, backoff 0.1s",
        "  VERSION  WEIGHT  SHARE   PINS  HEALTHY",
    ]


# History text is attacker-influenced (any token holder writes reasons).


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
