"""Validation of a route's matches, filters, timeouts and retry (plain data -> model), and back to plain data.

The fields HTTPRoute carries, in turnout's own route syntax (one model, two syntaxes): typed paths,
methods, header and query matches, header modifiers, URL rewrite, redirect, per-version filters, timeouts
and retry. Design rule: like proxy.parse, every error names its field path and what was expected, and
unknown fields are refused; the functions append to an error list instead of raising, so a document's
errors are reported all at once. Regular expressions are compiled with re2 (linear time: a route file
cannot be a ReDoS); a pattern re2 refuses, or one over PATTERN_MAX characters, is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, cast

import re2

from proxy.errors import FieldError
from proxy.model import (
    PATH_TYPES,
    Filters,
    HeaderEdit,
    Match,
    PathEdit,
    Redirect,
    Retry,
    Rewrite,
    Route,
    Timeouts,
)

PATTERN_MAX = 1024
# HTTPRoute allows 16 hostnames and 64 matches per rule: their product, one native match each.
MATCHES_MAX = 1024
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
WILD_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
PATH_RE = re.compile(r"^/[^\s?#]*$")
# Header values a modifier may write: no CR, LF or NUL (a value must never end the header block).
VALUE_RE = re.compile(r"^[^\r\n\x00]*$")
# Headers the proxy frames or sets itself: a modifier may not touch them (Host: see rewrite.hostname).
MANAGED = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "x-turnout-route", "x-turnout-version", "x-turnout-client",
    "x-turnout-identity-source",
})
MATCH_FIELDS = {"host", "path", "path_prefix", "method", "headers", "query"}
FILTER_FIELDS = {"request_headers", "response_headers", "rewrite", "redirect"}
VERSION_FILTER_FIELDS = {"request_headers", "response_headers"}

_re2_options = re2.Options()
_re2_options.log_errors = False


def compile_pattern(pattern: str) -> Any:
    """The re2 program of a pattern parse accepted."""
    return re2.compile(pattern, options=_re2_options)


class _Fields:
    """Error collection and the few typed reads the fields below need."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def mapping(self, value: object, path: str, allowed: set[str] | None = None) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_kind(value)}")
            return None
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                self.fail(path, f"keys must be strings, got {_kind(k)} {k!r}")
            elif allowed is not None and k not in allowed:
                self.fail(_join(path, k), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
            else:
                out[k] = v
        return out

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "a string", empty: bool = False) -> str | None:
        if isinstance(value, bool) or not isinstance(value, str | int | float) or (
                not isinstance(value, str) and pattern is not None):
            self.fail(path, f"expected {what}, got {_kind(value)}")
            return None
        s = str(value)
        if not s and not empty:
            self.fail(path, f"expected {what}, got an empty string")
            return None
        if pattern is not None and not pattern.fullmatch(s):
            self.fail(path, f"expected {what}, got {s!r}")
            return None
        return s

    def number(self, value: object, path: str, low: float, high: float, integer: bool = False,
               low_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            self.fail(path, f"expected {'an integer' if integer else 'a number'}, got {_kind(value)}")
            return None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            self.fail(path, f"expected a number {'>' if low_open else '>='} {low:g} and <= {high:g}, got {value!r}")
            return None
        return value

    def pattern(self, value: object, path: str) -> str | None:
        s = self.string(value, path, what="a regular expression")
        if s is None:
            return None
        if len(s) > PATTERN_MAX:
            self.fail(path, f"a regular expression is at most {PATTERN_MAX} characters, got {len(s)}")
            return None
        try:
            compile_pattern(s)
        except re2.error as e:
            why = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            self.fail(path, f"not a regular expression re2 accepts ({why}): {s!r}")
            return None
        return s


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    if NAME_RE.fullmatch(key) or TOKEN_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


# Matches

def parse_matches(d: Mapping[str, Any], path: str, errors: list[FieldError]) -> tuple[Match, tuple[Match, ...]]:
    """A route's `match:` (one) or `matches:` (a list, ORed) -> (first match, the others)."""
    f = _Fields(errors)
    if "match" in d and "matches" in d:
        f.fail(_join(path, "matches"), "give either match (one) or matches (a list), not both")
        return Match(), ()
    if "matches" in d:
        mpath = _join(path, "matches")
        raw = d["matches"]
        if not isinstance(raw, list) or not raw:
            f.fail(mpath, f"expected a non-empty list of matches, got {_kind(raw)}")
            return Match(), ()
        if len(raw) > MATCHES_MAX:
            f.fail(mpath, f"at most {MATCHES_MAX} matches per route, got {len(raw)}")
            return Match(), ()
        out = [_match(f, m, f"{mpath}[{i}]") for i, m in enumerate(raw)]
        return out[0], tuple(out[1:])
    if "match" in d:
        return _match(f, d["match"], _join(path, "match")), ()
    return Match(), ()


def _match(f: _Fields, value: object, path: str) -> Match:
    m = f.mapping(value, path, MATCH_FIELDS)
    if m is None:
        return Match()
    host = None
    if m.get("host") is not None:
        host = f.string(m["host"], f"{path}.host", WILD_HOST_RE, "a host name or *.domain")
    path_type = "PathPrefix"
    value_s: str | None = "/"
    if "path" in m and "path_prefix" in m:
        f.fail(f"{path}.path", "give either path or path_prefix (shorthand for a PathPrefix path), not both")
    elif "path" in m:
        ppath = f"{path}.path"
        pm = f.mapping(m["path"], ppath, {"type", "value"})
        if pm is not None:
            t = pm.get("type", "PathPrefix")
            if t not in PATH_TYPES:
                f.fail(f"{ppath}.type", f"expected one of {', '.join(PATH_TYPES)}, got {t!r}")
            else:
                path_type = t
            raw = pm.get("value", "/")
            if path_type == "RegularExpression":
                value_s = f.pattern(raw, f"{ppath}.value")
            else:
                value_s = f.string(raw, f"{ppath}.value", PATH_RE, "a path starting with / (no query)")
    elif "path_prefix" in m:
        value_s = f.string(m["path_prefix"], f"{path}.path_prefix", PATH_RE, "a path starting with / (no query)")
    method = None
    if m.get("method") is not None:
        method = m["method"]
        if method not in METHODS:
            f.fail(f"{path}.method", f"expected one of {', '.join(METHODS)}, got {method!r}")
            method = None
    headers, header_regex = _name_values(f, m.get("headers"), f"{path}.headers", header=True)
    query, query_regex = _name_values(f, m.get("query"), f"{path}.query", header=False)
    return Match(host.lower() if host else None, value_s or "/", headers, cast(Any, path_type), method,
                 header_regex, query, query_regex)


def _name_values(f: _Fields, value: object, path: str, header: bool) -> tuple[
        tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Header or query matches: a mapping (all Exact) or a list of {name, value, type} -> (exact, regex)."""
    if value is None:
        return (), ()
    exact: list[tuple[str, str]] = []
    regex: list[tuple[str, str]] = []
    seen: set[str] = set()

    def name_ok(name: str | None, p: str) -> str | None:
        if name is None:
            return None
        if header and not TOKEN_RE.fullmatch(name):
            f.fail(p, f"expected a header name, got {name!r}")
            return None
        if not header and len(name) > 256:
            f.fail(p, "a query parameter name is 1-256 characters")
            return None
        key = name.lower() if header else name
        if key in seen:
            f.fail(p, f"duplicate name {name!r} (each name is matched once)")
            return None
        seen.add(key)
        return key

    if isinstance(value, Mapping):
        m = f.mapping(value, path)
        for k, v in (m or {}).items():
            key = name_ok(k, _join(path, k))
            s = f.string(v, _join(path, k), empty=True)
            if key is not None and s is not None:
                exact.append((key, s))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            ip = f"{path}[{i}]"
            im = f.mapping(item, ip, {"name", "value", "type"})
            if im is None:
                continue
            key = name_ok(f.string(im.get("name"), f"{ip}.name", what="a name"), f"{ip}.name")
            t = im.get("type", "Exact")
            if t not in ("Exact", "RegularExpression"):
                f.fail(f"{ip}.type", f"expected one of Exact, RegularExpression, got {t!r}")
                continue
            if t == "Exact":
                s = f.string(im.get("value"), f"{ip}.value", empty=True)
            else:
                s = f.pattern(im.get("value"), f"{ip}.value")
            if key is not None and s is not None:
                (exact if t == "Exact" else regex).append((key, s))
    else:
        f.fail(path, f"expected a mapping of names to values or a list of {{name, value, type}}, got {_kind(value)}")
    return tuple(exact), tuple(regex)


def match_to_dict(m: Match) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if m.path_type == "PathPrefix":
        d["path_prefix"] = m.path_prefix
    else:
        d["path"] = {"type": m.path_type, "value": m.path_prefix}
    if m.host:
        d["host"] = m.host
    if m.method is not None:
        d["method"] = m.method
    for key, exact, regex in (("headers", m.headers, m.header_regex), ("query", m.query, m.query_regex)):
        if regex:
            d[key] = [{"name": n, "value": v} for n, v in exact] + [
                {"name": n, "value": v, "type": "RegularExpression"} for n, v in regex]
        elif exact:
            d[key] = dict(exact)
    return d


# Filters

def _header_edit(f: _Fields, value: object, path: str) -> HeaderEdit | None:
    m = f.mapping(value, path, {"set", "add", "remove"})
    if m is None:
        return None
    seen: set[str] = set()

    def name(n: str, p: str) -> bool:
        if not TOKEN_RE.fullmatch(n):
            f.fail(p, f"expected a header name, got {n!r}")
            return False
        low = n.lower()
        if low in MANAGED:
            f.fail(p, f"the proxy manages {n} itself; a filter may not change it")
            return False
        if low in seen:
            f.fail(p, f"header {n!r} is already named in this modifier")
            return False
        seen.add(low)
        return True

    pairs: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
    for op in ("set", "add"):
        om = f.mapping(m.get(op, {}), f"{path}.{op}")
        for k, v in (om or {}).items():
            kp = _join(f"{path}.{op}", k)
            s = f.string(v, kp, empty=True)
            if s is not None and not VALUE_RE.fullmatch(s):
                f.fail(kp, "a header value may not hold CR, LF or NUL")
                continue
            if name(k, kp) and s is not None:
                pairs[op].append((k, s))
    remove: list[str] = []
    raw = m.get("remove", [])
    if not isinstance(raw, list):
        f.fail(f"{path}.remove", f"expected a list of header names, got {_kind(raw)}")
    else:
        for i, n in enumerate(raw):
            s = f.string(n, f"{path}.remove[{i}]", what="a header name")
            if s is not None and name(s, f"{path}.remove[{i}]"):
                remove.append(s)
    return HeaderEdit(tuple(pairs["set"]), tuple(pairs["add"]), tuple(remove))


def _path_edit(f: _Fields, value: object, path: str) -> PathEdit | None:
    m = f.mapping(value, path, {"type", "value"})
    if m is None:
        return None
    t = m.get("type")
    if t not in ("ReplaceFullPath", "ReplacePrefixMatch"):
        f.fail(f"{path}.type", f"expected one of ReplaceFullPath, ReplacePrefixMatch, got {t!r}")
        return None
    v = f.string(m.get("value", "/"), f"{path}.value", PATH_RE, "a path starting with / (no query)")
    return None if v is None else PathEdit(t, v)


def parse_filters(value: object, path: str, errors: list[FieldError], per_version: bool = False) -> Filters | None:
    f = _Fields(errors)
    m = f.mapping(value, path, VERSION_FILTER_FIELDS if per_version else FILTER_FIELDS)
    if m is None:
        return None
    before = len(errors)
    req = _header_edit(f, m["request_headers"], f"{path}.request_headers") if "request_headers" in m else None
    resp = _header_edit(f, m["response_headers"], f"{path}.response_headers") if "response_headers" in m else None
    rewrite = None
    if "rewrite" in m:
        rp = f"{path}.rewrite"
        rm = f.mapping(m["rewrite"], rp, {"hostname", "path"})
        if rm is not None:
            host = None if rm.get("hostname") is None else f.string(
                rm["hostname"], f"{rp}.hostname", HOSTNAME_RE, "a host name")
            pe = None if rm.get("path") is None else _path_edit(f, rm["path"], f"{rp}.path")
            rewrite = Rewrite(host.lower() if host else None, pe)
    redirect = None
    if "redirect" in m:
        rp = f"{path}.redirect"
        rm = f.mapping(m["redirect"], rp, {"scheme", "hostname", "port", "path", "status"})
        if rm is not None:
            scheme = rm.get("scheme")
            if scheme is not None and scheme not in ("http", "https"):
                f.fail(f"{rp}.scheme", f"expected one of http, https, got {scheme!r}")
            host = None if rm.get("hostname") is None else f.string(
                rm["hostname"], f"{rp}.hostname", HOSTNAME_RE, "a host name")
            port = None if rm.get("port") is None else f.number(rm["port"], f"{rp}.port", 1, 65535, integer=True)
            pe = None if rm.get("path") is None else _path_edit(f, rm["path"], f"{rp}.path")
            status = rm.get("status", 302)
            if status not in REDIRECT_STATUSES or isinstance(status, bool):
                f.fail(f"{rp}.status", f"expected one of {', '.join(map(str, REDIRECT_STATUSES))}, got {status!r}")
                status = 302
            redirect = Redirect(cast(Any, scheme), host.lower() if host else None,
                                None if port is None else int(port), pe, int(status))
    if rewrite is not None and redirect is not None:
        f.fail(f"{path}.redirect", "a route either redirects or rewrites (and forwards), not both")
    if len(errors) > before:
        return None
    return Filters(req, resp, rewrite, redirect)


def parse_version_filters(value: object, path: str, errors: list[FieldError],
                          versions: Mapping[str, object]) -> tuple[tuple[str, Filters], ...]:
    f = _Fields(errors)
    m = f.mapping(value, path)
    out = []
    for v, fv in (m or {}).items():
        vp = _join(path, v)
        if v not in versions:
            f.fail(vp, f"unknown version {v!r}")
            continue
        flt = parse_filters(fv, vp, errors, per_version=True)
        if flt is not None:
            out.append((v, flt))
    return tuple(out)


def parse_timeouts(value: object, path: str, errors: list[FieldError]) -> Timeouts | None:
    f = _Fields(errors)
    m = f.mapping(value, path, {"request", "backend_request"})
    if m is None:
        return None
    before = len(errors)
    req = None if m.get("request") is None else f.number(
        m["request"], f"{path}.request", 0, 86400, low_open=True)
    backend = None if m.get("backend_request") is None else f.number(
        m["backend_request"], f"{path}.backend_request", 0, 86400, low_open=True)
    if req is not None and backend is not None and backend > req:
        f.fail(f"{path}.backend_request", f"must not exceed request ({req:g}), got {backend:g}")
    if len(errors) > before:
        return None
    return Timeouts(None if req is None else float(req), None if backend is None else float(backend))


def parse_retry(value: object, path: str, errors: list[FieldError]) -> Retry | None:
    f = _Fields(errors)
    m = f.mapping(value, path, {"attempts", "codes", "backoff"})
    if m is None:
        return None
    before = len(errors)
    attempts = f.number(m.get("attempts", 1), f"{path}.attempts", 0, 10, integer=True)
    codes: list[int] = []
    raw = m.get("codes", [])
    if not isinstance(raw, list):
        f.fail(f"{path}.codes", f"expected a list of status codes, got {_kind(raw)}")
    else:
        for i, code in enumerate(raw):
            n = f.number(code, f"{path}.codes[{i}]", 500, 599, integer=True)
            if n is not None and int(n) not in codes:
                codes.append(int(n))
    backoff = f.number(m.get("backoff", 0), f"{path}.backoff", 0, 60)
    if len(errors) > before or attempts is None or backoff is None:
        return None
    return Retry(int(attempts), tuple(codes), float(backoff))


def check_route_actions(r: Route, path: str, errors: list[FieldError]) -> None:
    """Rules across fields: ReplacePrefixMatch needs PathPrefix matches (the prefix it replaces)."""
    flt = r.filters
    if flt is None:
        return
    for where, edit in (("rewrite", flt.rewrite), ("redirect", flt.redirect)):
        pe = edit.path if edit is not None else None
        if pe is not None and pe.type == "ReplacePrefixMatch" and any(
                m.path_type != "PathPrefix" for m in r.matches):
            errors.append(FieldError(f"{path}.filters.{where}.path.type",
                                     "ReplacePrefixMatch needs every match of the route to be a PathPrefix path"))


# Back to plain data

def _edit_to_dict(e: HeaderEdit) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if e.set:
        d["set"] = dict(e.set)
    if e.add:
        d["add"] = dict(e.add)
    if e.remove:
        d["remove"] = list(e.remove)
    return d


def filters_to_dict(flt: Filters) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if flt.request_headers is not None:
        d["request_headers"] = _edit_to_dict(flt.request_headers)
    if flt.response_headers is not None:
        d["response_headers"] = _edit_to_dict(flt.response_headers)
    if flt.rewrite is not None:
        rw: dict[str, Any] = {}
        if flt.rewrite.hostname is not None:
            rw["hostname"] = flt.rewrite.hostname
        if flt.rewrite.path is not None:
            rw["path"] = {"type": flt.rewrite.path.type, "value": flt.rewrite.path.value}
        d["rewrite"] = rw
    if flt.redirect is not None:
        r = flt.redirect
        rd: dict[str, Any] = {}
        if r.scheme is not None:
            rd["scheme"] = r.scheme
        if r.hostname is not None:
            rd["hostname"] = r.hostname
        if r.port is not None:
            rd["port"] = r.port
        if r.path is not None:
            rd["path"] = {"type": r.path.type, "value": r.path.value}
        rd["status"] = r.status
        d["redirect"] = rd
    return d


def actions_to_dict(r: Route) -> dict[str, Any]:
    """The route fields this module parses, as a route file writes them (absent when unused)."""
    d: dict[str, Any] = {}
    if r.more_matches:
        d["matches"] = [match_to_dict(m) for m in r.matches]
    else:
        d["match"] = match_to_dict(r.match)
    if r.filters is not None:
        d["filters"] = filters_to_dict(r.filters)
    if r.version_filters:
        d["version_filters"] = {v: filters_to_dict(flt) for v, flt in r.version_filters}
    if r.timeouts is not None:
        t: dict[str, float] = {}
        if r.timeouts.request is not None:
            t["request"] = r.timeouts.request
        if r.timeouts.backend_request is not None:
            t["backend_request"] = r.timeouts.backend_request
        d["timeouts"] = t
    if r.retry is not None:
        d["retry"] = {"attempts": r.retry.attempts, "codes": list(r.retry.codes), "backoff": r.retry.backoff}
    return d
