"""turnout state -> Kubernetes HTTPRoute documents (plus annotations) and turnout/v1 Version documents.

Each native route becomes one HTTPRoute with one unnamed rule, named after the route, so reading the export
back (proxy.httproute) gives the same route name. What HTTPRoute cannot say rides in `turnout/`
annotations (pins, fallback, identity, sticky, expose-version, pins-require-verified, require-identity);
the assignment cookie becomes a Cookie sessionPersistence.

Design rule: sans-IO and the exact inverse of the translation: apply(export(state)) == state (a
hypothesis property in tests/test_httproute_export.py). It reads the stored JSON shape (routes as
proxy.parse.route_to_dict writes them, versions as version_to_stored), so it is independent of the model's
attribute names; a native field it has no HTTPRoute form for is an ExportError naming it, never dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from proxy.errors import TurnoutError
from proxy.httproute import ANNOTATION_PREFIX, TURNOUT_API
from proxy.httproute_rules import HOSTNAME_RE, MAX_WEIGHT

HTTPROUTE_API = "gateway.networking.k8s.io/v1"
# Stored-only version fields (proxy.parse.version_to_stored) that a route file does not carry.
STORED_ONLY = ("kind", "created", "instances")
_SHORT_IDENTITY = ("header", "cookie", "query", "client_cert")


class ExportError(TurnoutError):
    """The state holds something HTTPRoute plus turnout's annotations cannot express."""

    status_hint = 422


def export_documents(stored: Mapping[str, Any], route: str | None = None) -> list[dict[str, Any]]:
    """The stored state (GET /api/v1/state, /revisions/N) -> Version documents, then one HTTPRoute per route.
    With `route`, only that route and the versions it names."""
    routes: Mapping[str, Any] = stored.get("routes", {})
    versions: Mapping[str, Any] = stored.get("versions", {})
    if route is not None:
        if route not in routes:
            raise ExportError(f"no route named {route!r}")
        routes = {route: routes[route]}
        used = _referenced(routes[route])
        versions = {n: v for n, v in versions.items() if n in used}
    docs: list[dict[str, Any]] = [
        {"apiVersion": TURNOUT_API, "kind": "Version", "metadata": {"name": n},
         "spec": {k: v for k, v in spec.items() if k not in STORED_ONLY}}
        for n, spec in versions.items()
    ]
    docs.extend(httproute_of(name, r) for name, r in routes.items())
    return docs


def _referenced(r: Mapping[str, Any]) -> set[str]:
    names = set(r.get("split", {})) | set(r.get("pins", {}).values()) | set(r.get("fallback", []))
    names.update(m["version"] for m in _mirrors(r))
    return names


def _mirrors(r: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = list(r.get("mirrors") or [])
    if r.get("mirror"):
        out.insert(0, r["mirror"])
    return out


def httproute_of(name: str, r: Mapping[str, Any]) -> dict[str, Any]:
    where = f"route {name}"
    handled = {"name", "match", "matches", "split", "version_filters", "filters", "mirror", "mirrors", "timeouts",
               "retry", "assignment_cookie", "assignment_cookie_max_age", "identity", "sticky", "pins", "fallback",
               "expose_version", "pins_require_verified", "require_identity"}
    unknown = sorted(set(r) - handled)
    if unknown:
        raise ExportError(f"{where}: {', '.join(unknown)}: no HTTPRoute form for this field")
    annotations = _annotations(r)
    hostnames, matches = _hostnames_and_matches(where, r)
    rule: dict[str, Any] = {"matches": matches}
    filters = _filters(where, r.get("filters") or {})
    for m in _mirrors(r):
        filters.append({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": m["version"]},
                                                                   **_mirror_share(float(m.get("percent", 100)))}})
    if filters:
        rule["filters"] = filters
    version_filters: Mapping[str, Any] = r.get("version_filters") or {}
    refs = []
    for v, w in (r.get("split") or {}).items():
        if w != int(w) or not 0 <= w <= MAX_WEIGHT:
            raise ExportError(f"{where}: split.{v}: weight {w!r} is not an integer 0..{MAX_WEIGHT} (HTTPRoute "
                              "weights are); scale the split to integers first")
        ref: dict[str, Any] = {"name": v, "weight": int(w)}
        if v in version_filters:
            ref["filters"] = _filters(f"{where}: version_filters.{v}", version_filters[v])
        refs.append(ref)
    extra = sorted(set(version_filters) - set(r.get("split") or {}))
    if extra:
        raise ExportError(f"{where}: version_filters: {', '.join(extra)} not in the split (no backendRef to carry it)")
    if refs:
        rule["backendRefs"] = refs
    t = r.get("timeouts") or {}
    timeouts = {dst: _duration(f"{where}: timeouts.{src}", t[src])
                for src, dst in (("request", "request"), ("backend_request", "backendRequest")) if t.get(src)}
    if timeouts:
        rule["timeouts"] = timeouts
    if r.get("retry"):
        rt = dict(r["retry"])
        if not rt.get("backoff"):
            rt.pop("backoff", None)  # 0: none, the translation's default
        else:
            rt["backoff"] = _duration(f"{where}: retry.backoff", rt["backoff"])
        rule["retry"] = rt
    if r.get("assignment_cookie"):
        session: dict[str, Any] = {"sessionName": r["assignment_cookie"], "type": "Cookie"}
        if r.get("assignment_cookie_max_age"):
            session["absoluteTimeout"] = _duration(f"{where}: assignment_cookie_max_age",
                                                   r["assignment_cookie_max_age"])
            session["cookieConfig"] = {"lifetimeType": "Permanent"}
        rule["sessionPersistence"] = session
    spec: dict[str, Any] = {}
    if hostnames:
        spec["hostnames"] = hostnames
    spec["rules"] = [rule]
    meta: dict[str, Any] = {"name": name}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": HTTPROUTE_API, "kind": "HTTPRoute", "metadata": meta, "spec": spec}


def _annotations(r: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    p = ANNOTATION_PREFIX
    if r.get("identity"):
        sources = r["identity"]
        if all(len(s) == 1 and next(iter(s)) in _SHORT_IDENTITY for s in sources):
            out[p + "identity"] = ",".join(f"{k}:{v}" for s in sources for k, v in s.items())
        else:
            out[p + "identity"] = json.dumps(sources, separators=(",", ":"))
    if r.get("sticky") is False:
        out[p + "sticky"] = "false"
    pins: Mapping[str, str] = r.get("pins") or {}
    if pins:
        plain = all(c == c.strip() and c and not any(ch in c for ch in ",={") for c in pins)
        out[p + "pins"] = (",".join(f"{c}={v}" for c, v in pins.items()) if plain
                           else json.dumps(dict(pins), separators=(",", ":")))
    if r.get("fallback"):
        out[p + "fallback"] = ",".join(r["fallback"])
    for key in ("expose_version", "pins_require_verified", "require_identity"):
        if r.get(key):
            out[p + key.replace("_", "-")] = "true"
    return out


def _hostnames_and_matches(where: str, r: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    native = list(r.get("matches") or ([r["match"]] if r.get("match") else [{}]))
    hosts = list(dict.fromkeys(m.get("host") for m in native))
    if hosts == [None]:
        return [], [_match(m) for m in native]
    if None in hosts or len(native) % len(hosts):
        raise ExportError(f"{where}: matches: some give a host and some do not; HTTPRoute's hostnames apply to "
                          "every match (split the route in two)")
    bases = []
    for i in range(0, len(native), len(hosts)):
        block = native[i:i + len(hosts)]
        base = {k: v for k, v in block[0].items() if k != "host"}
        if [m.get("host") for m in block] != hosts or any({k: v for k, v in m.items() if k != "host"} != base
                                                          for m in block):
            raise ExportError(f"{where}: matches are not every host with every match (HTTPRoute's hostnames x "
                              "matches); split the route by host")
        bases.append(_match(base))
    for h in hosts:
        if not HOSTNAME_RE.fullmatch(str(h)) or re.fullmatch(r"[0-9.]+", str(h)):
            raise ExportError(f"{where}: host {h!r} is not an HTTPRoute hostname (lower case, no port, not an IP)")
    return [str(h) for h in hosts], bases


def _match(m: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "path" in m:
        out["path"] = {"type": m["path"].get("type", "PathPrefix"), "value": m["path"]["value"]}
    else:
        out["path"] = {"type": "PathPrefix", "value": m.get("path_prefix", "/")}
    for src, dst in (("headers", "headers"), ("query", "queryParams")):
        entries = m.get(src)
        if not entries:
            continue
        if isinstance(entries, Mapping):
            out[dst] = [{"name": k, "value": str(v)} for k, v in entries.items()]
        else:
            out[dst] = [{"name": e["name"], "value": e["value"],
                         **({"type": e["type"]} if e.get("type", "Exact") != "Exact" else {})} for e in entries]
    if m.get("method"):
        out["method"] = m["method"]
    return out


def _filters(where: str, f: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    unknown = sorted(set(f) - {"request_headers", "response_headers", "rewrite", "redirect"})
    if unknown:
        raise ExportError(f"{where}: filters.{', '.join(unknown)}: no HTTPRoute form for this filter")
    for key, kind, member in (("request_headers", "RequestHeaderModifier", "requestHeaderModifier"),
                              ("response_headers", "ResponseHeaderModifier", "responseHeaderModifier")):
        hm = f.get(key)
        if hm:
            body: dict[str, Any] = {op: [{"name": k, "value": str(v)} for k, v in hm[op].items()]
                                    for op in ("set", "add") if hm.get(op)}
            if hm.get("remove"):
                body["remove"] = list(hm["remove"])
            out.append({"type": kind, member: body})
    if f.get("rewrite"):
        rw = f["rewrite"]
        body = {"hostname": rw["hostname"]} if rw.get("hostname") else {}
        if rw.get("path"):
            body["path"] = _path_modifier(rw["path"])
        out.append({"type": "URLRewrite", "urlRewrite": body})
    if f.get("redirect"):
        rd = f["redirect"]
        body = {k: rd[k] for k in ("scheme", "hostname", "port") if rd.get(k) is not None}
        if rd.get("path"):
            body["path"] = _path_modifier(rd["path"])
        body["statusCode"] = rd.get("status", 302)
        out.append({"type": "RequestRedirect", "requestRedirect": body})
    return out


def _path_modifier(p: Mapping[str, Any]) -> dict[str, Any]:
    member = "replaceFullPath" if p["type"] == "ReplaceFullPath" else "replacePrefixMatch"
    return {"type": p["type"], member: p["value"]}


def _mirror_share(percent: float) -> dict[str, Any]:
    if percent == int(percent):
        return {"percent": int(percent)}
    # The shortest decimal of the float, as a fraction: numerator * 100 / denominator reads back as it.
    d = Decimal(repr(percent)) / 100
    exponent = d.as_tuple().exponent
    denominator = 10 ** -int(exponent) if isinstance(exponent, int) and exponent < 0 else 1
    if denominator > 2**31 - 1:
        raise ExportError(f"mirror percent {percent!r} needs more digits than a Gateway API fraction holds")
    return {"fraction": {"numerator": int(d * denominator), "denominator": denominator}}


def _duration(where: str, seconds: float) -> str:
    """Seconds -> a Gateway API duration ("2s500ms", "1h30m"); whole milliseconds only, as the format is."""
    ms = round(seconds * 1000)
    if ms / 1000 != seconds or ms <= 0:
        raise ExportError(f"{where}: {seconds!r} s is not a whole number of milliseconds (Gateway API durations)")
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    if any(len(p.rstrip("hms")) > 5 for p in parts):
        raise ExportError(f"{where}: {seconds!r} s is longer than a Gateway API duration can say")
    return "".join(parts)
