"""Validation at the boundary: plain data (YAML route files, JSON API bodies, stored revisions) -> model.

Every error names its field path and what was expected (`routes[0].split.v3: unknown version 'v3'`), all
errors of a document are reported at once, and unknown fields are refused rather than ignored. Nothing
here touches the current state: callers commit the result only when parsing succeeded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import yaml

from proxy.errors import FieldError, ValidationError
from proxy.identities import parse_identity, source_to_dict
from proxy.model import (
    HealthCheck,
    IdentitySource,
    Match,
    Mirror,
    Route,
    State,
    Version,
    VersionSpec,
)
from proxy.select import BUCKETS, smallest_routing_weight, unrouted
from proxy.upstream_proto import parse_grpc_health, parse_protocol, protocol_to_dict
from proxy.upstream_tls import parse_tls, tls_to_dict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}\Z")
HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")

VERSION_FIELDS = {
    "endpoints", "command", "image", "allow_tag", "replicas", "port", "env", "network", "health",
    "labels", "check", "tls", "protocol",
}
STORED_VERSION_FIELDS = VERSION_FIELDS | {"kind", "instances", "created"}
ROUTE_FIELDS = {
    "name", "match", "identity", "split", "sticky", "pins", "fallback", "mirror", "expose_version",
    "assignment_cookie", "pins_require_verified", "require_identity", "grpc_method_label",
}


class Checker:
    """Collects field errors while a document is walked."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)

    def mapping(self, value: object, path: str, allowed: set[str] | None = None) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_kind(value)}")
            return None
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                self.fail(path, f"keys must be strings, got {_kind(k)} {k!r}")
                continue
            if allowed is not None and k not in allowed:
                self.fail(_join(path, k), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
                continue
            out[k] = v
        return out

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "a string") -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected {what}, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"expected {what}, got {value!r}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_kind(value)}")
            return None
        return value

    def number(self, value: object, path: str, minimum: float, maximum: float | None = None,
               integer: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            self.fail(path, f"expected {'an integer' if integer else 'a number'}, got {_kind(value)}")
            return None
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
            self.fail(path, f"expected a number {bound}, got {value!r}")
            return None
        return value

    def string_list(self, value: object, path: str, single_ok: bool = False) -> tuple[str, ...] | None:
        if single_ok and isinstance(value, str):
            return tuple(value.split())
        if not isinstance(value, list):
            self.fail(path, f"expected a list of strings, got {_kind(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is not None:
                out.append(s)
        return tuple(out)

    def string_pairs(self, value: object, path: str, key_re: re.Pattern[str] | None = None,
                     lower_keys: bool = False) -> tuple[tuple[str, str], ...] | None:
        m = self.mapping(value, path)
        if m is None:
            return None
        out = []
        for k, v in m.items():
            if key_re is not None and not key_re.fullmatch(k):
                self.fail(_join(path, k), "invalid name")
                continue
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.fail(_join(path, k), f"expected a string, got {_kind(v)}")
                continue
            out.append((k.lower() if lower_keys else k, str(v)))
        return tuple(out)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    if NAME_RE.fullmatch(key) or TOKEN_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


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
    command: tuple[str, ...] = ()
    image: str | None = None
    if kind == "static":
        raw = d["endpoints"]
        if not isinstance(raw, list) or not raw:
            c.fail(_join(path, "endpoints"), "expected a non-empty list of http://host:port URLs")
        else:
            eps = [parse_endpoint(c, e, f"{path}.endpoints[{i}]") for i, e in enumerate(raw)]
            endpoints = tuple(e for e in eps if e is not None)
    elif kind == "local":
        command = c.string_list(d["command"], _join(path, "command"), single_ok=True) or ()
        if not command:
            c.fail(_join(path, "command"), "expected a non-empty command")
    else:
        image = c.string(d["image"], _join(path, "image"), what="an image reference")
    allow_tag = bool(c.boolean(d.get("allow_tag", False), _join(path, "allow_tag")))
    if image is not None and not DIGEST_RE.search(image) and not allow_tag:
        c.fail(_join(path, "image"), f"expected an image pinned by digest (repo@sha256:<64 hex>), got {image!r}; "
               "set allow_tag: true to accept a tag, resolved to its digest once")
    replicas = int(c.number(d.get("replicas", 1), _join(path, "replicas"), 0, 1000, integer=True) or 0)
    port_v = d.get("port")
    port = None if port_v is None else c.number(port_v, _join(path, "port"), 1, 65535, integer=True)
    env = c.string_pairs(d.get("env", {}), _join(path, "env")) or ()
    network = d.get("network", "bridge")
    if network not in ("bridge", "host"):
        c.fail(_join(path, "network"), f"expected 'bridge' or 'host', got {network!r}")
        network = "bridge"
    health = HealthCheck()
    if "health" in d:
        hpath = _join(path, "health")
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
    labels = c.string_pairs(d.get("labels", {}), _join(path, "labels")) or ()
    check = c.string_list(d["check"], _join(path, "check"), single_ok=True) if "check" in d else ()
    tls = None
    schemes = {e.partition(":")[0] for e in endpoints}
    if len(schemes) > 1:
        c.fail(_join(path, "endpoints"), "mixes http:// and https:// endpoints; one version speaks one of them")
    if d.get("tls") is not None:
        tls, tls_errors = parse_tls(d["tls"], _join(path, "tls"), stored=stored)
        c.errors.extend(tls_errors)
        if schemes != {"https"} and kind == "static" and endpoints:
            c.fail(_join(path, "tls"), "applies to https:// endpoints; this version's are http://")
        elif kind != "static":
            c.fail(_join(path, "tls"), "applies to static https:// endpoints only")
    protocol, perrors = parse_protocol(d.get("protocol", "http1"), _join(path, "protocol"), kind, endpoints)
    c.errors.extend(perrors)
    if health.grpc is not None and protocol == "http1":
        c.fail(_join(path, "health") + ".grpc", "gRPC speaks HTTP/2: set the version's protocol to h2c or h2")
    created = now
    instances = endpoints
    if stored:
        created = float(d.get("created", 0.0))
        if kind != "static":
            raw_inst = d.get("instances", [])
            inst = [parse_endpoint(c, e, f"{path}.instances[{i}]") for i, e in enumerate(raw_inst)]
            instances = tuple(e for e in inst if e is not None)
    if len(c.errors) > before:
        return None
    spec = VersionSpec(
        kind=cast(Any, kind), endpoints=endpoints, command=command, image=image, allow_tag=allow_tag,
        replicas=replicas, port=None if port is None else int(port), env=env,
        network=cast(Any, network), health=health, labels=labels, check=check or (), tls=tls, protocol=protocol,
    )
    return Version(name=name, spec=spec, endpoints=instances, created=created)


def version_to_dict(v: Version) -> dict[str, Any]:
    s = v.spec
    d: dict[str, Any] = {}
    if s.kind == "static":
        d["endpoints"] = list(s.endpoints)
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
    if s.tls is not None:
        d["tls"] = tls_to_dict(s.tls)
    return d


def version_to_stored(v: Version) -> dict[str, Any]:
    d = version_to_dict(v)
    d["kind"] = v.spec.kind
    d["created"] = v.created
    if v.spec.kind != "static":
        d["instances"] = list(v.endpoints)
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
        errors.append(FieldError(_join(path, name), f"{why}; use at least {least:g}, or 0"))
    return errors


def parse_route(c: Checker, value: object, path: str, versions: Mapping[str, Version],
                name: str | None = None, stored: bool = False) -> Route | None:
    d = c.mapping(value, path, ROUTE_FIELDS)
    if d is None:
        return None
    before = len(c.errors)
    if name is None:
        name = c.string(d.get("name"), _join(path, "name"), NAME_RE, "a route name (letters, digits, . _ -)")
    else:
        if not NAME_RE.fullmatch(name):
            c.fail(_join(path, "name"), "a route name is 1-63 letters, digits, '.', '_' or '-'")
        if "name" in d and d["name"] != name:
            c.fail(_join(path, "name"), f"does not match the route name in the URL ({name!r})")

    def known(v: object, p: str) -> str | None:
        s = c.string(v, p, what="a version name")
        if s is not None and s not in versions:
            c.fail(p, f"unknown version {s!r}")
            return None
        return s

    match = Match()
    if "match" in d:
        mpath = _join(path, "match")
        m = c.mapping(d["match"], mpath, {"host", "path_prefix", "headers"})
        if m is not None:
            host = None
            if m.get("host") is not None:
                host = c.string(m["host"], f"{mpath}.host", HOST_RE, "a host name or *.domain")
            prefix = c.string(m.get("path_prefix", "/"), f"{mpath}.path_prefix", re.compile(r"^/[^\s?#]*$"),
                              "a path starting with / (no query)")
            hdrs = c.string_pairs(m.get("headers", {}), f"{mpath}.headers", TOKEN_RE, lower_keys=True)
            match = Match(host.lower() if host else None, prefix or "/", hdrs or ())
    identity: list[IdentitySource] = []
    if "identity" in d:
        identity, ierrors = parse_identity(d["identity"], _join(path, "identity"), check_files=not stored)
        c.errors.extend(ierrors)
    split: list[tuple[str, float]] = []
    spath = _join(path, "split")
    sm = c.mapping(d.get("split"), spath)
    if sm is not None:
        for vname, w in sm.items():
            vp = _join(spath, vname)
            if known(vname, vp) is None:
                continue
            weight = c.number(w, vp, 0)
            if weight is not None:
                split.append((vname, float(weight)))
        if sm and split and not any(w > 0 for _, w in split) and len(c.errors) == before:
            c.fail(spath, "at least one weight must be > 0")
        elif split and not stored and len(c.errors) == before:
            # Stored revisions were accepted once: they load as they are (a rollback must never fail on this).
            c.errors.extend(split_weight_errors(tuple(split), spath))
        if not sm:
            c.fail(spath, "expected at least one version with a weight")
    sticky = c.boolean(d.get("sticky", True), _join(path, "sticky"))
    pins: dict[str, str] = {}
    if "pins" in d:
        ppath = _join(path, "pins")
        pm = c.mapping(d["pins"], ppath)
        if pm is not None:
            for client, vname in pm.items():
                cp = _join(ppath, client)
                if not client or len(client) > 256:
                    c.fail(cp, "a client id is 1-256 characters")
                    continue
                if isinstance(vname, str) and vname in versions:
                    pins[client] = vname
                else:
                    known(vname, cp)
    fallback: list[str] = []
    if "fallback" in d:
        fpath = _join(path, "fallback")
        fl = d["fallback"]
        if isinstance(fl, str):
            fl = [fl]
        if not isinstance(fl, list):
            c.fail(fpath, f"expected a list of version names, got {_kind(fl)}")
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
    mirror = None
    if d.get("mirror") is not None:
        mp = _join(path, "mirror")
        mm = c.mapping(d["mirror"], mp, {"version", "percent"})
        if mm is not None:
            mv = known(mm.get("version"), f"{mp}.version")
            pct = c.number(mm.get("percent", 100), f"{mp}.percent", 0, 100)
            if mv is not None and pct is not None:
                mirror = Mirror(mv, float(pct))
    expose = c.boolean(d.get("expose_version", False), _join(path, "expose_version"))
    cookie = None
    if d.get("assignment_cookie") is not None:
        cookie = c.string(d["assignment_cookie"], _join(path, "assignment_cookie"), TOKEN_RE, "a cookie name")
    verified = c.boolean(d.get("pins_require_verified", False), _join(path, "pins_require_verified"))
    required = c.boolean(d.get("require_identity", False), _join(path, "require_identity"))
    method_label = c.boolean(d.get("grpc_method_label", False), _join(path, "grpc_method_label"))
    if not any(s.verified for s in identity) and len(c.errors) == before:
        for flag, on in (("pins_require_verified", verified), ("require_identity", required)):
            if on:
                c.fail(_join(path, flag), "needs a verified identity source (client_cert, jwt or api_key)")
    if len(c.errors) > before or name is None:
        return None
    return Route(
        name=name, match=match, identity=tuple(identity), split=tuple(split), sticky=bool(sticky),
        pins=pins, fallback=tuple(fallback), mirror=mirror, expose_version=bool(expose),
        assignment_cookie=cookie, pins_require_verified=bool(verified), require_identity=bool(required),
        grpc_method_label=bool(method_label),
    )


def route_to_dict(r: Route, with_name: bool = True, with_pins: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"name": r.name} if with_name else {}
    m: dict[str, Any] = {"path_prefix": r.match.path_prefix}
    if r.match.host:
        m["host"] = r.match.host
    if r.match.headers:
        m["headers"] = dict(r.match.headers)
    d["match"] = m
    if r.identity:
        d["identity"] = [source_to_dict(s) for s in r.identity]
    d["split"] = {v: (int(w) if w == int(w) else w) for v, w in r.split}
    d["sticky"] = r.sticky
    if r.pins and with_pins:
        d["pins"] = dict(r.pins)
    if r.fallback:
        d["fallback"] = list(r.fallback)
    if r.mirror:
        d["mirror"] = {"version": r.mirror.version, "percent": r.mirror.percent}
    if r.expose_version:
        d["expose_version"] = True
    if r.assignment_cookie:
        d["assignment_cookie"] = r.assignment_cookie
    if r.pins_require_verified:
        d["pins_require_verified"] = True
    if r.require_identity:
        d["require_identity"] = True
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
        v = parse_version(c, name, spec, _join("versions", name), now=now)
        if v is None:
            # Keep the name known so routes do not report a second, misleading "unknown version".
            versions[name] = Version(name, VersionSpec("static"), ())
            continue
        old = current.versions.get(name) if current else None
        if old is not None:
            if old.spec != v.spec:
                c.fail(_join("versions", name), f"version {name!r} exists with a different spec; versions are "
                       "immutable: register the change under a new name")
            v = old
        versions[name] = v
    routes: list[Route] = []
    raw_routes = d.get("routes", [])
    if not isinstance(raw_routes, list):
        c.fail("routes", f"expected a list of routes, got {_kind(raw_routes)}")
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
        v = parse_version(c, name, spec, _join("versions", name), stored=True)
        if v is not None:
            versions[name] = v
    routes = []
    for name, rd in cast(Mapping[str, Any], data.get("routes", {})).items():
        r = parse_route(c, rd, _join("routes", name), versions, name=name, stored=True)
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


