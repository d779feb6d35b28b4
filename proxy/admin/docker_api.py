"""Admin endpoints of the Docker provider, under /api/v1/docker (bearer token like every other write).

    GET    /api/v1/docker/versions              every docker version: pinned image, replicas healthy/desired
    GET    /api/v1/docker/versions/{name}       one of them, with each replica's state and last error
    PUT    /api/v1/docker/versions/{name}       deploy: resolve the image, register the version (201)
    POST   /api/v1/docker/versions/{name}/scale {"replicas": N}
    DELETE /api/v1/docker/versions/{name}       retire: refused (409) while a route references it
    GET    /api/v1/docker/versions/{name}/logs  ?tail=N[&replica=I]: recent log lines per container (or of one)

Design rule: registering is all a deploy does here: the provider sees the new revision and starts the containers, and
the CLI follows their progress with GET. So a docker version registered any other way (a route file,
PUT /api/v1/versions) gets its containers the same way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from proxy.admin.api import Api, json_reply, read_json
from proxy.admin.context import AdminContext
from proxy.changes import delete_version, put_version, set_replicas
from proxy.errors import ConflictError, FieldError, NotFoundError, TurnoutError, ValidationError
from proxy.parse import parse_version_body
from proxy.providers.containers import DockerProvider
from proxy.providers.docker_zones import DockerZones

P = "/api/v1/docker"
# How long a retire waits for the containers to be removed before answering (they still go afterwards).
RETIRE_WAIT = 30.0
MAX_LOG_TAIL = 1000
FIRST_PASS_WAIT = 10.0


class ProviderMissingError(TurnoutError):
    status_hint = 503


async def provider_of(ctx: AdminContext) -> DockerProvider | DockerZones:
    provider = ctx.docker or DockerZones.for_store(ctx.store) or DockerProvider.for_store(ctx.store)
    if provider is None:
        raise ProviderMissingError("the Docker provider is not running in this proxy (start `turnout serve` with "
                                   "TURNOUT_DOCKER=1, or with a docker version in its route file)")
    # Right after a restart the admin API is up before the provider's first pass has adopted the running
    # containers; answering then would report healthy replicas as 0 of N. A short wait gives the real
    # state; past it the answer says "connecting" and the caller can ask again.
    await provider.wait_first_pass(FIRST_PASS_WAIT)
    return provider


def version_status_view(s: Any) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["routes"] = list(s.routes)
    d["instances"] = list(s.instances)
    d["replicas"] = [{**r, "last_logs": list(r["last_logs"])} for r in d["replicas"]]
    d["zones"] = [{"zone": z, "healthy": h, "desired": n} for z, h, n in s.zones]
    return d


class DockerApi:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.api = Api(ctx)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{P}/versions", self.list_versions),
            web.get(f"{P}/versions/{{name}}", self.get_version),
            web.put(f"{P}/versions/{{name}}", self.deploy),
            web.post(f"{P}/versions/{{name}}/scale", self.scale),
            web.delete(f"{P}/versions/{{name}}", self.retire),
            web.get(f"{P}/versions/{{name}}/logs", self.logs),
        ]

    def _engine(self, provider: Any) -> dict[str, Any]:
        return {"ok": provider.engine_error is None, "error": provider.engine_error,
                "state_id": provider.state_id, **provider.role}

    async def list_versions(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        rev = await self.ctx.store.current()
        versions = [version_status_view(s) for s in provider.status(rev.state)]
        return json_reply({"revision": rev.number, "engine": self._engine(provider), "versions": versions}, rev.number)

    async def get_version(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        rev = await self.ctx.store.current()
        name = request.match_info["name"]
        for s in provider.status(rev.state):
            if s.name == name:
                return json_reply({"revision": rev.number, "engine": self._engine(provider), **version_status_view(s)},
                             rev.number)
        if name in rev.state.versions:
            raise ConflictError(f"version {name!r} is a {rev.state.versions[name].spec.kind} version, not docker")
        raise NotFoundError(f"no version named {name!r}")

    async def deploy(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        name = request.match_info["name"]
        body = await read_json(request)
        if not isinstance(body, dict) or "image" not in body:
            raise ValidationError([FieldError("image", "required: the image to run (repo@sha256:..., or a tag "
                                              "with allow_tag)")])
        version = parse_version_body(body, name, time.time())
        spec = version.spec
        if spec.network == "bridge" and spec.port is None:
            raise ValidationError([FieldError("port", "required with network bridge: the port the container "
                                              "listens on (published on 127.0.0.1)")])
        assert spec.image is not None
        resolved = await provider.resolve_image(spec.image, spec.zones)
        labels = dict(spec.labels)
        if resolved.tag is not None:
            labels["turnout.tag"] = resolved.tag
        # Stored pinned: the digest is what runs from now on, whatever the tag points to later.
        spec = dataclasses.replace(spec, image=resolved.pinned, allow_tag=False, labels=tuple(labels.items()))
        version = dataclasses.replace(version, spec=spec)
        result = await self.api.write(request, lambda state: put_version(state, version))
        provider.kick()
        return result.response(created_status=201, image=resolved.pinned, image_id=resolved.image_id,
                               tag=resolved.tag)

    async def scale(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        await provider.require_engine()
        name = request.match_info["name"]
        body = await read_json(request)
        n = body.get("replicas") if isinstance(body, dict) else None
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValidationError([FieldError("replicas", f"expected an integer, got {n!r}")])
        force = body.get("force", False) if isinstance(body, dict) else False
        if not isinstance(force, bool):
            raise ValidationError([FieldError("force", f"expected true or false, got {force!r}")])
        force = force or request.query.get("force", "false").lower() in ("", "1", "true", "yes", "on")
        result = await self.api.write(request, lambda state: set_replicas(state, name, n, force=force))
        provider.kick()
        return result.response()

    async def retire(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        await provider.require_engine()
        name = request.match_info["name"]
        state = (await self.ctx.store.current()).state
        v = state.versions.get(name)
        if v is not None and v.spec.kind != "docker":
            raise ConflictError(f"version {name!r} is a {v.spec.kind} version; retire it with "
                                f"DELETE /api/v1/versions/{name}")
        result = await self.api.write(request, lambda s: delete_version(s, name))
        provider.kick()
        left = await provider.wait_removed(name, RETIRE_WAIT)
        return result.response(containers_left=left)

    async def logs(self, request: web.Request) -> web.Response:
        provider = await provider_of(self.ctx)
        name = request.match_info["name"]
        raw = request.query.get("tail", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LOG_TAIL:
            raise ValidationError([FieldError("tail", f"expected a number between 1 and {MAX_LOG_TAIL}, got {raw!r}")])
        replica = request.query.get("replica")
        if replica is not None and not replica.isdigit():
            raise ValidationError([FieldError("replica", f"expected a replica number (0, 1, ...), got {replica!r}")])
        which = None if replica is None else int(replica)
        return json_reply({"name": name, "replica": which,
                           "containers": await provider.logs(name, int(raw), replica=which)})


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    return DockerApi(ctx).routes()

