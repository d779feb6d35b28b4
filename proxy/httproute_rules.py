"""The fields of one HTTPRoute rule (matches, filters, backendRefs, timeouts, retry, sessionPersistence) ->
their native route-file form (SPEC part A), as plain dicts.

Design rule: sans-IO; every field is translated, reported as a warning naming its path (when ignoring it
cannot change which backend answers or what it answers), or refused as an error naming its path. The
reader collects all of them so a stream reports every problem at once; proxy.httproute drives it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from proxy.errors import FieldError

# The cookie a Cookie sessionPersistence without a sessionName uses (the spec leaves the name to us).
DEFAULT_SESSION_COOKIE = "turnout-session"
MAX_WEIGHT = 1_000_000
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Gateway API Duration (GEP-2257): 1-4 groups of up to 5 digits and a unit.
DURATION_RE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
HOSTNAME_RE = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}$")
SECTION_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PATH_CHARS_RE = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")
# Metadata a cluster writes or that never affects routing: passes without a word.


def duration_seconds(value: str) -> float:
    """A Gateway API duration ("1h30m", "500ms") in seconds; the caller checked DURATION_RE."""
    return float(sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(value)))


def kind_of(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


class RuleReader:
    """Reads one stream's HTTPRoute fields, keeping its errors, warnings and version references."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.warnings: list[FieldError] = []
        self.references: list[tuple[str, str]] = []  # (field path, version name) named by HTTPRoutes
        self.namespace: object = None  # metadata.namespace of the HTTPRoute being read

    # reporting

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(FieldError(path, message))

    def mapping(self, value: object, path: str, allowed: Collection[str]) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {kind_of(value)}")
            return None
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k not in allowed:
                self.fail(f"{path}.{k}", f"unknown field (expected one of: {', '.join(sorted(allowed))})")
            else:
                out[k] = v
        return out

    def items(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {kind_of(value)}")
            return []
        return value

    def text(self, value: object, path: str, pattern: re.Pattern[str] | None = None,
             what: str = "a string") -> str | None:
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(path, f"expected {what}, got {value!r}" if isinstance(value, str) else
                      f"expected {what}, got {kind_of(value)}")
            return None
        return value

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"expected an integer between {low} and {high}, got {value!r}")
            return None
        return value

    def duration(self, value: object, path: str) -> float | None:
        if not isinstance(value, str) or not DURATION_RE.fullmatch(value):
            self.fail(path, f"expected a Gateway API duration like 10s, 500ms or 1h30m, got {value!r}")
            return None
        return duration_seconds(value)

    def match(self, mp: str, value: object) -> dict[str, Any] | None:
        m = self.mapping(value, mp, {"path", "headers", "queryParams", "method"})
        if m is None:
            return None
        out: dict[str, Any] = {}
        p = self.mapping(m.get("path", {}), f"{mp}.path", {"type", "value"})
        if p is not None:
            kind = p.get("type", "PathPrefix")
            value_ = p.get("value", "/")
            if kind not in ("Exact", "PathPrefix", "RegularExpression"):
                self.fail(f"{mp}.path.type", f"expected one of Exact, PathPrefix, RegularExpression, got {kind!r}")
            elif self.text(value_, f"{mp}.path.value", what="a path") is not None:
                if kind != "RegularExpression" and not self.valid_path(value_, f"{mp}.path.value"):
                    return None
                out["path"] = {"type": kind, "value": value_}
        for src, dst in (("headers", "headers"), ("queryParams", "query")):
            entries: list[dict[str, str]] = []
            seen: set[str] = set()
            for k, h in enumerate(self.items(m.get(src), f"{mp}.{src}")):
                hp = f"{mp}.{src}[{k}]"
                hd = self.mapping(h, hp, {"name", "value", "type"})
                if hd is None:
                    continue
                n = self.text(hd.get("name"), f"{hp}.name", HEADER_NAME_RE, "a header name" if src == "headers"
                              else "a parameter name")
                val = hd.get("value")
                if not isinstance(val, str):
                    self.fail(f"{hp}.value", f"expected a string, got {kind_of(val)}")
                    continue
                t = hd.get("type", "Exact")
                if t not in ("Exact", "RegularExpression"):
                    self.fail(f"{hp}.type", f"expected one of Exact, RegularExpression, got {t!r}")
                    continue
                if n is None:
                    continue
                key = n.lower() if src == "headers" else n
                if key in seen:
                    # The spec: only the first entry with an equivalent name is considered.
                    self.warn(hp, f"ignored: {n!r} is matched by an earlier entry (only the first one counts)")
                    continue
                seen.add(key)
                entry = {"name": n, "value": val}
                if t != "Exact":
                    entry["type"] = t
                entries.append(entry)
            if entries:
                out[dst] = entries
        if "method" in m:
            if m["method"] not in METHODS:
                self.fail(f"{mp}.method", f"expected one of {', '.join(METHODS)}, got {m['method']!r}")
            else:
                out["method"] = m["method"]
        return out

    def valid_path(self, value: str, path: str) -> bool:
        bad = next((s for s in ("//", "/./", "/../", "%2f", "%2F", "#") if s in value), None)
        if not value.startswith("/") or len(value) > 1024:
            self.fail(path, f"expected an absolute path starting with / (at most 1024 characters), got {value!r}")
        elif bad is not None or value.endswith(("/..", "/.")) or not PATH_CHARS_RE.fullmatch(value):
            self.fail(path, f"path {value!r} is refused by the Gateway API's validation (no //, /./, /../, "
                      "%2f, #, a trailing /. or /.., and only URL path characters)")
        else:
            return True
        return False

    def backend(self, bp: str, r: Mapping[str, Any]) -> str | None:
        kind, group = r.get("kind", "Service"), r.get("group", "")
        if kind != "Service" or group not in ("", "core"):
            self.fail(f"{bp}.kind", f"backend {group or 'core'}/{kind} is not supported: turnout sends traffic to "
                      "versions, named as Services (kind Service, group \"\")")
            return None
        ns = r.get("namespace")
        if ns is not None and ns != self.namespace:
            self.fail(f"{bp}.namespace", f"a backend in namespace {ns!r} is outside the route's; HTTPRoute "
                      "refuses it without a ReferenceGrant, and turnout has no namespaces")
            return None
        if "port" in r:
            self.warn(f"{bp}.port", "ignored: a version's endpoints carry their ports")
        v = self.text(r.get("name"), f"{bp}.name", what="a version name")
        if v is not None:
            self.references.append((f"{bp}.name", v))
        return v

    def filters(self, fp: str, value: object, matches: list[dict[str, Any]], per_backend: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        allowed = {"type", "requestHeaderModifier", "responseHeaderModifier", "requestMirror", "requestRedirect",
                   "urlRewrite", "extensionRef", "cors", "externalAuth"}
        for k, f in enumerate(self.items(value, fp)):
            p = f"{fp}[{k}]"
            d = self.mapping(f, p, allowed)
            if d is None:
                continue
            t = d.get("type")
            member = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier":
                      "responseHeaderModifier", "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect",
                      "URLRewrite": "urlRewrite", "ExtensionRef": "extensionRef", "CORS": "cors",
                      "ExternalAuth": "externalAuth"}.get(t if isinstance(t, str) else "")
            if member is None:
                self.fail(f"{p}.type", f"unknown filter type {t!r}")
                continue
            if t in ("ExtensionRef", "CORS", "ExternalAuth"):
                self.fail(f"{p}.type", f"{t} filters are not supported; ignoring one would change what "
                          "requests get, so the route is refused")
                continue
            if per_backend and t not in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                self.fail(f"{p}.type", f"{t} is not supported per backend (only RequestHeaderModifier and "
                          "ResponseHeaderModifier); put it on the rule")
                continue
            body = d.get(member)
            mp = f"{p}.{member}"
            if t == "RequestMirror":
                mirror = self.mirror(mp, body)
                if mirror is not None:
                    out.setdefault("mirrors", []).append(mirror)
                continue
            key = {"RequestHeaderModifier": "request_headers", "ResponseHeaderModifier": "response_headers",
                   "RequestRedirect": "redirect", "URLRewrite": "rewrite"}[str(t)]
            if key in out:
                self.fail(f"{p}.type", f"a second {t} filter (HTTPRoute allows one per rule)")
                continue
            if key in ("request_headers", "response_headers"):
                hm = self.header_modifier(mp, body)
                if hm:  # an empty modifier changes nothing
                    out[key] = hm
            elif key == "redirect":
                rd = self.redirect(mp, body, matches)
                if rd is not None:
                    out[key] = rd
            else:
                rw = self.rewrite(mp, body, matches)
                if rw is not None:
                    out[key] = rw
        if "redirect" in out and "rewrite" in out:
            self.fail(fp, "RequestRedirect and URLRewrite cannot both be given (HTTPRoute)")
        return out

    def header_modifier(self, mp: str, value: object) -> dict[str, Any] | None:
        d = self.mapping(value, mp, {"set", "add", "remove"})
        if d is None:
            return None
        out: dict[str, Any] = {}
        for op in ("set", "add"):
            pairs: dict[str, str] = {}
            for k, h in enumerate(self.items(d.get(op), f"{mp}.{op}")):
                hp = f"{mp}.{op}[{k}]"
                hd = self.mapping(h, hp, {"name", "value"})
                if hd is None:
                    continue
                n = self.text(hd.get("name"), f"{hp}.name", HEADER_NAME_RE, "a header name")
                val = hd.get("value")
                if not isinstance(val, str):
                    self.fail(f"{hp}.value", f"expected a string, got {kind_of(val)}")
                elif n is not None:
                    if n.lower() in (x.lower() for x in pairs):
                        self.fail(f"{hp}.name", f"header {n!r} is named twice in {op}")
                    else:
                        pairs[n] = val
            if pairs:
                out[op] = pairs
        removes: list[str] = []
        for k, n in enumerate(self.items(d.get("remove"), f"{mp}.remove")):
            s = self.text(n, f"{mp}.remove[{k}]", HEADER_NAME_RE, "a header name")
            if s is not None:
                if s.lower() in (x.lower() for x in removes):
                    self.fail(f"{mp}.remove[{k}]", f"header {s!r} is named twice in remove")
                else:
                    removes.append(s)
        if removes:
            out["remove"] = removes
        return out

    def mirror(self, mp: str, value: object) -> dict[str, Any] | None:
        d = self.mapping(value, mp, {"backendRef", "percent", "fraction"})
        if d is None:
            return None
        ref = self.mapping(d.get("backendRef"), f"{mp}.backendRef", {"name", "kind", "group", "namespace", "port"})
        v = None if ref is None else self.backend(f"{mp}.backendRef", ref)
        if "percent" in d and "fraction" in d:
            self.fail(mp, "give percent or fraction, not both")
            return None
        percent: float | None = 100.0
        if "percent" in d:
            n = self.integer(d["percent"], f"{mp}.percent", 0, 100)
            percent = None if n is None else float(n)
        elif "fraction" in d:
            fr = self.mapping(d["fraction"], f"{mp}.fraction", {"numerator", "denominator"})
            percent = None
            if fr is not None:
                num = self.integer(fr.get("numerator"), f"{mp}.fraction.numerator", 0, 2**31 - 1)
                den = self.integer(fr.get("denominator", 100), f"{mp}.fraction.denominator", 1, 2**31 - 1)
                if num is not None and den is not None:
                    if num > den:
                        self.fail(f"{mp}.fraction", "numerator must not be greater than denominator")
                    else:
                        # Integer arithmetic first: 125/1000 is exactly the 12.5 an export wrote.
                        percent = num * 100 / den
        if v is None or percent is None:
            return None
        return {"version": v, "percent": int(percent) if percent == int(percent) else percent}

    def path_modifier(self, pp: str, value: object, matches: list[dict[str, Any]]) -> dict[str, Any] | None:
        d = self.mapping(value, pp, {"type", "replaceFullPath", "replacePrefixMatch"})
        if d is None:
            return None
        t = d.get("type")
        if t not in ("ReplaceFullPath", "ReplacePrefixMatch"):
            self.fail(f"{pp}.type", f"expected one of ReplaceFullPath, ReplacePrefixMatch, got {t!r}")
            return None
        member = "replaceFullPath" if t == "ReplaceFullPath" else "replacePrefixMatch"
        other = "replacePrefixMatch" if t == "ReplaceFullPath" else "replaceFullPath"
        if other in d:
            self.fail(f"{pp}.{other}", f"not allowed with type {t}")
            return None
        value_ = d.get(member)
        if not isinstance(value_, str) or not value_.startswith("/") or len(value_) > 1024:
            self.fail(f"{pp}.{member}", f"expected a path starting with /, got {value_!r}")
            return None
        if t == "ReplacePrefixMatch" and any(m.get("path", {}).get("type") != "PathPrefix" for m in matches):
            self.fail(f"{pp}.type", "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
            return None
        return {"type": t, "value": value_}

    def redirect(self, mp: str, value: object, matches: list[dict[str, Any]]) -> dict[str, Any] | None:
        d = self.mapping(value, mp, {"scheme", "hostname", "path", "port", "statusCode"})
        if d is None:
            return None
        before = len(self.errors)
        out: dict[str, Any] = {}
        if "scheme" in d:
            if d["scheme"] not in ("http", "https"):
                self.fail(f"{mp}.scheme", f"expected http or https, got {d['scheme']!r}")
            else:
                out["scheme"] = d["scheme"]
        if "hostname" in d:
            h = self.text(d["hostname"], f"{mp}.hostname", HOSTNAME_RE, "a hostname")
            if h is not None and h.startswith("*."):
                self.fail(f"{mp}.hostname", "a redirect goes to one host, not a wildcard")
            elif h is not None:
                out["hostname"] = h
        if "path" in d:
            pm = self.path_modifier(f"{mp}.path", d["path"], matches)
            if pm is not None:
                out["path"] = pm
        if "port" in d:
            port = self.integer(d["port"], f"{mp}.port", 1, 65535)
            if port is not None:
                out["port"] = port
        code = d.get("statusCode", 302)
        if code not in REDIRECT_CODES:
            self.fail(f"{mp}.statusCode", f"expected one of {', '.join(map(str, REDIRECT_CODES))}, got {code!r}")
        else:
            out["status"] = code
        return out if len(self.errors) == before else None

    def rewrite(self, mp: str, value: object, matches: list[dict[str, Any]]) -> dict[str, Any] | None:
        d = self.mapping(value, mp, {"hostname", "path"})
        if d is None:
            return None
        out: dict[str, Any] = {}
        if "hostname" in d:
            h = self.text(d["hostname"], f"{mp}.hostname", HOSTNAME_RE, "a hostname")
            if h is not None and h.startswith("*."):
                self.fail(f"{mp}.hostname", "a rewrite names one host, not a wildcard")
            elif h is not None:
                out["hostname"] = h
        if "path" in d:
            pm = self.path_modifier(f"{mp}.path", d["path"], matches)
            if pm is not None:
                out["path"] = pm
        return out

    def timeouts(self, tp: str, value: object) -> dict[str, float]:
        d = self.mapping(value, tp, {"request", "backendRequest"})
        out: dict[str, float] = {}
        for src, dst in (("request", "request"), ("backendRequest", "backend_request")):
            if d is None or src not in d:
                continue
            s = self.duration(d[src], f"{tp}.{src}")
            if s == 0:
                self.warn(f"{tp}.{src}", "0s (no timeout): turnout's own upstream limits still apply")
            elif s is not None:
                out[dst] = s
        if out.get("backend_request", 0) > out.get("request", float("inf")):
            self.fail(f"{tp}.backendRequest", "must not be longer than timeouts.request (HTTPRoute)")
        return out

    def retry(self, rp: str, value: object) -> dict[str, Any] | None:
        d = self.mapping(value, rp, {"codes", "attempts", "backoff"})
        if d is None:
            return None
        out: dict[str, Any] = {}
        if "attempts" in d:
            n = self.integer(d["attempts"], f"{rp}.attempts", 0, 100)
            if n is not None:
                out["attempts"] = n
        if "codes" in d:
            codes = [self.integer(c, f"{rp}.codes[{k}]", 400, 599) for k, c in enumerate(self.items(d["codes"],
                                                                                                 f"{rp}.codes"))]
            out["codes"] = [c for c in codes if c is not None]
        if "backoff" in d:
            b = self.duration(d["backoff"], f"{rp}.backoff")
            if b is not None:
                out["backoff"] = b
        return out

    def session(self, sp: str, value: object) -> dict[str, Any]:
        d = self.mapping(value, sp, {"sessionName", "absoluteTimeout", "idleTimeout", "type", "cookieConfig"})
        if d is None:
            return {}
        kind = d.get("type", "Cookie")
        name = d.get("sessionName")
        if name is not None:
            self.text(name, f"{sp}.sessionName", re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"),
                      "a cookie or header name")
        lifetime = "Session"
        if "cookieConfig" in d:
            cc = self.mapping(d["cookieConfig"], f"{sp}.cookieConfig", {"lifetimeType"})
            lifetime = "Session" if cc is None else cc.get("lifetimeType", "Session")
            if lifetime not in ("Session", "Permanent"):
                self.fail(f"{sp}.cookieConfig.lifetimeType", f"expected Session or Permanent, got {lifetime!r}")
        absolute = None if "absoluteTimeout" not in d else self.duration(d["absoluteTimeout"], f"{sp}.absoluteTimeout")
        out: dict[str, Any] = {}
        if kind == "Cookie" and lifetime == "Permanent":
            if "absoluteTimeout" not in d:
                self.fail(f"{sp}.absoluteTimeout", "a Permanent cookie needs absoluteTimeout (its Max-Age)")
            elif absolute is not None:
                if absolute != int(absolute) or absolute < 1:
                    self.fail(f"{sp}.absoluteTimeout", "a cookie's Max-Age is whole seconds (at least 1s)")
                else:
                    out["assignment_cookie_max_age"] = int(absolute)
        elif absolute is not None:
            self.warn(f"{sp}.absoluteTimeout", "not enforced: without cookieConfig.lifetimeType Permanent (a Max-Age) "
                      "the assignment lasts as long as the client keeps its session cookie")
        if "idleTimeout" in d and self.duration(d["idleTimeout"], f"{sp}.idleTimeout") is not None:
            self.warn(f"{sp}.idleTimeout", "not enforced: an assignment does not expire while idle")
        if kind == "Cookie":
            # The assignment cookie holds a session on its version whatever the weights, 0 included (GEP-1619).
            out["assignment_cookie"] = name if isinstance(name, str) else DEFAULT_SESSION_COOKIE
            return out
        if kind == "Header":
            if not isinstance(name, str):
                self.fail(f"{sp}.sessionName", "a Header session needs the header's name")
                return {}
            self.warn(f"{sp}.type", "Header: sessions stick by the header's value (sticky buckets): they hold "
                      "while the weights stay, not at weight 0 as GEP-1619 asks; type Cookie does")
            return {"identity": [{"header": name}], "sticky": True}
        self.fail(f"{sp}.type", f"expected Cookie or Header, got {kind!r}")
        return {}
