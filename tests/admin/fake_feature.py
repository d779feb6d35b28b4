"""A stand-in feature module for test_app: one protected and one @public endpoint."""

from __future__ import annotations

from aiohttp import web

from proxy.admin.auth import actor_of, public
from proxy.admin.context import AdminContext


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    async def who(request: web.Request) -> web.Response:
        return web.json_response({"actor": actor_of(request), "revision": ctx.holder.table.revision})

    @public
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="status page")

    return [web.get("/api/v1/fake/whoami", who), web.get("/fake-ui", page)]
