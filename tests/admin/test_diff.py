"""Comparing revisions through the admin API and the CLI: `GET /api/v1/revisions/A/diff/B`, `turnout diff`
and `turnout history --diff`, against a live admin app on a real socket."""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxy.store.sqlite import SQLiteStore
from tests.admin.conftest import Admin
from tests.admin.test_cli import Cli, cli, routes_file, token_file

__all__ = ["cli", "routes_file", "token_file"]  # fixtures shared with test_cli


async def test_diff_between_two_revisions_and_back(admin: Admin) -> None:
    await admin.seed()  # 1-4: v1, v2, v3, route web
    await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 10})  # 5
    await admin.call("PUT", "/api/v1/routes/web/pins/acme", {"version": "v2"})  # 6
    r = await admin.call("GET", "/api/v1/revisions/4/diff/6")
    assert r.status == 200
    assert (r.body["from"]["revision"], r.body["to"]["revision"], r.body["changed"]) == (4, 6, True)
    assert r.body["to"]["summary"] == "pin web: acme -> v2"
    [web] = r.body["routes"]
    assert web["split"]["changes"] == [{"version": "v2", "before": None, "after": 10.0}]
    assert web["pins"] == {"before": 0, "after": 1, "added": 1, "removed": 0, "changed": 0, "examples": {
        "added": [{"client": "acme", "version": "v2"}], "removed": [], "changed": []}}
    assert (web["fields"], r.body["versions"]) == ({}, [])
    # Backwards: what a rollback to 4 would apply.
    back = await admin.call("GET", "/api/v1/revisions/6/diff/4")
    assert back.body["routes"][0]["split"]["changes"] == [{"version": "v2", "before": 10.0, "after": None}]
    assert back.body["routes"][0]["pins"]["removed"] == 1
    assert [re.split(r"\s{2,}", line) for line in back.body["text"].splitlines()] == [
        ["ROUTE", "WHAT", "BEFORE", "AFTER"], ["web", "weight v2", "10", "-"], ["web", "pins", "1", "0 (+0 -1 ~0)"],
        ["web", "pin acme", "v2", "-"]]
    # From the empty state: everything is added.
    genesis = await admin.call("GET", "/api/v1/revisions/0/diff/1")
    assert genesis.body["versions"] == [{"version": "v1", "change": "added", "before": None,
                                         "after": {"kind": "static", "endpoints": ["http://127.0.0.1:9001"]}}]
    same = await admin.call("GET", "/api/v1/revisions/5/diff/5")
    assert (same.body["changed"], same.body["routes"], same.body["text"]) == (False, [], "no differences")


async def test_diff_of_unknown_compacted_or_malformed_revisions(admin: Admin) -> None:
    store = admin.ctx.store
    assert isinstance(store, SQLiteStore)
    store.keep = 2
    await admin.seed()
    for client in ("a", "b", "c"):  # 5, 6, 7
        await admin.call("PUT", f"/api/v1/routes/web/pins/{client}", {"version": "v2"})
    await store.gc()
    gone = await admin.call("GET", "/api/v1/revisions/5/diff/7")
    assert (gone.status, gone.body["detail"]) == (
        404, "revision 5 was compacted: only the newest revisions' states are kept (its history line remains)")
    future = await admin.call("GET", "/api/v1/revisions/6/diff/99")
    assert (future.status, future.body["detail"]) == (404, "no revision 99")
    bad = await admin.call("GET", "/api/v1/revisions/x/diff/7")
    assert (bad.status, bad.body["detail"]) == (400, "expected a whole number of at most 18 digits, got 'x'")
    kept = await admin.call("GET", "/api/v1/revisions/6/diff/7")
    assert kept.body["routes"][0]["pins"]["examples"]["added"] == [{"client": "c", "version": "v2"}]
    anonymous = await admin.call("GET", "/api/v1/revisions/6/diff/7", token=None)
    assert anonymous.status == 401


async def test_cli_diff_and_history_diff(cli: Cli, routes_file: Path) -> None:
    await cli("apply", str(routes_file))  # 1
    await cli("split", "web", "v1=90", "v2=10")  # 2
    r = await cli("diff", "1", "2")
    assert (r.code, r.out.splitlines()) == (0, [
        "revision 1 -> 2",
        "ROUTE  WHAT       BEFORE  AFTER",
        "web    weight v1  100     90",
        "web    weight v2  -       10",
    ])
    j = await cli("diff", "2", "1", "--json")
    assert json.loads(j.out)["routes"][0]["split"]["after"] == {"v1": 100.0}
    missing = await cli("diff", "1", "9")
    assert (missing.code, missing.err.splitlines()[0]) == (1, "error: Not found (404): no revision 9")
    h = await cli("history", "--diff")
    lines = h.out.splitlines()
    assert lines[0].split() == ["REV", "TIME", "(UTC)", "ACTOR", "SUMMARY", "REASON"]
    assert lines[1].split()[0] == "2"
    assert lines[2:5] == ["    ROUTE  WHAT       BEFORE  AFTER", "    web    weight v1  100     90",
                          "    web    weight v2  -       10"]
    assert lines[5].split()[0] == "1"
    assert lines[6:8] == ["    ROUTE  WHAT         BEFORE  AFTER", "    web    route added"]
    hj = await cli("history", "--diff", "--json", "--limit", "1")
    assert json.loads(hj.out)["revisions"][0]["diff"]["routes"][0]["split"]["changes"][1] == {
        "version": "v2", "before": None, "after": 10.0}
