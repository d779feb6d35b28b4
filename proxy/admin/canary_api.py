"""Admin endpoints for progressive delivery: canary rollouts and drains (included by proxy.admin.app).

Design rule: every command goes through the process's CanaryController (ctx.canary), whose lock orders it with
the controller's own steps. A process that runs no controller still accepts commands (they act on the
store), but nothing advances its rollouts: `"driven": false` in the listing says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from aiohttp import web

from proxy.admin.auth import actor_of
from proxy.admin.context import AdminContext
from proxy.admin.problem import BadRequestError
from proxy.checker import Checker
from proxy.control.canary import CanaryController, Rollout, counters_of, describe, drain, load_rollout, parse_config
from proxy.control.canary.rollout import ACTIVE
from proxy.errors import FieldError, NotFoundError, ValidationError
from proxy.telemetry.metrics import aggregate

PREFIX = "/api/v1"
# How far back in a route's history the revision that ended a rollout is looked for.
ENDED_BY_SEARCH = 50


def _metrics_view(a: dict[str, Any] | None) -> None:
    # The API names a metric's resolved bounds as the rule syntax does: "pass" and "fail".
    for m in (a or {}).get("metrics", ()):
        m["pass"] = m.pop("pass_at")
        m["fail"] = m.pop("fail_above")


def rollout_view(r: Rollout, next_analysis: float | None = None) -> dict[str, Any]:
    d = asdict(r)
    d["percent"] = r.percent
    d["text"] = describe(r)
    cfg = d["config"]
    cfg["checks"] = [{"metric": c.metric, "pass": c.pass_rule, "fail": c.fail_rule} for c in r.config.checks]
    cfg["min_requests"] = r.config.limits.min_requests
    _metrics_view(d["analysis"])
    for a in d["analyses"]:
        _metrics_view(a)
    d["next_analysis"] = next_analysis if r.status == "running" else None
    done = r.status == "promoted"
    d["steps"] = [{"percent": p, "state": "done" if done or i < r.step else ("current" if i == r.step else "next")}
                  for i, p in enumerate(r.config.steps)]
    return d


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1) + "\n", status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValidationError([FieldError("", "expected a JSON object")])
    return data


def _force(body: dict[str, Any], request: web.Request) -> bool:
    value = body.get("force", request.query.get("force", False))
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on", "")
    if not isinstance(value, bool):
        raise ValidationError([FieldError("force", "expected true or false")])
    return value


class CanaryApi:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self._fallback: CanaryController | None = None
        self._ended: dict[tuple[str, float], int | None] = {}  # (route, finished at) -> revision that ended it

    def controller(self) -> CanaryController:
        ctx = self.ctx
        if ctx.canary is not None:
            return ctx.canary
        if self._fallback is None:
            self._fallback = CanaryController(ctx.store, ctx.stats, ctx.health,
                                              lambda: aggregate(ctx.stats, ctx.metrics_dir))
        return self._fallback

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.get(f"{p}/canary", self.list_rollouts),
            web.get(f"{p}/canary/{{route}}", self.get_rollout),
            web.post(f"{p}/canary/{{route}}", self.start),
            web.post(f"{p}/canary/{{route}}/pause", self.pause),
            web.post(f"{p}/canary/{{route}}/resume", self.resume),
            web.post(f"{p}/canary/{{route}}/abort", self.abort),
            web.post(f"{p}/canary/{{route}}/promote", self.promote),
            web.get(f"{p}/drains", self.list_drains),
            web.get(f"{p}/drains/{{route}}", self.get_drain),
            web.post(f"{p}/drains/{{route}}", self.start_drain),
            web.delete(f"{p}/drains/{{route}}", self.cancel_drain),
        ]

    # rollouts

    def view(self, r: Rollout) -> dict[str, Any]:
        ctl = self.ctx.canary
        return rollout_view(r, None if ctl is None else ctl.next_analysis(r.config.route))

    async def list_rollouts(self, request: web.Request) -> web.Response:
        rollouts = await self.controller().rollouts()
        driven = self.ctx.canary is not None
        views = [self.view(r) | {"ended_by": await self._ended_by(r)} for r in rollouts]
        return _json({"driven": driven, "rollouts": views})

    async def _ended_by(self, r: Rollout) -> int | None:
        """The revision that ended a finished rollout: its last split change carries the rollout's final
        message as its reason (None while running, or when it ended without one, e.g. its route was deleted)."""
        if r.status in ACTIVE:
            return None
        if r.revision is not None and r.status != "failed":  # a failed rollout wrote no revision at its end
            return r.revision  # recorded by the controller; records written before it was are looked up
        # A finished rollout does not change: look it up once, not on every poll of the status page.
        key = (r.config.route, r.updated)
        if key not in self._ended:
            self._ended[key] = None
            for info in await self.ctx.store.history(route=r.config.route, limit=ENDED_BY_SEARCH):
                if info.reason == r.message and info.time <= r.updated + 1.0:
                    self._ended[key] = info.number
                    break
        return self._ended[key]

    async def get_rollout(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        r = await load_rollout(self.ctx.store, route)
        if r is None:
            raise NotFoundError(f"no rollout on route {route!r}")
        return _json(self.view(r))

    async def start(self, request: web.Request) -> web.Response:
        body = await _body(request)
        cfg = parse_config(body, request.match_info["route"])
        r = await self.controller().start_rollout(cfg, actor=actor_of(request), force=_force(body, request))
        return _json(self.view(r), status=201)

    async def pause(self, request: web.Request) -> web.Response:
        return _json(rollout_view(await self.controller().pause(request.match_info["route"],
                                                                actor=actor_of(request))))

    async def resume(self, request: web.Request) -> web.Response:
        return _json(rollout_view(await self.controller().resume(request.match_info["route"],
                                                                 actor=actor_of(request))))

    async def abort(self, request: web.Request) -> web.Response:
        return _json(rollout_view(await self.controller().abort(request.match_info["route"],
                                                                actor=actor_of(request))))

    async def promote(self, request: web.Request) -> web.Response:
        body = await _body(request)
        return _json(rollout_view(await self.controller().promote(request.match_info["route"], actor=actor_of(request),
                                                                  force=_force(body, request))))

    # drains

    async def list_drains(self, request: web.Request) -> web.Response:
        ctl = self.controller()
        now = ctl.clock()
        out = []
        for stored in await drain.load_drains(self.ctx.store):
            live = ctl.drains.live(stored.route)
            d = live if live is not None and live.started == stored.started and stored.status == "draining" else stored
            # history: (time, old-session requests so far), one point per tick of this process's controller
            out.append({**asdict(d), "text": drain.summary(d, now), **drain.timing(d, now),
                        "history": [list(p) for p in ctl.drains.history(d.route)]})
        return _json({"drains": out})

    async def get_drain(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        d = await drain.load_drain(self.ctx.store, route)
        if d is None:
            raise NotFoundError(f"no drain on route {route!r}")
        return _json({**asdict(d), "text": drain.summary(d, self.controller().clock())})

    async def start_drain(self, request: web.Request) -> web.Response:
        body = await _body(request)
        c = Checker()
        known = {"from", "to", "quiet", "force"}
        for k in body:
            if k not in known:
                c.fail(k, f"unknown field (expected one of: {', '.join(sorted(known))})")
        old = c.string(body.get("from"), "from", what="the version to drain")
        new = c.string(body.get("to"), "to", what="the version new sessions go to")
        quiet = c.number(body.get("quiet", drain.DEFAULT_QUIET), "quiet", 0, 7 * 86400)
        c.raise_if_any()
        assert old is not None and new is not None and quiet is not None
        ctl = self.controller()
        route = request.match_info["route"]

        def old_requests() -> int:
            return counters_of(ctl.stats_source(), route, [old]).requests

        d = await drain.start_drain(self.ctx.store, self.ctx.health(), route, old, new,
                                    quiet=float(quiet), actor=actor_of(request), now=ctl.clock(),
                                    force=_force(body, request), old_requests=old_requests)
        return _json({**asdict(d), "text": drain.summary(d, ctl.clock())}, status=201)

    async def cancel_drain(self, request: web.Request) -> web.Response:
        ctl = self.controller()
        d = await drain.cancel_drain(self.ctx.store, request.match_info["route"], actor=actor_of(request),
                                     now=ctl.clock())
        return _json({**asdict(d), "text": drain.summary(d, ctl.clock())})


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    return CanaryApi(ctx).routes()
