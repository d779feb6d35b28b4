"""Who may call the admin API.

Design rule: every route is protected unless it is on the public allow-list (`/healthz`, `/readyz`, and
`/metrics` unless settings.metrics_auth) or its handler is marked with `@public`. An unknown path is
protected too, so an unauthenticated caller learns nothing about which endpoints exist. Feature modules
reuse `authorize` / `require_actor` instead of parsing the header themselves.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from proxy.admin.tokens import load_tokens  # re-exported: the contract names it here
from proxy.errors import TurnoutError
from proxy.settings import Settings

__all__ = [
    "ACTOR_KEY", "UnauthorizedError", "actor_of", "auth_middleware", "authorize", "is_public", "load_tokens",
    "public", "public_paths",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Any])

# request[ACTOR_KEY]: the token's name, recorded in history as who made a change.
ACTOR_KEY = web.RequestKey("turnout.actor", str)
_PUBLIC_ATTR = "__turnout_public__"


class UnauthorizedError(TurnoutError):
    status_hint = 401


def public(handler: H) -> H:
    """Mark a handler as reachable without a token (a feature module's static page, say)."""
    setattr(handler, _PUBLIC_ATTR, True)
    return handler


def public_paths(settings: Settings) -> frozenset[str]:
    paths = {"/healthz", "/readyz"}
    if not settings.metrics_auth:
        paths.add("/metrics")
    return frozenset(paths)


def is_public(request: web.Request, settings: Settings) -> bool:
    if request.path in public_paths(settings):
        return True
    return bool(getattr(request.match_info.handler, _PUBLIC_ATTR, False))


def authorize(tokens: Mapping[str, str], header: str | None) -> str | None:
    """The actor for an `Authorization: Bearer <token>` header, or None.

    Every known token is compared, in constant time each, so the response time does not tell how many
    characters of a guess were right nor which entry matched.
    """
    if not header:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    presented = given.strip().encode("utf-8", "surrogateescape")
    actor: str | None = None
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode("utf-8"), presented) and presented:
            actor = name
    return actor


def actor_of(request: web.Request) -> str:
    """The authenticated actor; public endpoints (which have none) get "anonymous"."""
    actor = request.get(ACTOR_KEY)
    return actor if isinstance(actor, str) else "anonymous"


def auth_middleware(settings: Settings, tokens: Callable[[], Mapping[str, str]]) -> Any:
    """`tokens` is read per request, so a context whose tokens are replaced (rotation) takes effect at once."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_public(request, settings):
            actor = authorize(tokens(), request.headers.get("Authorization"))
            if actor is None:
                raise UnauthorizedError("missing or wrong bearer token (Authorization: Bearer <token>)")
            request[ACTOR_KEY] = actor
        return await handler(request)

    return middleware
