"""Validation at the boundary: plain data (YAML route files, JSON API bodies, stored revisions) -> model.

Every error names its field path and what was expected (`routes[0].split.v3: unknown version 'v3'`), all
errors of a document are reported at once, and unknown fields are refused rather than ignored. Nothing
here touches the current state: callers commit the result only when parsing succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import yaml

from proxy.checker import NAME_RE, TOKEN_RE, Checker, join_path, kind_of
from proxy.errors import FieldError, ValidationError
from proxy.identities import parse_identity, source_to_dict
from proxy.model import (
    HealthCheck,
    IdentitySource,
    Mirror,
    Route,
    State,
    Version,
    VersionSpec,
)
from proxy.parse_match import (
    actions_to_dict,
    check_route_actions,
    parse_filters,
    parse_matches,
    parse_retry,
    parse_timeouts,
    parse_version_filters,
)
from proxy.placement import endpoint_item, endpoints_out, stored_zones, version_zones, zone_fields_out
from proxy.select import BUCKETS, smallest_routing_weight, unrouted
from proxy.upstream_proto import parse_grpc_health, parse_protocol, protocol_to_dict
from proxy.upstream_tls import parse_tls, tls_to_dict

DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}\Z")
HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")

VERSION_FIELDS = {
    "endpoints", "command", "image", "allow_tag", "replicas", "port", "env", "network", "health",
    "labels", "check", "tls", "on_check_fail", "zone", "zones", "protocol",
}
STORED_VERSION_FIELDS = VERSION_FIELDS | {"kind", "instances", "created", "instance_zones"}
ROUTE_FIELDS = {
    "name", "match", "identity", "split", "sticky", "pins", "fallback", "mirror", "mirrors", "expose_version",
    "assignment_cookie", "assignment_cookie_max_age", "pins_require_verified", "require_identity",
    "matches", "filters", "version_filters", "timeouts", "retry", "zone_affinity", "grpc_method_label",
}


# Versions

def parse_endpoint(c: Checker, value: object, path: str) -> str | None:
    s = c.string(value, path, what="an http(s)://host:port URL")
    if s is None:
        return None
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError:
        c.fail(path, f"expected an http(s)://host:port URL, got {s!r}")
        return None
    if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("", "/") or u.query:
        c.fail(path, f"expected an http(s)://host:port URL (no path), got {s!r}")
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}:{port}"


def parse_version(c: Checker, name: str, value: object, path: str, *, stored: bool = False,
                  now: float = 0.0) -> Version | None:
    if not NAME_RE.fullmatch(name):
        c.fail(path, "a version name is 1-63 letters, digits, '.', '_' or '-'")
    d = c.mapping(value, path, STORED_VERSION_FIELDS if stored else VERSION_FIELDS)
    if d is None:
        return None
    before = len(c.errors)
    sources = [k for k in ("endpoints", "command", "image") if k in d]
    if len(sources) != 1:
        c.fail(path, "give exactly one of endpoints (static), command (local process) or image (docker)"
               + (f"; got {', '.join(sources)}" if sources else ""))
        return None
    kind = {"endpoints": "static", "command": "local", "image": "docker"}[sources[0]]
    endpoints: tuple[str, ...] = ()
    endpoint_zones: list[tuple[str, str]] = []
    command: tuple[str, ...] = ()
    image: str | None = None
    if kind == "static":
        raw = d["endpoints"]
        if not isinstance(raw, list) or not raw:
            c.fail(join_path(path, "endpoints"), "expected a non-empty list of http://host:port URLs")
        else:
            eps = [endpoint_item(e, f"{path}.endpoints[{i}]", lambda u, p: parse_endpoint(c, u, p), c.errors,
                                 endpoint_zones) for i, e in enumerate(raw)]
            endpoints = tuple(e for e in eps if e is not None)
    elif kind == "local":
        command = c.string_list(d["command"], join_path(path, "command"), single_ok=True) or ()
        if not command:
            c.fail(join_path(path, "command"), "expected a non-empty command")
    else:
        image = c.string(d["image"], join_path(path, "image"), what="an image reference")
    allow_tag = bool(c.boolean(d.get("allow_tag", False), join_path(path, "allow_tag")))
    if image is not None and not DIGEST_RE.search(image) and not allow_tag:
        c.fail(join_path(path, "image"), f"expected an image pinned by digest (repo@sha256:<64 hex>), got {image!r}; "
               "set allow_tag: true to accept a tag, resolved to its digest once")
    replicas = int(c.number(d.get("replicas", 1), join_path(path, "replicas"), 0, 1000, integer=True) or 0)
    port_v = d.get("port")
    port = None if port_v is None else c.number(port_v, join_path(path, "port"), 1, 65535, integer=True)
    env = c.string_pairs(d.get("env", {}), join_path(path, "env")) or ()
    network = d.get("network", "bridge")
    if network not in ("bridge", "host"):
        c.fail(join_path(path, "network"), f"expected 'bridge' or 'host', got {network!r}")
        network = "bridge"
    health = HealthCheck()
    if "health" in d:
        hpath = join_path(path, "health")
        h = c.mapping(d["health"], hpath, {"path", "interval", "timeout", "grpc"})
        if h is not None:
            grpc, gerrors = parse_grpc_health(h.get("grpc", False), f"{hpath}.grpc")
            c.errors.extend(gerrors)
            hp = c.string(h.get("path", "/"), f"{hpath}.path", re.compile(r"/[^\s]*"),
                          "a path starting with / (no spaces)")
            iv = c.number(h.get("interval", 2.0), f"{hpath}.interval", 0.05, 3600)
            to = c.number(h.get("timeout", 1.0), f"{hpath}.timeout", 0.01, 600)
            if hp and iv and to:
                health = HealthCheck(hp, float(iv), float(to), grpc)
    labels = c.string_pairs(d.get("labels", {}), join_path(path, "labels")) or ()
    check = c.string_list(d["check"], join_path(path, "check"), single_ok=True) if "check" in d else ()
    on_fail = d.get("on_check_fail", "flag")
    if on_fail not in ("flag", "shift"):
        c.fail(join_path(path, "on_check_fail"), f"expected flag or shift, got {on_fail!r}")
    elif on_fail == "shift" and not check:
        c.fail(join_path(path, "on_check_fail"), "needs a check command (check)")
    tls = None
    schemes = {e.partition(":")[0] for e in endpoints}
    if len(schemes) > 1:
        c.fail(join_path(path, "endpoints"), "mixes http:// and https:// endpoints; one version speaks one of them")
    if d.get("tls") is not None:
        tls, tls_errors = parse_tls(d["tls"], join_path(path, "tls"), stored=stored)
        c.errors.extend(tls_errors)
        if schemes != {"https"} and kind == "static" and endpoints:
            c.fail(join_path(path, "tls"), "applies to https:// endpoints; this version's are http://")
        elif kind != "static":
            c.fail(join_path(path, "tls"), "applies to static https:// endpoints only")
    zones = version_zones(d, kind, path, c.errors)
    protocol, perrors = parse_protocol(d.get("protocol", "http1"), join_path(path, "protocol"), kind, endpoints)
    c.errors.extend(perrors)
    if health.grpc is not None and protocol == "http1":
        c.fail(join_path(path, "health") + ".grpc", "gRPC speaks HTTP/2: set the version's protocol to h2c or h2")
    created = now
    instances = endpoints
    instance_zones = tuple(endpoint_zones)
    if stored:
        created = float(d.get("created", 0.0))
        if kind != "static":
            raw_inst = d.get("instances", [])
            inst = [parse_endpoint(c, e, f"{path}.instances[{i}]") for i, e in enumerate(raw_inst)]
            instances = tuple(e for e in inst if e is not None)
            instance_zones = stored_zones(d.get("instance_zones"), join_path(path, "instance_zones"), c.errors)
    if len(c.errors) > before:
        return None
    spec = VersionSpec(
        kind=cast(Any, kind), endpoints=endpoints, command=command, image=image, allow_tag=allow_tag,
        replicas=replicas, port=None if port is None else int(port), env=env,
        network=cast(Any, network), health=health, labels=labels, check=check or (), tls=tls, protocol=protocol,
        on_check_fail=cast(Any, on_fail),
        endpoint_zones=tuple(endpoint_zones), zones=zones,
    )
    return Version(name=name, spec=spec, endpoints=instances, created=created, zones=instance_zones)


def version_to_dict(v: Version) -> dict[str, Any]:
    s = v.spec
    d: dict[str, Any] = {}
    if s.kind == "static":
        d["endpoints"] = endpoints_out(s)
    elif s.kind == "local":
        d["command"] = list(s.command)
    else:
        d["image"] = s.image
        if s.allow_tag:
            d["allow_tag"] = True
    if s.kind != "static":
        d["replicas"] = s.replicas
        if s.port is not None:
            d["port"] = s.port
        if s.env:
            d["env"] = dict(s.env)
        d["network"] = s.network
    if s.health != HealthCheck():
        d["health"] = {"path": s.health.path, "interval": s.health.interval, "timeout": s.health.timeout}
    protocol_to_dict(s.protocol, s.health.grpc, d)
    if s.labels:
        d["labels"] = dict(s.labels)
    if s.check:
        d["check"] = list(s.check)
    if s.on_check_fail != "flag":
        d["on_check_fail"] = s.on_check_fail
    if s.tls is not None:
        d["tls"] = tls_to_dict(s.tls)
    zone_fields_out(v, d, stored=False)
    return d


def version_to_stored(v: Version) -> dict[str, Any]:
    d = version_to_dict(v)
    d["kind"] = v.spec.kind
    d["created"] = v.created
    if v.spec.kind != "static":
        d["instances"] = list(v.endpoints)
    zone_fields_out(v, d, stored=True)
    return d


# Routes

def split_weight_errors(split: tuple[tuple[str, float], ...], path: str = "") -> list[FieldError]:
    """A weight > 0 under the selector's resolution (1/BUCKETS of the split) is refused rather than shown in
    the split while routing nothing (or, rounded up, a whole bucket)."""
    weights = [w for _, w in split]
    total = sum(weights)
    errors = []
    for i in unrouted(weights):
        name, w = split[i]
        if w * BUCKETS < total * (1 - 1e-9):
            why = (f"weight {w:g} is {w / total * 100:.3g}% of the split, less than the smallest share that "
                   f"routes (1/{BUCKETS} = {100 / BUCKETS:g}%)")
        else:
            why = (f"weight {w:g} gets none of the {BUCKETS} buckets (the versions before it end on half a "
                   "bucket, which rounding gives to them), so no traffic")
        least = smallest_routing_weight(weights, i)
        errors.append(FieldError(join_path(path, name), f"{why}; use at least {least:g}, or 0"))
    return errors


def parse_route(c: Checker, value: object, path: str, versions: Mapping[str, Version],
                name: str | None = None, stored: bool = False) -> Route | None:
    d = c.mapping(value, path, ROUTE_FIELDS)
    if d is None:
        return None
    before = len(c.errors)
    if name is None:
        name = c.string(d.get("name"), join_path(path, "name"), NAME_RE, "a route name (letters, digits, . _ -)")
    else:
        if not NAME_RE.fullmatch(name):
            c.fail(join_path(path, "name"), "a route name is 1-63 letters, digits, '.', '_' or '-'")
        if "name" in d and d["name"] != name:
            c.fail(join_path(path, "name"), f"does not match the route name in the URL ({name!r})")

    def known(v: object, p: str) -> str | None:
        s = c.string(v, p, what="a version name")
        if s is not None and s not in versions:
            c.fail(p, f"unknown version {s!r}")
            return None
        return s

    match, more_matches = parse_matches(d, path, c.errors)
    filters = None if d.get("filters") is None else parse_filters(d["filters"], join_path(path, "filters"), c.errors)
    version_filters = () if d.get("version_filters") is None else parse_version_filters(
        d["version_filters"], join_path(path, "version_filters"), c.errors, versions)
    timeouts = None if d.get("timeouts") is None else parse_timeouts(
        d["timeouts"], join_path(path, "timeouts"), c.errors)
    retry = None if d.get("retry") is None else parse_retry(d["retry"], join_path(path, "retry"), c.errors)
    redirects = filters is not None and filters.redirect is not None
    identity: list[IdentitySource] = []
    if "identity" in d:
        identity, ierrors = parse_identity(d["identity"], join_path(path, "identity"), check_files=not stored)
        c.errors.extend(ierrors)
    split: list[tuple[str, float]] = []
    spath = join_path(path, "split")
    # A redirecting route answers every request itself: it needs no version.
    sm = c.mapping(d.get("split"), spath) if not redirects or d.get("split") is not None else None
    if sm is not None:
        for vname, w in sm.items():
            vp = join_path(spath, vname)
            if known(vname, vp) is None:
                continue
            weight = c.number(w, vp, 0)
            if weight is not None:
                split.append((vname, float(weight)))
        # All weights 0 is accepted: such a route answers 500 (HTTPRoute's all-zero backendRefs weights)
        # unless a pin or assignment names a version.
        if split and any(w > 0 for _, w in split) and not stored and len(c.errors) == before:
            # Stored revisions were accepted once: they load as they are (a rollback must never fail on this).
            c.errors.extend(split_weight_errors(tuple(split), spath))
        if not sm and not redirects:
            c.fail(spath, "expected at least one version with a weight")
    sticky = c.boolean(d.get("sticky", True), join_path(path, "sticky"))
    pins: dict[str, str] = {}
    if "pins" in d:
        ppath = join_path(path, "pins")
        pm = c.mapping(d["pins"], ppath)
        if pm is not None:
            for client, vname in pm.items():
                cp = join_path(ppath, client)
                if not client or len(client) > 256:
                    c.fail(cp, "a client id is 1-256 characters")
                    continue
                if isinstance(vname, str) and vname in versions:
                    pins[client] = vname
                else:
                    known(vname, cp)
    fallback: list[str] = []
    if "fallback" in d:
        fpath = join_path(path, "fallback")
        fl = d["fallback"]
        if isinstance(fl, str):
            fl = [fl]
        if not isinstance(fl, list):
            c.fail(fpath, f"expected a list of version names, got {kind_of(fl)}")
        else:
            for i, f in enumerate(fl):
                fp = f"{fpath}[{i}]"
                v = known(f, fp)
                if v is None:
                    continue
                if v in fallback:
                    c.fail(fp, f"version {v!r} is already in the chain (a fallback chain may not loop)")
                    continue
                fallback.append(v)
    mirrors: list[Mirror] = []
    if d.get("mirror") is not None and d.get("mirrors") is not None:
        c.fail(join_path(path, "mirrors"), "give either mirror (one) or mirrors (a list), not both")
    elif d.get("mirror") is not None or d.get("mirrors") is not None:
        one = d.get("mirror") is not None
        items = [(join_path(path, "mirror"), d["mirror"])] if one else []
        if not one:
            ml = d["mirrors"]
            if not isinstance(ml, list):
                c.fail(join_path(path, "mirrors"), f"expected a list of {{version, percent}}, got {kind_of(ml)}")
            else:
                items = [(f"{join_path(path, 'mirrors')}[{i}]", m) for i, m in enumerate(ml)]
        for mp, raw in items:
            mm = c.mapping(raw, mp, {"version", "percent"})
            if mm is None:
                continue
            mv = known(mm.get("version"), f"{mp}.version")
            pct = c.number(mm.get("percent", 100), f"{mp}.percent", 0, 100)
            if mv is not None and any(m.version == mv for m in mirrors):
                c.fail(f"{mp}.version", f"version {mv!r} is already a mirror of this route")
            elif mv is not None and pct is not None:
                mirrors.append(Mirror(mv, float(pct)))
    expose = c.boolean(d.get("expose_version", False), join_path(path, "expose_version"))
    cookie = None
    if d.get("assignment_cookie") is not None:
        cookie = c.string(d["assignment_cookie"], join_path(path, "assignment_cookie"), TOKEN_RE, "a cookie name")
    max_age = None
    if d.get("assignment_cookie_max_age") is not None:
        ap = join_path(path, "assignment_cookie_max_age")
        max_age = c.number(d["assignment_cookie_max_age"], ap, 1, 400 * 86400, integer=True)  # RFC 6265bis cap
        if "assignment_cookie" not in d:
            c.fail(ap, "needs assignment_cookie (the cookie it is the lifetime of)")
    verified = c.boolean(d.get("pins_require_verified", False), join_path(path, "pins_require_verified"))
    required = c.boolean(d.get("require_identity", False), join_path(path, "require_identity"))
    affinity = c.boolean(d.get("zone_affinity", True), join_path(path, "zone_affinity"))
    method_label = c.boolean(d.get("grpc_method_label", False), join_path(path, "grpc_method_label"))
    if not any(s.verified for s in identity) and len(c.errors) == before:
        for flag, on in (("pins_require_verified", verified), ("require_identity", required)):
            if on:
                c.fail(join_path(path, flag), "needs a verified identity source (client_cert, jwt or api_key)")
    if len(c.errors) > before or name is None:
        return None
    route = Route(
        name=name, match=match, identity=tuple(identity), split=tuple(split), sticky=bool(sticky),
        pins=pins, fallback=tuple(fallback), mirrors=tuple(mirrors), expose_version=bool(expose),
        assignment_cookie=cookie, pins_require_verified=bool(verified), require_identity=bool(required),
        zone_affinity=affinity is not False,
        assignment_cookie_max_age=None if max_age is None else int(max_age),
        more_matches=more_matches, filters=filters, version_filters=version_filters, timeouts=timeouts,
        retry=retry,
        grpc_method_label=bool(method_label),
    )
    check_route_actions(route, path, c.errors)
    return None if len(c.errors) > before else route


def route_to_dict(r: Route, with_name: bool = True, with_pins: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"name": r.name} if with_name else {}
    d.update(actions_to_dict(r))
    if r.identity:
        d["identity"] = [source_to_dict(s) for s in r.identity]
    if r.split or r.filters is None or r.filters.redirect is None:
        d["split"] = {v: (int(w) if w == int(w) else w) for v, w in r.split}
    d["sticky"] = r.sticky
    if r.pins and with_pins:
        d["pins"] = dict(r.pins)
    if r.fallback:
        d["fallback"] = list(r.fallback)
    if len(r.mirrors) == 1:  # the one-mirror form, as route files wrote it before several were possible
        d["mirror"] = {"version": r.mirrors[0].version, "percent": r.mirrors[0].percent}
    elif r.mirrors:
        d["mirrors"] = [{"version": m.version, "percent": m.percent} for m in r.mirrors]
    if r.expose_version:
        d["expose_version"] = True
    if r.assignment_cookie:
        d["assignment_cookie"] = r.assignment_cookie
    if r.assignment_cookie_max_age is not None:
        d["assignment_cookie_max_age"] = r.assignment_cookie_max_age
    if r.pins_require_verified:
        d["pins_require_verified"] = True
    if r.require_identity:
        d["require_identity"] = True
    if not r.zone_affinity:
        d["zone_affinity"] = False
    if r.grpc_method_label:
        d["grpc_method_label"] = True
    return d


# Whole documents

def parse_document(doc: object, *, now: float = 0.0, current: State | None = None) -> State:
    """A route file (`versions:` mapping, `routes:` list) -> State.

    With `current`, versions that exist keep their creation time and instances, and a changed spec for an
    existing name is refused (immutability).
    """
    c = Checker()
    d = c.mapping(doc, "", {"versions", "routes"})
    if d is None:
        c.raise_if_any()
        raise AssertionError("unreachable")
    versions: dict[str, Version] = {}
    vm = c.mapping(d.get("versions", {}), "versions")
    for name, spec in (vm or {}).items():
        v = parse_version(c, name, spec, join_path("versions", name), now=now)
        if v is None:
            # Keep the name known so routes do not report a second, misleading "unknown version".
            versions[name] = Version(name, VersionSpec("static"), ())
            continue
        old = current.versions.get(name) if current else None
        if old is not None:
            if old.spec != v.spec:
                c.fail(join_path("versions", name), f"version {name!r} exists with a different spec; versions are "
                       "immutable: register the change under a new name")
            v = old
        versions[name] = v
    routes: list[Route] = []
    raw_routes = d.get("routes", [])
    if not isinstance(raw_routes, list):
        c.fail("routes", f"expected a list of routes, got {kind_of(raw_routes)}")
        raw_routes = []
    seen: set[str] = set()
    for i, rd in enumerate(raw_routes):
        r = parse_route(c, rd, f"routes[{i}]", versions)
        if r is None:
            continue
        if r.name in seen:
            c.fail(f"routes[{i}].name", f"duplicate route name {r.name!r}")
            continue
        seen.add(r.name)
        routes.append(r)
    c.raise_if_any()
    return State(versions=versions, routes=tuple(routes))


def parse_yaml(text: str, *, now: float = 0.0, current: State | None = None) -> State:
    try:
        # libyaml's C loader is ~10x faster: a route file with 100,000 pins loads in well under a second.
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValidationError([FieldError("", f"invalid YAML: {where}{getattr(e, 'problem', e)}")]) from e
    return parse_document(doc if doc is not None else {}, now=now, current=current)


def document_of(state: State) -> dict[str, Any]:
    """State -> route-file shape (what `turnout apply` would send to reproduce it)."""
    return {
        "versions": {n: version_to_dict(v) for n, v in state.versions.items()},
        "routes": [route_to_dict(r) for r in state.routes],
    }


def state_to_stored(state: State) -> dict[str, Any]:
    """State -> the JSON shape stored in revisions and served by GET /api/v1/state (routes keyed by name)."""
    return {
        "versions": {n: version_to_stored(v) for n, v in state.versions.items()},
        "routes": {r.name: route_to_dict(r, with_name=False) for r in state.routes},
    }


def state_from_stored(data: Mapping[str, Any]) -> State:
    c = Checker()
    versions: dict[str, Version] = {}
    for name, spec in cast(Mapping[str, Any], data.get("versions", {})).items():
        v = parse_version(c, name, spec, join_path("versions", name), stored=True)
        if v is not None:
            versions[name] = v
    routes = []
    for name, rd in cast(Mapping[str, Any], data.get("routes", {})).items():
        r = parse_route(c, rd, join_path("routes", name), versions, name=name, stored=True)
        if r is not None:
            routes.append(r)
    c.raise_if_any()
    return State(versions=versions, routes=tuple(routes))


def parse_route_body(body: object, name: str, state: State) -> Route:
    c = Checker()
    r = parse_route(c, body, "", state.versions, name=name)
    c.raise_if_any()
    assert r is not None
    return r


def parse_version_body(body: object, name: str, now: float) -> Version:
    c = Checker()
    v = parse_version(c, name, body, "", now=now)
    c.raise_if_any()
    assert v is not None
    return v


def parse_split_body(body: object, state_versions: Mapping[str, Version]) -> dict[str, float]:
    c = Checker()
    m = c.mapping(body, "")
    out: dict[str, float] = {}
    for vname, w in (m or {}).items():
        if vname not in state_versions:
            c.fail(vname, f"unknown version {vname!r}")
            continue
        n = c.number(w, vname, 0)
        if n is not None:
            out[vname] = float(n)
    if m is not None and not m:
        c.fail("", "expected at least one version with a weight")
    c.raise_if_any()
    return out


