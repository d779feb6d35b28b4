"""The admin application: the REST API plus the endpoints feature modules contribute.

Design rule: middleware order is the error mapper outside the token check, so a refused token is a problem+json 401
like every other error, and it runs before any handler reads a body.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from aiohttp import web

from proxy.admin import api
from proxy.admin.auth import auth_middleware
from proxy.admin.context import AdminContext
from proxy.admin.problem import error_middleware

CTX_KEY = web.AppKey("turnout.admin.ctx", AdminContext)

# Each provides `routes(ctx) -> list[web.RouteDef]`; a module that does not exist (yet) is skipped.
FEATURE_MODULES = ("proxy.admin.observe", "proxy.admin.canary_api", "proxy.admin.docker_api",
                   "proxy.admin.check_api")

# Largest admin request body: a route file with tens of thousands of pins fits; a runaway upload does not.
MAX_BODY = 16 * 1024 * 1024


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only "this module is absent" is skipped; a feature module whose own imports fail is a bug to see.
        if e.name == name:
            return None
        raise


def create_app(ctx: AdminContext) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[error_middleware, auth_middleware(ctx.settings, lambda: ctx.tokens)],
    )
    app[CTX_KEY] = ctx
    app.add_routes(api.routes(ctx))
    for name in FEATURE_MODULES:
        module = _optional(name)
        if module is not None:
            app.add_routes(module.routes(ctx))
    return app
