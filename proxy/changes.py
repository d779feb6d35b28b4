"""Every state change, as a pure function: old state + request -> new state + one-line summary.

Design rule: the admin API, the CLI's file apply, the providers (instances, docker replica counts) and the
canary controller all change the state through these and nothing else, so every change is validated the
same way and described by the same summary in history. Each raises (ValidationError / ConflictError /
NotFoundError) instead of returning a partial state. No I/O here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from proxy.errors import ConflictError, FieldError, NotFoundError, ValidationError
from proxy.model import Route, State, Version
from proxy.parse import split_weight_errors

Change = tuple[State, str]  # (new state, one-line summary)


def _replace_route(state: State, route: Route) -> State:
    routes = tuple(route if r.name == route.name else r for r in state.routes)
    if state.route(route.name) is None:
        routes = (*state.routes, route)
    return dataclasses.replace(state, routes=routes)


def _need_route(state: State, name: str) -> Route:
    r = state.route(name)
    if r is None:
        raise NotFoundError(f"no route named {name!r}")
    return r


def _split_text(split: tuple[tuple[str, float], ...]) -> str:
    return " ".join(f"{v}={w:g}" for v, w in split)


def put_version(state: State, version: Version) -> Change:
    old = state.versions.get(version.name)
    if old is not None:
        if old.spec == version.spec:
            return state, ""
        raise ConflictError(f"version {version.name!r} exists with a different spec; versions are immutable: "
                            "register the change under a new name")
    versions = {**state.versions, version.name: version}
    return dataclasses.replace(state, versions=versions), f"register version {version.name} ({version.spec.kind})"


def delete_version(state: State, name: str) -> Change:
    if name not in state.versions:
        raise NotFoundError(f"no version named {name!r}")
    users = state.users_of(name)
    if users:
        raise ConflictError(f"version {name!r} is still referenced by route(s) {', '.join(users)}")
    versions = {k: v for k, v in state.versions.items() if k != name}
    return dataclasses.replace(state, versions=versions), f"retire version {name}"


def set_instances(state: State, name: str, endpoints: tuple[str, ...],
                  zones: tuple[tuple[str, str], ...] | None = None) -> Change:
    """Providers report where a version's instances are (and, `zones`, in which zone each runs: (URL,
    zone) pairs; None keeps the zones recorded); the spec stays as registered."""
    v = state.versions.get(name)
    if v is None:
        raise NotFoundError(f"no version named {name!r}")
    zones = v.zones if zones is None else zones
    if v.endpoints == endpoints and v.zones == zones:
        return state, ""
    versions = {**state.versions, name: dataclasses.replace(v, endpoints=endpoints, zones=zones)}
    return dataclasses.replace(state, versions=versions), f"{name}: {len(endpoints)} instance(s)"


def put_route(state: State, route: Route) -> Change:
    old = state.route(route.name)
    if old == route:
        return state, ""
    verb = "create" if old is None else "replace"
    return _replace_route(state, route), f"{verb} route {route.name}: {_split_text(route.split)}"


def delete_route(state: State, name: str) -> Change:
    _need_route(state, name)
    return dataclasses.replace(state, routes=tuple(r for r in state.routes if r.name != name)), \
        f"delete route {name}"


def set_split(state: State, name: str, weights: Mapping[str, float]) -> Change:
    """Merge weights into the route's split, keeping each version's bucket position (new ones go last)."""
    route = _need_route(state, name)
    errors = [FieldError(v, f"unknown version {v!r}") for v in weights if v not in state.versions]
    if errors:
        raise ValidationError(errors)
    merged = dict(route.split)
    merged.update(weights)
    split = tuple(merged.items())
    if not any(w > 0 for _, w in split):
        raise ValidationError([FieldError("", "at least one weight must be > 0")])
    if split == route.split:
        return state, ""
    # The merged split counts: raising one weight can leave another, not named here, too small to route.
    too_small = split_weight_errors(split)
    if too_small:
        raise ValidationError(too_small)
    return _replace_route(state, dataclasses.replace(route, split=split)), \
        f"split {name}: {_split_text(route.split)} -> {_split_text(split)}"


def drop_from_split(state: State, name: str, version: str) -> Change:
    """Remove a weight-0 version from the route's split. A weight-0 entry holds no sticky bucket, so no
    session moves; what ends is that an assignment cookie naming it is honoured (CompiledRoute.assigned)."""
    route = _need_route(state, name)
    split = tuple((v, w) for v, w in route.split if v != version)
    if split == route.split:
        return state, ""
    if dict(route.split)[version] > 0:
        raise ConflictError(f"version {version!r} still has weight on route {name!r}")
    if not any(w > 0 for _, w in split):
        raise ValidationError([FieldError("", "at least one weight must be > 0")])
    return _replace_route(state, dataclasses.replace(route, split=split)), \
        f"split {name}: {_split_text(route.split)} -> {_split_text(split)}"


def pin(state: State, name: str, client: str, version: str) -> Change:
    route = _need_route(state, name)
    if not client or len(client) > 256:
        raise ValidationError([FieldError("client", "a client id is 1-256 characters")])
    if version not in state.versions:
        raise ValidationError([FieldError("version", f"unknown version {version!r}")])
    if route.pins.get(client) == version:
        return state, ""
    pins = {**route.pins, client: version}
    return _replace_route(state, dataclasses.replace(route, pins=pins)), f"pin {name}: {client} -> {version}"


def unpin(state: State, name: str, client: str) -> Change:
    route = _need_route(state, name)
    if client not in route.pins:
        raise NotFoundError(f"client {client!r} is not pinned on route {name!r}")
    pins = dict(route.pins)  # a C-level copy: a comprehension over 100,000 pins costs 10x more
    del pins[client]
    return _replace_route(state, dataclasses.replace(route, pins=pins)), f"unpin {name}: {client}"


def rollback_route(state: State, name: str, earlier: State, earlier_revision: int) -> Change:
    """Put route `name` back as it was in `earlier`. Versions it needs must still be registered."""
    old = earlier.route(name)
    if old is None:
        if state.route(name) is None:
            raise NotFoundError(f"route {name!r} exists neither now nor at revision {earlier_revision}")
        new_state, _ = delete_route(state, name)
        return new_state, f"rollback {name} to revision {earlier_revision} (route did not exist)"
    missing = sorted(old.referenced_versions() - set(state.versions))
    if missing:
        raise ConflictError(f"revision {earlier_revision} of {name!r} uses retired version(s) {', '.join(missing)}")
    return _replace_route(state, old), f"rollback {name} to revision {earlier_revision}: {_split_text(old.split)}"


def apply_document(state: State, new: State) -> Change:
    """Replace routes and versions with a parsed route file's. Unlisted, unreferenced versions are retired."""
    if new == state:
        return state, ""
    added = sorted(set(new.versions) - set(state.versions))
    removed = sorted(set(state.versions) - set(new.versions))
    parts = [f"{len(new.routes)} route(s)"]
    if added:
        parts.append("+" + ",".join(added))
    if removed:
        parts.append("-" + ",".join(removed))
    return new, "apply file: " + " ".join(parts)


def route_changes(old: State, new: State) -> set[str]:
    """Names of routes that differ between two states (history filtering by route)."""
    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    return {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}


# Who can reach a version (what scaling it to zero, or the check gate, looks at)


def reachable(route: Route, among: set[str], pins: bool = True) -> set[str]:
    """The versions of `among` that route `route` can send a request, or a mirrored copy, to.

    A weight-0 version of the split counts on a route with an assignment cookie: the data plane honours
    the cookie for it (that is what a drain keeps serving), and a client chooses its own cookie.
    """
    cookie = route.assignment_cookie is not None
    names = {v for v, w in route.split if v in among and (w > 0 or cookie)}
    names.update(v for v in route.fallback if v in among)
    names.update(m.version for m in route.mirrors if m.percent > 0 and m.version in among)
    if pins and route.pins and not among <= names:
        # Pins may number 100,000: one pass over their values (about 2 ms), only when it can matter.
        names.update(among.intersection(route.pins.values()))
    return names


def routes_serving(state: State, version: str) -> list[str]:
    """Routes that can send `version` requests now (what scaling it to zero would cut off)."""
    among = {version}
    return [r.name for r in state.routes if reachable(r, among)]


def set_replicas(state: State, name: str, replicas: int, *, force: bool = False) -> Change:
    """Scaling changes how many copies run, not what runs, so it is the one spec field that may change.

    Zero replicas for a version that still receives traffic is refused like retiring it: its requests
    would all fail. `force` is for the operator who means it.
    """
    v = state.versions.get(name)
    if v is None:
        raise NotFoundError(f"no version named {name!r}")
    if v.spec.kind != "docker":
        raise ConflictError(f"version {name!r} is a {v.spec.kind} version; only docker versions scale")
    if replicas < 0 or replicas > 1000:
        raise ValidationError([FieldError("replicas", f"expected an integer between 0 and 1000, got {replicas}")])
    if v.spec.replicas == replicas:
        return state, ""
    serving = routes_serving(state, name) if replicas == 0 and not force else []
    if serving:
        raise ConflictError(f"version {name!r} receives traffic on route(s) {', '.join(serving)}: with 0 replicas "
                            "those requests would fail (503); move its traffic first, or force")
    spec = dataclasses.replace(v.spec, replicas=replicas)
    versions = {**state.versions, name: dataclasses.replace(v, spec=spec)}
    return dataclasses.replace(state, versions=versions), f"scale {name}: {v.spec.replicas} -> {replicas} replica(s)"
