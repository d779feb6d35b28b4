"""The admin REST API under /api/v1: read the state, change it, read and undo its history.

Design rule: a write is one pure transition from proxy.changes, committed by `store.update` with the caller's
If-Match as the compare-and-swap revision; bodies are parsed *inside* the transition, against the state
being changed, so validation and commit see the same versions. The API never builds a route table: it hands
the committed revision to the process's watcher (proxy.control.watcher, the one install path) and answers
once the watcher installed it, so an answer of 200 means "durable and already serving here" (with several
worker processes: in each of them, bounded, see proxy.supervisor.workers.Workers.routed)."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.admin.auth import actor_of
from proxy.admin.context import AdminContext
from proxy.admin.problem import BadRequestError
from proxy.changes import (
    Change,
    apply_document,
    delete_route,
    delete_version,
    pin,
    put_route,
    put_version,
    rollback_route,
    set_split,
    unpin,
)
from proxy.checker import NAME_RE, Checker
from proxy.control import gates, rechecks
from proxy.errors import FieldError, NotFoundError, StaleRevisionError, TurnoutError, ValidationError
from proxy.model import State, Version
from proxy.parse import (
    parse_route_body,
    parse_split_body,
    parse_version_body,
    route_to_dict,
    state_to_stored,
    version_to_dict,
)
from proxy.revdiff import diff_states, diff_to_json, render_diff
from proxy.routefile import load_route_file
from proxy.store.base import Revision, RevisionInfo

PREFIX = "/api/v1"
REASON_HEADER = "X-Turnout-Reason"
# A reason is a sentence for the history, not a document; longer ones are refused, not cut.
MAX_REASON = 1000
# History pages: the default fits a terminal, the maximum bounds one response.
DEFAULT_HISTORY = 50
MAX_HISTORY = 1000
# A default rollback looks this far back in the route's history for its last real change: verdicts and
# drain events between changes are few.
ROLLBACK_LOOKBACK = 20


class Api:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.get("/healthz", self.healthz, allow_head=True),
            web.get("/readyz", self.readyz, allow_head=True),
            web.get(f"{p}/state", self.get_state),
            web.get(f"{p}/health", self.get_health),
            web.get(f"{p}/versions", self.list_versions),
            web.get(f"{p}/versions/{{name}}", self.get_version),
            web.put(f"{p}/versions/{{name}}", self.put_version),
            web.delete(f"{p}/versions/{{name}}", self.delete_version),
            web.get(f"{p}/routes/{{name}}", self.get_route),
            web.put(f"{p}/routes/{{name}}", self.put_route),
            web.delete(f"{p}/routes/{{name}}", self.delete_route),
            web.patch(f"{p}/routes/{{name}}/split", self.patch_split),
            web.put(f"{p}/routes/{{name}}/pins/{{client:.+}}", self.put_pin),
            web.delete(f"{p}/routes/{{name}}/pins/{{client:.+}}", self.delete_pin),
            web.post(f"{p}/routes/{{name}}/rollback", self.rollback),
            web.get(f"{p}/revisions", self.list_revisions),
            web.get(f"{p}/revisions/{{number}}", self.get_revision),
            web.get(f"{p}/revisions/{{a}}/diff/{{b}}", self.diff_revisions),
            web.post(f"{p}/apply", self.apply),
        ]

    # probes (public)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        table = self.ctx.holder.table.revision
        try:
            cur: int | None = (await self.ctx.store.current()).number
            store = "ok"
        except TurnoutError as e:
            cur, store = None, f"unavailable: {e}"
        # Ready means "can serve traffic": a loaded table keeps serving while the store is away (etcd down),
        # so taking every replica out of a load balancer at once would only turn a control-plane outage into
        # a data-plane one. A table at revision 0 is the empty one a process starts with.
        ready = table > 0 or cur == 0
        body = {"status": "ready" if ready else "unready", "store": store, "store_revision": cur,
                "table_revision": table}
        return web.json_response(body, status=200 if ready else 503)

    # reads

    async def get_state(self, request: web.Request) -> web.StreamResponse:
        rev = await self.ctx.store.current()
        if _etag(rev.number) in _etags(request.headers.get("If-None-Match")):
            return web.Response(status=304, headers={"ETag": _etag(rev.number)})
        return json_reply({"revision": rev.number, **state_to_stored(rev.state)}, rev.number)

    async def get_health(self, request: web.Request) -> web.Response:
        view = self.ctx.health()
        out = {v: {"healthy": sum(1 for ok in eps.values() if ok), "total": len(eps), "endpoints": dict(eps)}
               for v, eps in view.items()}
        return json_reply({"revision": self.ctx.holder.table.revision, "versions": out})

    async def list_versions(self, request: web.Request) -> web.Response:
        rev = await self.ctx.store.current()
        checks = await rechecks.check_views(self.ctx.store, rev.state, self.ctx.settings.check_interval)
        versions = [{**_version_view(v, rev.state), "check": checks.get(v.name)} for v in rev.state.versions.values()]
        return json_reply({"revision": rev.number, "versions": versions}, rev.number)

    async def get_version(self, request: web.Request) -> web.Response:
        rev = await self.ctx.store.current()
        name = request.match_info["name"]
        v = rev.state.versions.get(name)
        if v is None:
            raise NotFoundError(f"no version named {name!r}")
        checks = await rechecks.check_views(self.ctx.store, rev.state, self.ctx.settings.check_interval)
        return json_reply({**_version_view(v, rev.state), "check": checks.get(name)}, rev.number)

    async def get_route(self, request: web.Request) -> web.Response:
        rev = await self.ctx.store.current()
        name = request.match_info["name"]
        r = rev.state.route(name)
        if r is None:
            raise NotFoundError(f"no route named {name!r}")
        return json_reply(route_to_dict(r), rev.number)

    async def list_revisions(self, request: web.Request) -> web.Response:
        q = request.query
        route = q.get("route") or None
        limit = _int_param(q.get("limit"), "limit", DEFAULT_HISTORY, 1, MAX_HISTORY)
        before = _int_param(q.get("before"), "before", None, 1, None) if "before" in q else None
        infos = await self.ctx.store.history(route=route, limit=limit, before=before)
        # No revision ever changed it: a typo, not an empty history (a deleted route keeps its own).
        if (route is not None and not infos and before is None
                and (await self.ctx.store.current()).state.route(route) is None):
            raise NotFoundError(f"no route named {route!r} now or in any revision")
        return json_reply({"revisions": [_info_view(i) for i in infos]})

    async def get_revision(self, request: web.Request) -> web.Response:
        number = _int_param(request.match_info["number"], "number", 0, 0, None)
        rev = await self.ctx.store.get(number)
        return json_reply({**_info_view(rev.info), **state_to_stored(rev.state)}, rev.number)

    async def diff_revisions(self, request: web.Request) -> web.Response:
        a = await self.ctx.store.get(_int_param(request.match_info["a"], "a", 0, 0, None))
        b = await self.ctx.store.get(_int_param(request.match_info["b"], "b", 0, 0, None))
        d = diff_states(a.state, b.state)
        return json_reply({"from": _info_view(a.info), "to": _info_view(b.info), **diff_to_json(d),
                           "text": render_diff(d)})

    # writes

    async def put_version(self, request: web.Request) -> web.Response:
        name = _valid_name(request, "version")
        body = await read_json(request)
        now = time.time()
        result = await self.write(request, lambda s: put_version(s, parse_version_body(body, name, now)))
        v = result.revision.state.versions[name]
        return result.response(version=_version_view(v, result.revision.state), created_status=201)

    async def delete_version(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        result = await self.write(request, lambda s: delete_version(s, name))
        return result.response()

    async def put_route(self, request: web.Request) -> web.Response:
        name = _valid_name(request, "route")
        body = await read_json(request)
        existed: list[bool] = []

        def change(s: State) -> Change:
            existed.append(s.route(name) is not None)
            return put_route(s, parse_route_body(body, name, s))

        result = await self.write(request, change)
        route = result.revision.state.route(name)
        assert route is not None
        return result.response(route=route_to_dict(route), created_status=None if existed[-1] else 201)

    async def delete_route(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return (await self.write(request, lambda s: delete_route(s, name))).response()

    async def patch_split(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await read_json(request)
        # Readiness first: a version with no healthy endpoint gets no new weight unless the operator forces
        # it (?force=true). Lowering weights is never refused. The check command is asked in `write`.
        state = (await self.ctx.store.current()).state
        weights = parse_split_body(body, state.versions)
        if state.route(name) is not None:
            gates.check_readiness(state, weights, self.ctx.health(), route=name,
                                  force=_flag(request.query.get("force")))
        result = await self.write(request, lambda s: set_split(s, name, parse_split_body(body, s.versions)))
        return result.response()

    async def put_pin(self, request: web.Request) -> web.Response:
        name, client = request.match_info["name"], request.match_info["client"]
        body = await read_json(request)
        c = Checker()
        d = c.mapping(body, "", {"version"})
        version = c.string(d.get("version"), "version", what="a version name") if d is not None else None
        c.raise_if_any()
        assert version is not None
        return (await self.write(request, lambda s: pin(s, name, client, version))).response()

    async def delete_pin(self, request: web.Request) -> web.Response:
        name, client = request.match_info["name"], request.match_info["client"]
        return (await self.write(request, lambda s: unpin(s, name, client))).response()

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await read_json(request, empty_ok=True)
        c = Checker()
        d = c.mapping(body, "", {"revision"})
        target: int | None = None
        if d is not None and "revision" in d:
            n = c.number(d["revision"], "revision", 0, None, integer=True)
            target = None if n is None else int(n)
        c.raise_if_any()
        earlier: Revision | None = None
        if target is None:
            # The route as it was just before its most recent change; that change may itself be a
            # rollback, so a second `{}` undoes the first. Events in the route's history that changed no
            # state (a check's verdict, a drain's end) are skipped.
            now = (await self.ctx.store.current()).state.route(name)
            for info in await self.ctx.store.history(route=name, limit=ROLLBACK_LOOKBACK):
                earlier = await self.ctx.store.get(info.number - 1)
                if earlier.state.route(name) != now:
                    break
            if earlier is None:
                raise NotFoundError(f"route {name!r} has no change in the history to roll back")
            target = earlier.number
        if earlier is None:
            earlier = await self.ctx.store.get(target)
        at = target
        result = await self.write(request, lambda s: rollback_route(s, name, earlier.state, at))
        route = result.revision.state.route(name)
        # The restored route without its pins (a count instead): echoing 100,000 pins would make the
        # operator's instant rollback wait on serialising them; GET the route for the full body.
        shown = None if route is None else {**route_to_dict(route, with_pins=False), "pins": len(route.pins)}
        return result.response(rolled_back_to=at, route=shown)

    async def apply(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequestError(f"the route file is not UTF-8 text (byte {e.start})") from e
        now = time.time()
        warnings: list[FieldError] = []

        def change(s: State) -> Change:
            warnings.clear()  # a write that lost a race translates again
            return apply_document(s, load_route_file(text, now=now, current=s, warnings=warnings))

        if _flag(request.query.get("dry_run")):
            cur = await self.ctx.store.current()
            expected = _if_match(request)
            if expected is not None and expected != cur.number:
                raise StaleRevisionError(expected, cur.number)
            new, summary = change(cur.state)
            changed = bool(summary) and new != cur.state
            body = {"revision": cur.number, "changed": changed, "summary": summary if changed else "", "dry_run": True,
                    **_warnings_view(warnings)}
            return json_reply(body, cur.number)
        result = await self.write(request, change)
        return result.response(**_warnings_view(warnings))

    # the write path

    async def write(self, request: web.Request, change: Callable[[State], Change]) -> WriteResult:
        """Commit `change` with the request's If-Match, reason and actor; answer once it serves.

        Every write passes the check gate here (proxy.control.gates.gated_update): a version whose check command
        fails gets no traffic by any path (split, pin, fallback, mirror, route, apply, rollback) unless
        the request says ?force=true.
        """
        expected = _if_match(request)
        reason = _reason(request)
        outcome: list[tuple[bool, str]] = []

        def tracked(state: State) -> Change:
            new, summary = change(state)
            # store.update may call this again after losing a race; the last call is what got committed.
            outcome.append((bool(summary) and new != state, summary))
            return new, summary

        rev = await gates.gated_update(self.ctx.store, tracked, actor=actor_of(request), reason=reason,
                                       expected=expected, force=_flag(request.query.get("force")))
        changed, summary = outcome[-1] if outcome else (False, "")
        if changed:
            self.ctx.watcher.receive(rev)
            await self.ctx.watcher.installed(rev.number)
        return WriteResult(rev, changed, summary if changed else "")


@dataclass(frozen=True, slots=True)
class WriteResult:
    revision: Revision
    changed: bool
    summary: str  # empty when nothing changed

    def __repr__(self) -> str:
        return f"<WriteResult revision {self.revision.number} [{'changed' if self.changed else 'no change'}]>"

    def response(self, created_status: int | None = None, **extra: Any) -> web.Response:
        body = {"revision": self.revision.number, "changed": self.changed, "summary": self.summary,
                **{k: v for k, v in extra.items() if v is not None}}
        status = created_status if created_status is not None and self.changed else 200
        return json_reply(body, self.revision.number, status=status)


def routes(ctx: AdminContext) -> list[web.RouteDef]:
    return Api(ctx).routes()


# helpers (json_reply / read_json are shared with feature modules)


def _warnings_view(warnings: list[FieldError]) -> dict[str, Any]:
    """What an HTTPRoute stream's translation ignored, as {path, message} items (absent when nothing was)."""
    return {"warnings": [{"path": w.path, "message": w.message} for w in warnings]} if warnings else {}

def json_reply(data: Mapping[str, Any], revision: int | None = None, status: int = 200) -> web.Response:
    headers = {"ETag": _etag(revision)} if revision is not None else None
    return web.Response(text=json.dumps(data, indent=1) + "\n", status=status, content_type="application/json",
                        headers=headers)


def _etag(revision: int | None) -> str:
    return f'"{revision}"'


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}


def _if_match(request: web.Request) -> int | None:
    """`If-Match: "N"` (bare N and W/"N" accepted); `*` or no header: no precondition."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not _is_count(value):
        raise BadRequestError(f'expected a revision like "12", got {raw!r}', "If-Match")
    return int(value)


def _reason(request: web.Request) -> str:
    """`?reason=` wins over the `X-Turnout-Reason` header: a query string carries any UTF-8 text."""
    reason = request.query.get("reason")
    if reason is None:
        reason = request.headers.get(REASON_HEADER, "")
    reason = reason.strip()
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in reason):
        # History is printed on operators' terminals: an escape sequence in a reason would act on them.
        raise ValidationError([FieldError("reason", "control characters are not allowed")])
    if len(reason) > MAX_REASON:
        raise ValidationError([FieldError("reason", f"at most {MAX_REASON} characters, got {len(reason)}")])
    return reason


def _valid_name(request: web.Request, what: str) -> str:
    """Names in the URL are checked like names in a route file, so every stored state can be exported."""
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise ValidationError([FieldError("name", f"a {what} name is 1-63 letters, digits, '.', '_' or '-'")])
    return name


def _is_count(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes '²'), and few enough to fit SQLite's 64-bit integers."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("", "1", "true", "yes", "on")


def _int_param(raw: str | None, name: str, default: int | None, minimum: int, maximum: int | None) -> int:
    if raw is None or raw == "":
        if default is None:
            raise BadRequestError(f"{name} is required", name)
        return default
    if not _is_count(raw):
        raise BadRequestError(f"expected a whole number of at most 18 digits, got {raw!r}", name)
    n = int(raw)
    if n < minimum or (maximum is not None and n > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise BadRequestError(f"expected a number {bound}, got {n}", name)
    return n


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


async def read_json(request: web.Request, empty_ok: bool = False) -> object:
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise BadRequestError("expected a JSON body")
    try:
        return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"invalid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise BadRequestError(f"the body is not UTF-8 (byte {e.start})") from e
    except (ValueError, RecursionError) as e:
        raise BadRequestError(f"invalid JSON: {e}") from e


def _version_view(v: Version, state: State) -> dict[str, Any]:
    return {
        "name": v.name, "kind": v.spec.kind, "spec": version_to_dict(v), "instances": list(v.endpoints),
        "created": v.created, "routes": state.users_of(v.name),
    }


def _info_view(i: RevisionInfo) -> dict[str, Any]:
    return {"revision": i.number, "time": i.time, "actor": i.actor, "reason": i.reason, "summary": i.summary,
            "routes_changed": list(i.routes)}

