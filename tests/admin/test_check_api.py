"""Re-checks through the admin API and the CLI: `POST /api/v1/versions/NAME/check`, the `check` object of
`GET /api/v1/versions` and `/api/v1/stats`, `turnout check-version`, `turnout versions`, and the gauge on
/metrics. Real check commands (sh) against a live admin app."""

from __future__ import annotations

import re
from pathlib import Path

from tests.admin.conftest import EP1, EP2, Admin
from tests.admin.test_cli import Cli, cli, token_file

__all__ = ["cli", "token_file"]  # fixtures shared with test_cli


async def seed(admin: Admin, bad: Path) -> None:
    check = ["sh", "-c", f'if [ -e "{bad}" ]; then echo "CVE-2026-0002 found"; exit 3; fi; echo clean']
    for name, ep, extra in (("v1", EP1, {}), ("v2", EP2, {"check": check})):
        r = await admin.call("PUT", f"/api/v1/versions/{name}", {"endpoints": [ep], **extra})
        assert r.status == 201, r.body
    r = await admin.call("PUT", "/api/v1/routes/web", {"split": {"v1": 90, "v2": 10}, "fallback": ["v1"]})
    assert r.status == 201, r.body  # the gate ran v2's check once: passed


async def test_check_now_flags_a_live_version_and_shows_it_everywhere(admin: Admin, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    await seed(admin, bad)
    listed = await admin.call("GET", "/api/v1/versions")
    checks = {v["name"]: v["check"] for v in listed.body["versions"]}
    assert checks["v1"] is None
    assert (checks["v2"]["ok"], checks["v2"]["flagged"]) == (True, False)
    assert checks["v2"]["next"] == checks["v2"]["time"] + 86400.0
    bad.touch()
    r = await admin.call("POST", "/api/v1/versions/v2/check")
    assert r.status == 200
    c = r.body["check"]
    assert (r.body["version"], c["ok"], c["flagged"], c["exit_code"]) == ("v2", False, True, 3)
    assert re.fullmatch(r"check v2: FAILED \(exit 3, \d+\.\ds\): CVE-2026-0002 found", c["summary"])
    one = await admin.call("GET", "/api/v1/versions/v2")
    assert one.body["check"]["flagged"] is True
    stats = await admin.call("GET", "/api/v1/stats")
    assert {v["name"]: (v["check"] or {}).get("flagged") for v in stats.body["versions"]} == {"v1": None, "v2": True}
    metrics = await admin.call("GET", "/metrics")
    assert 'turnout_version_check_failed{version="v2"} 1.0' in metrics.body.splitlines()
    more = await admin.call("PATCH", "/api/v1/routes/web/split", {"v2": 20})
    assert (more.status, more.body["detail"].startswith("check v2: FAILED")) == (409, True)
    history = await admin.call("GET", "/api/v1/revisions", params={"route": "web", "limit": "3"})
    assert [x["actor"] for x in history.body["revisions"]][:2] == ["alice", "alice"]
    assert history.body["revisions"][1]["summary"].endswith("receives traffic on web; flagged: gains no weight or "
                                                            "pins until a check passes")
    assert (await admin.call("POST", "/api/v1/versions/v1/check")).body["detail"] == "version 'v1' has no check command"
    assert (await admin.call("POST", "/api/v1/versions/nope/check")).status == 404


async def test_cli_check_version_and_versions(cli: Cli, admin: Admin, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    await seed(admin, bad)
    ok = await cli("check-version", "v2")
    assert ok.code == 0
    assert re.fullmatch(r"check v2: passed \(exit 0, \d+\.\ds\): clean  at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\n",
                        ok.out)
    bad.touch()
    failed = await cli("check-version", "v2")
    assert failed.code == 1
    assert failed.out.endswith(" UTC  FLAGGED (receives traffic, gains no more)\n")
    lines = (await cli("versions")).out.splitlines()
    cells = [re.split(r"\s{2,}", line) for line in lines]
    assert cells[0][6] == "CHECK (UTC)"
    assert (cells[1][6], cells[2][6].split()[0]) == ("-", "FLAGGED")
    missing = await cli("check-version", "v1")
    assert (missing.code, missing.err.splitlines()[0]) == (
        1, "error: Conflicts with the current state (409): version 'v1' has no check command")
