"""Admin endpoint for re-checks (included by proxy.admin.app): `POST /api/v1/versions/{name}/check` runs a
version's check command now, as the schedule does (proxy.control.rechecks).

Design rule: the answer is the same `check` object `GET /api/v1/versions/{name}` shows, with 200 whether
the check passed or failed (the request succeeded; the verdict is data); 409 when there is nothing to run.
"""

from __future__ import annotations

import json

from aiohttp import web

from proxy.admin.auth import actor_of
from proxy.admin.context import AdminContext
from proxy.control import rechecks

PREFIX = "/api/v1"


class CheckApi:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[web.RouteDef]:
        return [web.post(f"{PREFIX}/versions/{{name}}/check", self.check_now)]

    async def check_now(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ctx = self.ctx
        actor = actor_of(request)
        if ctx.rechecks is not None:
            verdict = await ctx.rechecks.check(name, actor=actor)
        else:
            verdict = await rechecks.recheck(ctx.store, ctx.stats, name, actor=actor)
        state = (await ctx.store.current()).state
        live = name in rechecks.live_checked(state)
        body = {"version": name, "check": rechecks.check_view(verdict, live, ctx.settings.check_interval)}
        return web.Response(text=json.dumps(body, indent=1) + "\n", content_type="application/json")


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    return CheckApi(ctx).routes()
