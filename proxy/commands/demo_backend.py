"""A tiny demo version: answers every request with its version name and the client id it saw.

Design rule: standard library and aiohttp only, no proxy code, like a real upstream.
Run as `python -m proxy.commands.demo_backend --name v1 --port 9101`. `turnout demo` starts three of these.
"""

from __future__ import annotations

import argparse
import json
import os

from aiohttp import web


def make_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = {
            "version": name,
            "client": request.headers.get("X-Client-Id") or request.cookies.get("client_id")
            or request.query.get("client"),
            "path": request.path_qs,
            "routed_by": request.headers.get("X-Turnout-Route"),
            "forwarded_for": request.headers.get("X-Forwarded-For"),
        }
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json",
                            headers={"X-Served-By": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    env_port = os.environ.get("PORT")
    p.add_argument("--port", type=int, default=int(env_port) if env_port else None, required=env_port is None,
                   help="listening port (default: $PORT, as set by the local provider)")
    a = p.parse_args()
    web.run_app(make_app(a.name), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
