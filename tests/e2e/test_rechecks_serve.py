"""`turnout serve --check-interval` as a real process: the re-check schedule runs in the supervisor; a live
version whose check starts failing is flagged and, with on_check_fail: shift, its traffic moves to the
fallback (real backends, real requests); `check-version` unflags it once it passes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.e2e.helpers import Turnout, backend, http, wait_until


def version_of(url: str) -> str:
    status, _, body = http("GET", url + "/")
    assert status == 200, body
    return str(json.loads(body)["version"])


def test_a_failing_re_check_shifts_a_live_version_to_its_fallback(tmp_path: Path) -> None:
    bad = tmp_path / "vulnerable"
    with backend("v1") as p1, backend("v2") as p2:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
versions:
  v1: {{endpoints: ["http://127.0.0.1:{p1}"]}}
  v2:
    endpoints: ["http://127.0.0.1:{p2}"]
    check: ["sh", "-c", "if [ -e '{bad}' ]; then echo 'CVE-2026-0003 critical'; exit 2; fi; echo clean"]
    on_check_fail: shift
routes:
  - name: web
    split: {{v1: 50, v2: 50}}
    sticky: false
    fallback: [v1]
""")
        with Turnout(tmp_path, str(routes), "--check-interval", "0.5") as t:
            assert set(Counter(version_of(t.url) for _ in range(20))) == {"v1", "v2"}
            bad.touch()

            def shifted() -> bool:
                _, route = t.api("GET", "/api/v1/routes/web")
                return bool(route["split"] == {"v1": 100, "v2": 0})

            wait_until(shifted, timeout=20)
            assert Counter(version_of(t.url) for _ in range(20)) == {"v1": 20}
            _, history = t.api("GET", "/api/v1/revisions?route=web&limit=2")
            shift, event = history["revisions"]
            assert (shift["actor"], shift["summary"]) == ("check", "shift v2 to fallback: web: 50 weight to v1")
            assert event["actor"] == "check" and event["summary"].endswith(
                "CVE-2026-0003 critical; receives traffic on web; flagged: gains no weight or pins until a check "
                "passes")
            _, v2 = t.api("GET", "/api/v1/versions/v2")
            assert (v2["check"]["ok"], v2["check"]["flagged"], v2["check"]["next"]) == (False, True, None)
            _, _, metrics = http("GET", t.admin + "/metrics")
            assert 'turnout_version_check_failed{version="v2"} 1.0' in metrics.decode().splitlines()
            status, body = t.api("PATCH", "/api/v1/routes/web/split", {"v2": 10})
            assert status == 409, body
            bad.unlink()
            status, body = t.api("POST", "/api/v1/versions/v2/check")
            assert (status, body["check"]["ok"], body["check"]["flagged"]) == (200, True, False)
            status, body = t.api("PATCH", "/api/v1/routes/web/split", {"v2": 10})
            assert status == 200, body
