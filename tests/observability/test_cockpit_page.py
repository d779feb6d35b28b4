"""The status page's release views in real headless Chromium (tests/observability/cdp.py): rollouts (pause,
resume and abort clicked), drains, mirrors, the proxy's own answers and history diffs with the rollback
preview, read at 1280 px and at phone width (375 px).

Screenshots of each view go to docs/img/cockpit-<view>.png only with TURNOUT_UPDATE_DOCS=1: a test run never
changes a tracked file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.control.canary import CanaryController
from proxy.telemetry.metrics import aggregate
from tests.observability.cdp import Page, chromium_page
from tests.observability.conftest import EP, TOKEN, Admin, traffic

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NONE = "\u2013"  # the page's dash for "no value"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def shot_path(tmp: Path, name: str) -> Path:
    if os.environ.get("TURNOUT_UPDATE_DOCS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        return DOCS_IMG / f"cockpit-{name}.png"
    return tmp / f"cockpit-{name}.png"


async def shoot(page: Page, tmp: Path, name: str, max_height: int = 1400, start: str | None = None) -> None:
    """The page from its top (or from element `start`), no toast, at most `max_height` CSS pixels of it."""
    path = shot_path(tmp, name)
    await page.eval("window.scrollTo(0, 0); document.getElementById('notice').className = ''")
    await asyncio.sleep(0.4)  # the toast fades out
    width, height = await page.eval("[document.documentElement.clientWidth, document.documentElement.scrollHeight]")
    y = 0 if start is None else await page.eval(f"document.querySelector({json.dumps(start)})"
                                                ".getBoundingClientRect().top - 12")
    res = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": y, "width": width, "height": min(height - y, max_height), "scale": 1})
    path.write_bytes(base64.b64decode(res["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def fake_traffic(admin: Admin, drain_started: asyncio.Event) -> None:
    """~200 req/s on `web` with some 5xx, the canary's two sides on `api`, mirrored copies of `web` answered by
    v3 (some 500s), the proxy's own answers, and old sessions on `shop` that thin out once its drain starts."""
    s = admin.ctx.stats
    tick = 0
    after_drain = 0
    while True:
        traffic(s, "web", "v1", 18, duration=0.004)
        traffic(s, "web", "v2", 2, duration=0.012)
        traffic(s, "api", "v1", 4, duration=0.003)
        traffic(s, "api", "v2", 3, duration=0.003)
        traffic(s, "shop", "v3", 3, duration=0.005)
        for _ in range(2):
            s.mirror("web", "v3", 200)
        if tick % 4 == 0:
            s.mirror("web", "v3", 500)
        if tick % 5 == 0:
            traffic(s, "web", "v2", 1, status=503, duration=0.0)
            s.reject("no_healthy_version", "web")
        if tick % 10 == 0:
            s.reject("no_route")
        if tick % 25 == 0:
            s.reject("too_large", "api")
        if drain_started.is_set():
            # Old sessions keep coming for a few seconds, then stop: the quiet period runs.
            if after_drain < 30 or (after_drain < 60 and after_drain % 5 == 0):
                traffic(s, "shop", "v1", 2 if after_drain < 30 else 1)
            after_drain += 1
        else:
            traffic(s, "shop", "v1", 3)
        tick += 1
        await asyncio.sleep(0.1)


# The lines of a diff as the page shows them: its heading, each route's name, each change.
LINES = ("[...document.querySelector(`SEL`).querySelectorAll('b, .d-route, li')]"
         ".map(e => e.textContent.replace(/\\s+/g, ' ').trim())")


# Elements sticking out of a phone-width screen (inside a scrolling box is fine: a wide table scrolls there).
WIDE = """[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 376
    && !e.closest('.scroll, nav#views') && e.getClientRects().length).map(e => e.tagName + '.' + e.className)
    .slice(0, 8)"""


async def press_tab(page: Page) -> None:
    for kind in ("keyDown", "keyUp"):
        await page.send("Input.dispatchKeyEvent", type=kind, key="Tab", code="Tab", windowsVirtualKeyCode=9)


async def js(page: Page, expr: str) -> Any:
    return await page.eval(expr)


def text_of(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)})?.textContent.replace(/\\s+/g, ' ').trim()"


async def rollout_of(admin: Admin, route: str) -> dict[str, Any]:
    r = await admin.call("GET", f"/api/v1/canary/{route}")
    assert r.status == 200, r.body
    body: dict[str, Any] = r.body
    return body


async def until(check: Any, timeout: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out: {check}")
        await asyncio.sleep(0.1)


async def setup(admin: Admin, scanner_says_no: Path) -> None:
    await admin.seed()  # revisions 1-6: versions v1-v3, `web` v1=90 v2=10 (one pin to v3), `api` v1=100
    admin.health["v2"][EP["v2"]] = True
    r = await admin.call("PUT", "/api/v1/routes/web", {
        "split": {"v1": 90, "v2": 10}, "fallback": ["v1"], "identity": [{"header": "X-Client-Id"}],
        "pins": {"big-customer": "v3"}, "mirror": {"version": "v3", "percent": 10}},
        headers={"X-Turnout-Reason": "shadow v3"})
    assert r.status == 200, r.body  # revision 7
    r = await admin.call("PUT", "/api/v1/routes/shop", {
        "match": {"path_prefix": "/shop"}, "split": {"v1": 100}, "identity": [{"header": "X-Client-Id"}],
        "assignment_cookie": "tv"})
    assert r.status == 201, r.body  # revision 8
    # v4 passes its check until `scanner_says_no` exists (a vulnerability database that grew), on route `extra`
    admin.health["v4"] = {EP["v3"]: True}
    r = await admin.call("PUT", "/api/v1/versions/v4", {"endpoints": [EP["v3"]],
                                                         "check": ["/bin/sh", "-c", f"test ! -e {scanner_says_no}"]})
    assert r.status == 201, r.body  # revision 9
    r = await admin.call("PUT", "/api/v1/routes/extra", {"match": {"path_prefix": "/extra"}, "split": {"v4": 100}})
    assert r.status == 201, r.body


async def login(page: Page, url: str, width: int) -> None:
    await page.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                    mobile=width < 600)
    await page.send("Page.navigate", url=url + "/ui")
    await page.wait_for("document.getElementById('login').classList.contains('show')")
    await page.click("#token-input")
    await page.type(TOKEN)
    await page.click("#token-submit")
    await page.wait_for("document.querySelectorAll('.route').length === 4")


async def view(page: Page, name: str) -> None:
    await page.eval(f"location.hash = '#{name}'")
    await page.wait_for(f"!document.querySelector('section.view[data-view=\"{name}\"]')?.hidden"
                        if name != "history" else "document.body.dataset.view === 'history'")


async def test_release_views_in_chromium(admin: Admin, tmp_path: Path) -> None:
    flag = tmp_path / "scanner-says-no"
    await setup(admin, flag)
    ctx = admin.ctx
    controller = CanaryController(ctx.store, ctx.stats, ctx.health, lambda: aggregate(ctx.stats, None), tick=0.2)
    await controller.start()
    ctx.canary = controller
    ctx.watcher.start()  # the controller's revisions reach the served table (and the page) as in `turnout serve`
    drain_started = asyncio.Event()
    load = asyncio.get_running_loop().create_task(fake_traffic(admin, drain_started))
    try:
        # `api`: v2 stepped up every 1.5 s while its numbers hold; `web`: a v3 rollout that will be aborted.
        r = await admin.call("POST", "/api/v1/canary/api", {"to": "v2", "steps": [2, 5, 10, 25, 40, 50, 75, 90, 100],
                                                            "interval": 1.5, "min_requests": 30})
        assert r.status == 201, r.body
        r = await admin.call("POST", "/api/v1/canary/web", {"to": "v3", "steps": [1, 10, 50], "interval": 600})
        assert r.status == 201, r.body
        r = await admin.call("POST", "/api/v1/drains/shop", {"from": "v1", "to": "v3", "quiet": 120})
        assert r.status == 201, r.body
        drain_started.set()

        async def at_step_3() -> bool:
            return (await rollout_of(admin, "api"))["step"] >= 3

        await until(at_step_3)
        r = await admin.call("POST", "/api/v1/canary/api/pause")  # held still, to read it; the page resumes it
        assert r.status == 200, r.body
        held = await rollout_of(admin, "api")

        async with chromium_page(tmp_path / "profile") as page:
            await login(page, admin.url, 1280)

            # Routes: the mirror target's row shows the answers to its copies, not 0 requests.
            copies = await js(page, "[...document.querySelectorAll('.route[data-route=\"web\"] "
                                    ".version-row[data-version=\"v3\"] .mirror-codes .code')].map(e => e.dataset.code)")
            assert copies == ["200", "500"]

            # Rollouts: steps done/current/next, the analysis per metric over the steps, the commands.
            await view(page, "rollouts")
            api_card = '.rollout[data-route="api"]'
            await page.wait_for(f"document.querySelector('{api_card}')?.dataset.status === 'paused'")
            steps = await js(page, f"[...document.querySelectorAll('{api_card} .step')].map(e => e.className)")
            n = held["step"]
            assert steps == ["step done"] * n + ["step current"] + ["step next"] * (len(held["steps"]) - 1 - n)
            charts = await js(page, f"[...document.querySelectorAll('{api_card} .chart.metric')]"
                                    ".map(e => [e.dataset.metric, e.querySelectorAll('circle').length])")
            judged = len(held["analyses"])
            assert judged >= 3
            # error rate and p99 (the legacy limits), each with a canary and a baseline point per judged step
            assert [name for name, _ in charts] == [m["metric"] for m in held["analyses"][-1]["metrics"]]
            assert all(points >= 2 * judged - 2 for _, points in charts)
            assert await js(page, text_of(f"{api_card} .next-step")) == NONE  # paused: no next analysis

            await page.click(f'{api_card} button[data-cmd="resume"]')
            await page.wait_for(f"document.querySelector('{api_card}')?.dataset.status === 'running'")
            nxt = await page.wait_for(f"/^in [0-9.]+ s$/.test({text_of(api_card + ' .next-step')}) && "
                                      f"{text_of(api_card + ' .next-step')}")
            assert float(nxt.split()[1]) <= 1.5
            await shoot(page, tmp_path, "rollouts")
            await page.click(f'{api_card} button[data-cmd="pause"]')
            await page.wait_for(f"document.querySelector('{api_card}')?.dataset.status === 'paused'")
            paused = await rollout_of(admin, "api")
            assert (paused["status"], paused["message"]) == ("paused", "paused by ops")

            web_abort = '.rollout[data-route="web"] button[data-cmd="abort"]'
            await page.click(web_abort)
            assert (await rollout_of(admin, "web"))["status"] == "running"  # the first click only arms it
            assert await js(page, text_of(web_abort)) == "Confirm: abort web"
            await page.click(web_abort)
            await page.wait_for("!!document.querySelector('tr.finished-row[data-route=\"web\"]')")
            aborted = await rollout_of(admin, "web")
            newest = (await admin.call("GET", "/api/v1/revisions?route=web&limit=1")).body["revisions"][0]
            assert (aborted["status"], newest["actor"]) == ("aborted", "canary")
            cells = await js(page, "[...document.querySelector('tr.finished-row[data-route=\"web\"]').cells]"
                                   ".map(td => td.textContent.trim())")
            assert (cells[:3], cells[4]) == (["web", "v3", "aborted"], f"#{newest['revision']}")
            assert (await admin.call("GET", "/api/v1/routes/web")).body["split"] == {"v1": 90, "v2": 10, "v3": 0}

            # Drains: old-session requests over time, time since the last one, quiet period left.
            await view(page, "drains")
            card = '.drain[data-route="shop"]'
            await page.wait_for(f"!!document.querySelector('{card} svg rect')")
            await page.wait_for(f"parseInt({text_of(card + ' .idle')}) >= 2")
            (d,) = (await admin.call("GET", "/api/v1/drains")).body["drains"]
            shown = await js(page, text_of(card + " .old-requests"))
            assert int(shown.replace(",", "")) <= d["old_requests"] and d["old_requests"] > 0
            left = await js(page, text_of(card + " .quiet-left"))
            assert left.endswith(" min") or left.endswith(" s")
            assert await js(page, f"document.querySelector('{card} .kv').textContent.includes('of 2 min')")
            await shoot(page, tmp_path, "drains")

            # Mirrors: per status code next to the version they copy.
            await view(page, "mirrors")
            row = '.mirror-row[data-route="web"][data-version="v3"]'
            await page.wait_for(f"!!document.querySelector('{row} .code[data-code=\"500\"]')")
            codes = await js(page, f"Object.fromEntries([...document.querySelectorAll('{row} .code')]"
                                   ".map(e => [e.dataset.code, parseInt(e.textContent.split(' ').pop().slice(1)"
                                   ".replace(/,/g, ''))]))")
            assert sorted(codes) == ["200", "500"] and codes["200"] > codes["500"] > 0
            assert await js(page, text_of(row + " .foot")) == "copies v1 + v2"
            await shoot(page, tmp_path, "mirrors")

            # The proxy's own answers: each row adds up, and so do the columns.
            await view(page, "answers")
            await page.wait_for("!!document.querySelector('.answer-row[data-route=\"web\"] "
                                "td[data-reason=\"no_healthy_version\"]')")
            table = await js(page, """[...document.querySelectorAll('table.answers tbody tr')].map(tr =>
                [...tr.querySelectorAll('td')].map(td => td.textContent.trim()))""")
            heads = await js(page, "[...document.querySelectorAll('table.answers thead th')].map(e => e.textContent)")
            assert heads == ["Route", "answered by versions", "no healthy version 503", "no route 404",
                             "too large 413", "clients saw"]

            def n_(cell: str) -> int:
                return 0 if cell == NONE else int(cell.rstrip("*").replace(",", ""))

            body_rows = table[:-1]
            for cells in body_rows:
                by_versions, no_healthy, no_route, too_large, seen = map(n_, cells[1:])
                # a no-healthy-version 503 is one of its version's requests already ("*")
                assert by_versions + no_healthy + no_route + too_large == seen, cells
            sums = [n_(c) for c in table[-1][1:]]
            assert sums == [sum(n_(r[i]) for r in body_rows) for i in range(1, 6)]
            await shoot(page, tmp_path, "answers")

            # A live version that fails a re-check is flagged on its row.
            await view(page, "routes")
            tag = '.route[data-route="extra"] .version-row[data-version="v4"] .tag.check'
            await page.wait_for(f"{text_of(tag)}?.startsWith('check passed')")
            flag.touch()
            r = await admin.call("POST", "/api/v1/versions/v4/check")
            assert (r.status, r.body["check"]["flagged"]) == (200, True), r.body
            await page.wait_for(f"document.querySelector('{tag}')?.dataset.flagged === '1'")
            assert (await js(page, text_of(tag))).startswith("re-check failed ")
            # by now the sparklines have filled in
            await shoot(page, tmp_path, "routes")

            # History: a row's diff on click; the rollback confirmation shows the diff it will apply.
            await view(page, "history")
            await page.click('.rev[data-revision="7"] button.diff-toggle')
            diff7_el = text_of('.rev[data-revision="7"] .history-diff')
            await page.wait_for(f"{diff7_el}?.includes('mirror')")
            diff7 = await js(page, LINES.replace("SEL", '.rev[data-revision="7"] .history-diff'))
            assert diff7 == ["web", 'mirror: none → {"version":"v3","percent":10}']
            button = '.rev[data-revision="6"] button.rollback[data-route="web"]'
            await page.click(button)
            preview_el = text_of('.rev[data-revision="6"] .rollback-preview')
            await page.wait_for(f"{preview_el}?.includes('→')")
            preview = await js(page, LINES.replace("SEL", '.rev[data-revision="6"] .rollback-preview'))
            assert preview == ["Rolling back web to #6 will change:", "web", "weight v3: 0 → absent",
                               'mirror: {"version":"v3","percent":10} → none']
            before = (await admin.call("GET", "/api/v1/revisions?limit=1")).body["revisions"][0]["revision"]
            await shoot(page, tmp_path, "history", start='.rev[data-revision="8"]', max_height=900)
            await page.click(button)  # confirms
            await page.wait_for(f"document.getElementById('h-revision').textContent === '{before + 1}'")
            route = (await admin.call("GET", "/api/v1/routes/web")).body
            assert (route["split"], route.get("mirror")) == ({"v1": 90, "v2": 10}, None)

            # Docker: this admin app runs no provider, and says so.
            await view(page, "docker")
            await page.wait_for(f"{text_of('#docker')} === 'The Docker provider is not running in this proxy.'")

            # Keyboard: every command is a focusable button with a visible focus ring.
            await view(page, "rollouts")
            await page.wait_for(f"!!document.querySelector('{api_card} button[data-cmd=\"resume\"]')")
            await js(page, "document.querySelector('nav#views a[data-view=\"rollouts\"]').focus()")
            resume = f"document.activeElement === document.querySelector('{api_card} button[data-cmd=\"resume\"]')"
            for _ in range(40):  # Tab through the page, as a keyboard user does, to the resume button
                if await js(page, resume):
                    break
                await press_tab(page)
            assert await js(page, resume)
            ring = await js(page, "getComputedStyle(document.activeElement).outlineStyle")
            assert ring == "solid"
            tab_order = await js(page, "[...document.querySelectorAll('nav#views a')].map(a => a.tabIndex)")
            assert tab_order == [0] * 7

            # Phone width: nothing wider than the screen; every view still reads.
            await page.send("Emulation.setDeviceMetricsOverride", width=375, height=800, deviceScaleFactor=2,
                            mobile=True)
            for name in ("routes", "rollouts", "drains", "mirrors", "answers"):
                await view(page, name)
                await asyncio.sleep(0.3)
                width = await js(page, "document.documentElement.scrollWidth")
                wide = await js(page, WIDE)
                assert (width, wide) == (375, []), f"{name}: {width} {wide}"
            await view(page, "rollouts")
            await page.wait_for(f"document.querySelectorAll('{api_card} .chart.metric').length === 2")
            assert await js(page, f"document.querySelector('{api_card} .chart svg').getBoundingClientRect().width "
                                  "<= 351")
            await shoot(page, tmp_path, "rollouts-phone")
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        await controller.stop()
        await ctx.watcher.stop()
