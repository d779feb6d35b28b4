"""Zones on the status API and page: per version the healthy endpoints per zone, each zone's planned share
of this proxy's traffic, and the share leaving its zone (planned, and measured from upstream attempts)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.settings import Settings
from tests.observability.cdp import chromium_page
from tests.observability.conftest import TOKEN, Admin, start_admin

EPS = {f"eu-1{z}-{i}": f"http://127.0.0.1:{9300 + 10 * n + i}" for n, z in enumerate("abc") for i in range(3)}


@pytest.fixture
async def zoned_admin(tmp_path: Path) -> AsyncIterator[Admin]:
    runner, adm, session, store = await start_admin(tmp_path, Settings(zone="eu-1a"))
    try:
        eps = [{"url": url, "zone": name.rsplit("-", 1)[0]} for name, url in EPS.items()]
        r = await adm.call("PUT", "/api/v1/versions/v1", {"endpoints": eps})
        assert r.status == 201, r.body
        r = await adm.call("PUT", "/api/v1/versions/v0", {"endpoints": ["http://127.0.0.1:9399"]})
        assert r.status == 201, r.body
        r = await adm.call("PUT", "/api/v1/routes/web", {"split": {"v1": 1, "v0": 0}})
        assert r.status == 201, r.body
        # Two of zone a's three endpoints are down.
        adm.health.update({"v1": {url: not name.startswith("eu-1a-") or name == "eu-1a-0"
                                  for name, url in EPS.items()},
                           "v0": {"http://127.0.0.1:9399": True}})
        yield adm
    finally:
        await session.close()
        await runner.cleanup()
        await store.close()


async def test_stats_give_zones_per_version_and_the_share_leaving_the_zone(zoned_admin: Admin) -> None:
    s = zoned_admin.ctx.stats
    for zone, n in (("eu-1a", 3), ("eu-1b", 2), ("eu-1c", 2)):
        for _ in range(n):
            s.zone_request("v1", zone)
    r = await zoned_admin.call("GET", "/api/v1/stats")
    assert r.status == 200
    versions = {v["name"]: v for v in r.body["versions"]}
    assert r.body["zone"] == "eu-1a"
    assert versions["v0"]["zones"] is None  # no endpoint with a zone
    assert versions["v1"]["zones"] == {
        "zones": [{"zone": "eu-1a", "endpoints": 3, "healthy": 1, "share": 0.428571},
                  {"zone": "eu-1b", "endpoints": 3, "healthy": 3, "share": 0.285714},
                  {"zone": "eu-1c", "endpoints": 3, "healthy": 3, "share": 0.285714}],
        "leaving": 0.571429, "leaving_measured": 0.571429}


@pytest.mark.browser
@pytest.mark.slow
async def test_status_page_shows_the_zones_card(zoned_admin: Admin, tmp_path: Path) -> None:
    async with chromium_page(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=zoned_admin.url + "/ui")
        await page.wait_for("document.getElementById('login').classList.contains('show')")
        await page.click("#token-input")
        await page.type(TOKEN)
        await page.click("#token-submit")
        await page.wait_for("!document.getElementById('zones-card').hidden")
        rows = await page.eval("[...document.querySelectorAll('.zone-version[data-version=\"v1\"] .zone-row')]"
                               ".map(r => [r.dataset.zone, r.querySelector('.zone-healthy').textContent, "
                               "r.querySelector('.zone-share').textContent])")
        assert rows == [["eu-1a", "1/3", "43%"], ["eu-1b", "3/3", "29%"], ["eu-1c", "3/3", "29%"]]
        leaving = await page.eval("document.querySelector('.zone-leaving[data-version=\"v1\"]').textContent")
        assert leaving == "leaving eu-1a: 57%"
        assert await page.eval("document.querySelectorAll('.zone-version').length") == 1
