"""The status page in real headless Chromium: token prompt, live numbers under traffic, roll back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import pytest

from tests.observability.cdp import chromium_page
from tests.observability.conftest import EP, TOKEN, Admin, traffic

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The picture in the docs is refreshed only on request (TURNOUT_UPDATE_DOCS=1): a test run never changes a
# tracked file.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"


async def fake_traffic(admin: Admin) -> None:
    """Roughly 200 req/s on `web` (v1 mostly, v2 with some 5xx), 40 on `api`, until cancelled."""
    s = admin.ctx.stats
    tick = 0
    while True:
        traffic(s, "web", "v1", 18, duration=0.004)
        traffic(s, "web", "v1", 1, duration=0.09)
        traffic(s, "web", "v2", 2, duration=0.012)
        if tick % 5 == 0:
            traffic(s, "web", "v2", 1, status=503, duration=0.2)
            s.fallback("web", "v2", "v1")
        traffic(s, "web", "v3", 1, duration=0.006)
        traffic(s, "api", "v1", 4, duration=0.002)
        s.connection("downstream", 1 if tick < 30 else 0)
        tick += 1
        await asyncio.sleep(0.1)


def q(route: str, version: str, cell: str) -> str:
    return (f"document.querySelector('.route[data-route=\"{route}\"] .version-row[data-version=\"{version}\"] "
            f".{cell}')?.textContent")


async def test_status_page_live_numbers_and_rollback(admin: Admin, tmp_path: Path) -> None:
    await admin.seed()  # revisions 1-6; the web route is v1=90 v2=10 since revision 4
    admin.health["v2"][EP["v2"]] = True  # the admin API refuses weight for an unhealthy version
    r = await admin.call("PATCH", "/api/v1/routes/web/split", {"v1": 50, "v2": 50},
                         headers={"X-Turnout-Reason": "canary v2 to half"})
    assert r.status == 200, r.body  # revision 7
    admin.health["v2"][EP["v2"]] = False  # ... and then v2's only endpoint goes down
    load = asyncio.get_running_loop().create_task(fake_traffic(admin))
    try:
        async with chromium_page(tmp_path / "profile") as page:
            await page.send("Page.navigate", url=admin.url + "/ui")
            await page.wait_for("document.getElementById('login').classList.contains('show')")
            await page.click("#token-input")
            await page.type(TOKEN)
            await page.click("#token-submit")

            # Versions and the configured split appear.
            await page.wait_for("document.querySelectorAll('.route').length === 2")
            names = await page.eval("[...document.querySelectorAll('.route[data-route=\"web\"] .version-row')]"
                                    ".map(e => e.dataset.version)")
            assert names == ["v1", "v2", "v3"]
            shares = await page.eval("[...document.querySelectorAll('.route[data-route=\"web\"] .split-bar .seg')]"
                                     ".map(e => [e.dataset.version, e.style.width])")
            assert shares == [["v1", "50%"], ["v2", "50%"]]
            assert await page.eval("document.querySelector('.route[data-route=\"web\"] .pins').dataset.pins") == "1"
            assert await page.eval(q("web", "v1", "eps")) == "1/1"
            assert await page.eval(q("web", "v2", "eps")) == "0/1"
            assert await page.eval("document.getElementById('h-revision').textContent") == "7"

            # Live numbers: a rate appears and the totals keep growing under traffic.
            await page.wait_for(f"parseFloat({q('web', 'v1', 'rps')}) > 0")
            first = int((await page.eval(q("web", "v1", "total"))).replace(",", ""))
            await page.wait_for(f"parseInt({q('web', 'v1', 'total')}.replace(/,/g, '')) > {first}")
            await page.wait_for(f"{q('web', 'v2', 'err')}.endsWith('%') && {q('web', 'v2', 'err')} !== '0%'")
            await page.wait_for(f"{q('web', 'v1', 'p99')}.endsWith('ms')")

            # The token lives in this tab's sessionStorage only.
            stored = await page.eval("[sessionStorage.getItem('turnout.admin.token'), localStorage.length, "
                                     "document.cookie]")
            assert stored == [TOKEN, 0, ""]

            # History shows revision 7 as serving; roll `web` back to revision 6 (v1=90 v2=10, one pin).
            await page.wait_for("!!document.querySelector('.rev[data-revision=\"7\"] .rev-cur')")
            await asyncio.sleep(3)  # let the sparkline and rates fill in for the screenshot
            shot = DOCS_SCREENSHOT if os.environ.get("TURNOUT_UPDATE_DOCS") == "1" else tmp_path / "status-page.png"
            await page.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            button = '.rev[data-revision="6"] button.rollback[data-route="web"]'
            await page.wait_for(f"!!document.querySelector({json.dumps(button)})")
            await page.click(button)
            assert (await admin.call("GET", "/api/v1/revisions?limit=1")).body["revisions"][0]["revision"] == 7
            await page.click(button)  # the second click confirms
            await page.wait_for("document.getElementById('h-revision').textContent === '8'")
            await page.wait_for("[...document.querySelectorAll('.route[data-route=\"web\"] .split-bar .seg')]"
                                ".map(e => e.style.width).join() === '90%,10%'")

        route = await admin.call("GET", "/api/v1/routes/web")
        assert route.body["split"] == {"v1": 90, "v2": 10}
        newest = (await admin.call("GET", "/api/v1/revisions?limit=1")).body["revisions"][0]
        assert (newest["revision"], newest["actor"], newest["reason"]) == (8, "ops", "rolled back from the status page")
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load


TOKEN_WHERE = ("It is in the file admin-token in the state directory of turnout serve (--state-dir or "
               "$TURNOUT_STATE_DIR, default ~/.local/state/turnout), unless the proxy was given "
               "--admin-token-file or $TURNOUT_ADMIN_TOKEN.")


async def test_sticky_badge_only_with_an_identity_source_and_login_names_the_token_file(
        admin: Admin, tmp_path: Path) -> None:
    await admin.seed()  # `web` has an identity source (X-Client-Id); `api` has none, so nothing can stick
    async with chromium_page(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=admin.url + "/ui")
        await page.wait_for("document.getElementById('login').classList.contains('show')")
        where = await page.eval("document.getElementById('token-where').textContent.replace(/\\s+/g, ' ')")
        assert where == TOKEN_WHERE
        await page.click("#token-input")
        await page.type(TOKEN)
        await page.click("#token-submit")
        await page.wait_for("document.querySelectorAll('.route').length === 2")
        chips = await page.eval("Object.fromEntries([...document.querySelectorAll('.route')].map(r => "
                                "[r.dataset.route, r.querySelector('.chip.assign').textContent]))")
        assert chips == {"web": "sticky", "api": "per request"}
