"""Where a version's instances run: the zone fields of route files, API bodies and stored revisions.

Design rule: sans-IO like proxy.parse, which calls these for its versions; errors come back as FieldError
lists naming the field (`versions.v1.endpoints[2].zone: ...`), never raised. A static endpoint is a plain
URL (zone unknown) or `{url: ..., zone: ...}`; a local version may say `zone:` (default: the proxy's), a
docker version `zones:` (the engines its replicas are spread over). Current instances' zones are stored
beside them (`instance_zones`), so they survive a restart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import FieldError
from proxy.model import Version, VersionSpec

ZONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENDPOINT_FIELDS = frozenset({"url", "zone"})
ZONE_WHAT = "a zone name (1-63 letters, digits, '.', '_' or '-')"


def check_zone(value: object, path: str, errors: list[FieldError]) -> str | None:
    if isinstance(value, str) and ZONE_RE.fullmatch(value):
        return value
    shown = repr(value) if isinstance(value, str) else type(value).__name__
    errors.append(FieldError(path, f"expected {ZONE_WHAT}, got {shown}"))
    return None


def endpoint_item(value: object, path: str, parse_url: Callable[[object, str], str | None],
                  errors: list[FieldError], zones: list[tuple[str, str]]) -> str | None:
    """One item of a static `endpoints:` list (a URL, or {url, zone}) -> its URL (parsed by `parse_url`), or
    None after adding to `errors`; a zone given is added to `zones` as (URL, zone)."""
    if not isinstance(value, Mapping):
        return parse_url(value, path)
    before = len(errors)
    for k in value:
        if k not in ENDPOINT_FIELDS:
            errors.append(FieldError(f"{path}.{k}", "unknown field (expected one of: url, zone)"))
    if "url" not in value:
        errors.append(FieldError(f"{path}.url", "required (an http(s)://host:port URL)"))
        return None
    zone = check_zone(value["zone"], f"{path}.zone", errors) if "zone" in value else None
    url = parse_url(value["url"], f"{path}.url")
    if url is None or len(errors) > before:
        return None
    if zone is not None:
        zones.append((url, zone))
    return url


def version_zones(d: Mapping[str, Any], kind: str, path: str, errors: list[FieldError]) -> tuple[str, ...]:
    """The `zone` (local) / `zones` (docker) fields of a version mapping -> VersionSpec.zones."""
    out: list[str] = []
    if "zone" in d:
        if kind != "local":
            hint = "; a docker version spreads over `zones`" if kind == "docker" else \
                "; give each endpoint as {url: ..., zone: ...}"
            errors.append(FieldError(f"{path}.zone", f"applies to local (command) versions only{hint}"))
        else:
            z = check_zone(d["zone"], f"{path}.zone", errors)
            if z is not None:
                out.append(z)
    if "zones" in d:
        raw = d["zones"]
        if kind != "docker":
            errors.append(FieldError(f"{path}.zones", "applies to docker (image) versions only"))
        elif isinstance(raw, str):
            raw = [z.strip() for z in raw.split(",")]
        if kind == "docker" and not isinstance(raw, list):
            errors.append(FieldError(f"{path}.zones", f"expected a list of zone names, got {type(raw).__name__}"))
        elif kind == "docker":
            for i, item in enumerate(raw):
                z = check_zone(item, f"{path}.zones[{i}]", errors)
                if z is not None and z in out:
                    errors.append(FieldError(f"{path}.zones[{i}]", f"zone {z!r} is listed twice"))
                elif z is not None:
                    out.append(z)
    return tuple(out)


def stored_zones(value: object, path: str, errors: list[FieldError]) -> tuple[tuple[str, str], ...]:
    """A stored revision's `instance_zones` ({URL: zone}) -> Version.zones."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        errors.append(FieldError(path, f"expected a mapping of endpoint URL to zone, got {type(value).__name__}"))
        return ()
    out = []
    for url, zone in value.items():
        z = check_zone(zone, f"{path}[{url!r}]", errors)
        if isinstance(url, str) and z is not None:
            out.append((url, z))
    return tuple(out)


def endpoints_out(spec: VersionSpec) -> list[Any]:
    """A static version's `endpoints:` as written: plain URLs, `{url, zone}` for those with a zone."""
    zones = dict(spec.endpoint_zones)
    return [{"url": e, "zone": zones[e]} if e in zones else e for e in spec.endpoints]


def zone_fields_out(v: Version, d: dict[str, Any], stored: bool) -> None:
    """Adds the zone fields of `v` to its route-file (or, `stored`, revision) mapping `d`."""
    s = v.spec
    if s.kind == "local" and s.zones:
        d["zone"] = s.zones[0]
    elif s.kind == "docker" and s.zones:
        d["zones"] = list(s.zones)
    if stored and s.kind != "static" and v.zones:
        d["instance_zones"] = dict(v.zones)
