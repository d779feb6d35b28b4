"""Kubernetes Gateway API HTTPRoute documents -> turnout's own route-file document (plain dicts).

A route file may be a multi-document YAML stream mixing `HTTPRoute` documents (gateway.networking.k8s.io
v1 or v1beta1), turnout `Version` documents (`apiVersion: turnout/v1, kind: Version, metadata: {name},
spec: {endpoints: [...]}`) and plain turnout route files (`versions:` / `routes:`). Each HTTPRoute rule
becomes one native route: `<name>` for an HTTPRoute with a single unnamed rule, else
`<name>.<rule name>` or `<name>.<rule index>`; routes keep the stream's order, which stands in for the
creation timestamps HTTPRoute breaks precedence ties by.

Design rule: sans-IO and one way only (HTTPRoute -> native syntax of SPEC part A). The result is a plain
route-file dict that proxy.parse validates like any route file, so the two syntaxes share one model and
one validator. Every field is translated, reported as a warning naming its path (when ignoring it cannot
change which backend answers or what it answers), or refused as an error; nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import FieldError, ValidationError
from proxy.httproute_rules import HOSTNAME_RE, MAX_WEIGHT, SECTION_NAME_RE, RuleReader, kind_of

GATEWAY_GROUP = "gateway.networking.k8s.io"
HTTPROUTE_APIS = frozenset({f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1"})
TURNOUT_API = "turnout/v1"
ANNOTATION_PREFIX = "turnout/"
QUIET_METADATA = frozenset({"name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
                            "creationTimestamp", "managedFields", "finalizers", "ownerReferences"})
ANNOTATIONS = ("assignment-cookie", "expose-version", "fallback", "identity", "pins", "pins-require-verified",
               "require-identity", "sticky")
_BOOLS = {"true": True, "false": False}

@dataclass(slots=True)
class Translation:
    """The native route-file document a stream becomes, with what the reader must be told."""

    document: dict[str, Any] = field(default_factory=lambda: {"versions": {}, "routes": []})
    warnings: list[FieldError] = field(default_factory=list)
    # Where each native route came from ("HTTPRoute shop: spec.rules[1]"), by its index in document.routes.
    origins: list[str] = field(default_factory=list)
    # Versions named by HTTPRoutes that the stream does not define but the current state has.
    borrowed: set[str] = field(default_factory=set)
    # Where the stream defines each version ("Version v2: spec").
    version_origins: dict[str, str] = field(default_factory=dict)


def is_resource_stream(docs: Sequence[object]) -> bool:
    """True when the stream needs translating (several documents, or one Kubernetes-style document)."""
    real = [d for d in docs if d is not None]
    return len(real) > 1 or any(isinstance(d, Mapping) and ("apiVersion" in d or "kind" in d) for d in real)


def translate_stream(docs: Sequence[object], known: Collection[str] = ()) -> Translation:
    """Translate every document; `known` are the version names already registered. ValidationError lists
    every error of the stream at once."""
    t = _Translator(known)
    for i, doc in enumerate(docs):
        t.document(i, doc)
    t.resolve()
    if t.errors:
        raise ValidationError(t.errors)
    t.out.warnings = t.warnings
    t.out.version_origins = t.version_sources
    return t.out


class _Translator(RuleReader):
    def __init__(self, known: Collection[str]) -> None:
        super().__init__()
        self.known = known
        self.out = Translation()
        self.version_sources: dict[str, str] = {}  # version name -> where the stream defines it

    # documents

    def document(self, i: int, doc: object) -> None:
        where = f"documents[{i}]"
        if doc is None:
            return
        if not isinstance(doc, Mapping):
            self.fail(where, f"expected a mapping, got {kind_of(doc)}")
            return
        if "apiVersion" not in doc and "kind" not in doc:
            self.route_file(where, doc)
            return
        api, kind = doc.get("apiVersion"), doc.get("kind")
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        label = f"{kind} {name}" if isinstance(name, str) else f"{where} ({kind})"
        if kind == "HTTPRoute" and api in HTTPROUTE_APIS:
            self.httproute(label, doc)
        elif api == TURNOUT_API and kind == "Version":
            self.version(label, doc)
        elif kind == "HTTPRoute" or api == TURNOUT_API:
            self.fail(f"{label}: apiVersion", f"{api!r} kind {kind!r} is not supported (expected "
                      f"{' or '.join(sorted(HTTPROUTE_APIS))} HTTPRoute, or {TURNOUT_API} Version)")
        else:
            # A Gateway, Service or Deployment next to the routes: they do not route here, say so.
            self.warn(label, f"apiVersion {api!r} kind {kind!r}: ignored (turnout reads HTTPRoute and "
                      f"{TURNOUT_API} Version documents)")

    def route_file(self, where: str, doc: Mapping[str, Any]) -> None:
        d = self.mapping(doc, where, {"versions", "routes"})
        if d is None:
            return
        versions = d.get("versions") or {}
        if not isinstance(versions, Mapping):
            self.fail(f"{where}.versions", f"expected a mapping, got {kind_of(versions)}")
            versions = {}
        for name, spec in versions.items():
            self.add_version(str(name), spec, f"{where}.versions.{name}")
        for j, r in enumerate(self.items(d.get("routes"), f"{where}.routes")):
            self.out.document["routes"].append(r)
            self.out.origins.append(f"{where}.routes[{j}]")

    def add_version(self, name: str, spec: object, where: str) -> None:
        first = self.version_sources.get(name)
        if first is not None:
            if self.out.document["versions"][name] != spec:
                self.fail(where, f"version {name!r} is defined differently at {first}")
            return
        self.version_sources[name] = where
        self.out.document["versions"][name] = spec

    def version(self, label: str, doc: Mapping[str, Any]) -> None:
        d = self.mapping(doc, label, {"apiVersion", "kind", "metadata", "spec"})
        if d is None:
            return
        meta = self.mapping(d.get("metadata"), f"{label}: metadata", QUIET_METADATA)
        if meta is None:
            return
        name = self.text(meta.get("name"), f"{label}: metadata.name", what="a version name")
        if name is not None:
            self.add_version(name, d.get("spec"), f"{label}: spec")

    # HTTPRoute

    def httproute(self, label: str, doc: Mapping[str, Any]) -> None:
        d = self.mapping(doc, label, {"apiVersion", "kind", "metadata", "spec", "status"})
        if d is None:
            return
        if "status" in d:
            self.warn(f"{label}: status", "ignored (a controller writes it)")
        meta = d.get("metadata")
        if not isinstance(meta, Mapping):
            self.fail(f"{label}: metadata", f"expected a mapping with a name, got {kind_of(meta)}")
            return
        for k in meta:
            if k not in QUIET_METADATA:
                self.warn(f"{label}: metadata.{k}", "ignored")
        name = self.text(meta.get("name"), f"{label}: metadata.name", what="a route name")
        if name is None:
            return
        self.namespace = meta.get("namespace")
        if self.namespace is not None:
            self.warn(f"{label}: metadata.namespace", "ignored: turnout has one namespace (route names are unique "
                      "across the stream)")
        ap = f"{label}: metadata.annotations"
        extras = self.annotations(meta.get("annotations"), ap)
        for v in extras.get("fallback", []):
            self.references.append((f'{ap}["{ANNOTATION_PREFIX}fallback"]', v))
        for v in set(extras.get("pins", {}).values()):
            self.references.append((f'{ap}["{ANNOTATION_PREFIX}pins"]', v))
        spec = self.mapping(d.get("spec"), f"{label}: spec", {"parentRefs", "hostnames", "rules", "useDefaultGateways"})
        if spec is None:
            return
        for k in ("parentRefs", "useDefaultGateways"):
            if k in spec:
                self.warn(f"{label}: spec.{k}", "ignored: turnout's listeners serve every route (no Gateway to "
                          "attach to)")
        hosts: list[str] = []
        for j, h in enumerate(self.items(spec.get("hostnames"), f"{label}: spec.hostnames")):
            hp = f"{label}: spec.hostnames[{j}]"
            hv = self.text(h, hp, what="a hostname (exact or *.domain, lower case)")
            if hv is None:
                continue
            if not HOSTNAME_RE.fullmatch(hv) or len(hv) > 253 or re.fullmatch(r"[0-9.]+", hv):
                self.fail(hp, f"expected a hostname (exact or *.domain, lower case, not an IP), got {hv!r}")
                continue
            if hv not in hosts:
                hosts.append(hv)
        rules = self.items(spec.get("rules"), f"{label}: spec.rules")
        if not rules:
            # The spec's default is one rule with no backend (500 for everything): refused like one.
            self.fail(f"{label}: spec.rules", "expected at least one rule")
        for j, rule in enumerate(rules):
            rp = f"{label}: spec.rules[{j}]"
            rname = rule.get("name") if isinstance(rule, Mapping) else None
            if isinstance(rname, str) and SECTION_NAME_RE.fullmatch(rname):
                route_name = f"{name}.{rname}"
            elif len(rules) == 1 and rname is None:
                route_name = name
            else:
                route_name = f"{name}.{j}"
            r = self.rule(rp, rule, hosts)
            if r is None:
                continue
            self.out.document["routes"].append({"name": route_name, **r, **self.merge_extras(rp, r, extras)})
            self.out.origins.append(rp)

    def merge_extras(self, rp: str, route: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        out = dict(extras)
        if "assignment_cookie" in extras and ("assignment_cookie" in route or "assignment_cookie_max_age" in route):
            self.fail(f"{rp}.sessionPersistence", "conflicts with the turnout/assignment-cookie annotation")
        if "identity" in extras and "identity" in route:
            self.fail(f"{rp}.sessionPersistence", "a Header session conflicts with the turnout/identity annotation")
        return out

    def annotations(self, value: object, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if value is None:
            return out
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {kind_of(value)}")
            return out
        for key, raw in value.items():
            if not isinstance(key, str) or not key.startswith(ANNOTATION_PREFIX):
                continue  # other tools' annotations are theirs
            ap = f'{path}["{key}"]'
            short = key[len(ANNOTATION_PREFIX):]
            if short not in ANNOTATIONS:
                self.fail(ap, f"unknown turnout annotation (expected one of: "
                          f"{', '.join(ANNOTATION_PREFIX + a for a in ANNOTATIONS)})")
                continue
            if not isinstance(raw, str):
                self.fail(ap, f"annotation values are strings, got {kind_of(raw)}")
                continue
            field_name = short.replace("-", "_")
            if short in ("sticky", "expose-version", "pins-require-verified", "require-identity"):
                if raw not in _BOOLS:
                    self.fail(ap, f"expected \"true\" or \"false\", got {raw!r}")
                else:
                    out[field_name] = _BOOLS[raw]
            elif short == "assignment-cookie":
                out[field_name] = raw
            elif short == "fallback":
                out[field_name] = [v.strip() for v in raw.split(",") if v.strip()]
            elif short == "pins":
                pins = self.pins(raw, ap)
                if pins is not None:
                    out[field_name] = pins
            else:
                ident = self.identity(raw, ap)
                if ident is not None:
                    out[field_name] = ident
        return out

    def pins(self, raw: str, path: str) -> dict[str, str] | None:
        if raw.lstrip().startswith("{"):
            try:
                pins = json.loads(raw)
            except ValueError as e:
                self.fail(path, f"invalid JSON: {e}")
                return None
            if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
                self.fail(path, "expected a JSON object of client id -> version name")
                return None
            return pins
        out: dict[str, str] = {}
        for item in (p.strip() for p in raw.split(",")):
            client, sep, version = item.partition("=")
            if not item:
                continue
            if not sep or not client.strip() or not version.strip():
                self.fail(path, f"expected client=version pairs separated by commas, got {item!r}")
                return None
            out[client.strip()] = version.strip()
        return out

    def identity(self, raw: str, path: str) -> list[Any] | None:
        if raw.lstrip().startswith("["):
            try:
                sources = json.loads(raw)
            except ValueError as e:
                self.fail(path, f"invalid JSON: {e}")
                return None
            if not isinstance(sources, list):
                self.fail(path, "expected a JSON list of identity sources")
                return None
            return sources
        out: list[Any] = []
        for item in (p.strip() for p in raw.split(",")):
            kind, sep, name = item.partition(":")
            if not sep or not kind or not name:
                self.fail(path, f"expected kind:name items like header:X-Client-Id,cookie:client_id, got {item!r}")
                return None
            out.append({kind.strip(): name.strip()})
        return out

    def rule(self, rp: str, value: object, hosts: list[str]) -> dict[str, Any] | None:
        rule = self.mapping(value, rp, {"name", "matches", "filters", "backendRefs", "timeouts", "retry",
                                        "sessionPersistence"})
        if rule is None:
            return None
        before = len(self.errors)
        if "name" in rule:
            self.text(rule["name"], f"{rp}.name", SECTION_NAME_RE, "a rule name (lower case, digits, '-', '.')")
        raw_matches = self.items(rule.get("matches"), f"{rp}.matches") or [{}]
        matches: list[dict[str, Any]] = []
        for k, m in enumerate(raw_matches):
            nm = self.match(f"{rp}.matches[{k}]", m)
            if nm is not None:
                matches.append(nm)
        out: dict[str, Any] = {"matches": [{"host": h, **m} if h else m for m in matches for h in hosts or [""]]}
        filters = self.filters(f"{rp}.filters", rule.get("filters"), matches, per_backend=False)
        redirect = "redirect" in filters
        mirrors = filters.pop("mirrors", [])
        if filters:
            out["filters"] = filters
        if len(mirrors) == 1:
            out["mirror"] = mirrors[0]  # the one-mirror form every turnout has
        elif mirrors:
            out["mirrors"] = mirrors  # SPEC part C
        split: dict[str, int] = {}
        version_filters: dict[str, Any] = {}
        refs = self.items(rule.get("backendRefs"), f"{rp}.backendRefs")
        for k, ref in enumerate(refs):
            bp = f"{rp}.backendRefs[{k}]"
            r = self.mapping(ref, bp, {"name", "kind", "group", "namespace", "port", "weight", "filters"})
            if r is None:
                continue
            v = self.backend(bp, r)
            weight = self.integer(r.get("weight", 1), f"{bp}.weight", 0, MAX_WEIGHT)
            if v is None or weight is None:
                continue
            if v in split:
                self.fail(f"{bp}.name", f"version {v!r} is listed twice in this rule; list each version once")
                continue
            split[v] = weight
            bf = self.filters(f"{bp}.filters", r.get("filters"), matches, per_backend=True)
            if bf:
                version_filters[v] = bf
        if redirect:
            if refs:
                self.warn(f"{rp}.backendRefs", "ignored: the rule's RequestRedirect answers every request itself")
        elif not refs:
            self.fail(f"{rp}.backendRefs", "a rule without backendRefs answers 500 to everything (HTTPRoute); "
                      "turnout needs a version: give one with weight 0 for the same answer")
        else:
            out["split"] = split
            if version_filters:
                out["version_filters"] = version_filters
        if "timeouts" in rule:
            t = self.timeouts(f"{rp}.timeouts", rule["timeouts"])
            if t:
                out["timeouts"] = t
        if "retry" in rule:
            rt = self.retry(f"{rp}.retry", rule["retry"])
            if rt is not None:
                out["retry"] = rt
        if "sessionPersistence" in rule:
            out.update(self.session(f"{rp}.sessionPersistence", rule["sessionPersistence"]))
        return out if len(self.errors) == before else None

    def resolve(self) -> None:
        defined = self.out.document["versions"]
        for path, v in self.references:
            if v in defined:
                continue
            if v in self.known:
                self.out.borrowed.add(v)
            else:
                self.fail(path, f"unknown version {v!r}: define it in a {TURNOUT_API} Version document or a route "
                          "file in the same stream, or register it first")
