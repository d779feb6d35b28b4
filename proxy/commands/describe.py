"""Text lines describing a route's matches, filters, timeouts and retry, for `turnout status`.

Design rule: reads the route JSON the admin API serves (proxy.parse.route_to_dict's shape), never the
model, so the CLI shows exactly what the API holds. A route that uses none of these fields adds no line.
"""

from __future__ import annotations

from typing import Any


def _pairs(value: Any, regex_mark: str = "~") -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return " ".join(f"{p['name']}{regex_mark if p.get('type') == 'RegularExpression' else '='}{p['value']}"
                    for p in value)


def match_text(m: dict[str, Any]) -> str:
    parts = [f"host {m['host']}" if m.get("host") else "any host"]
    if "path" in m:
        parts.append(f"path {m['path']['type']} {m['path']['value']}")
    else:
        parts.append(f"prefix {m.get('path_prefix', '/')}")
    if m.get("method"):
        parts.append(f"method {m['method']}")
    if m.get("headers"):
        parts.append("headers " + _pairs(m["headers"]))
    if m.get("query"):
        parts.append("query " + _pairs(m["query"]))
    return ", ".join(parts)


def _edit_text(e: dict[str, Any]) -> str:
    parts = []
    if e.get("set"):
        parts.append("set " + _pairs(e["set"]))
    if e.get("add"):
        parts.append("add " + _pairs(e["add"]))
    if e.get("remove"):
        parts.append("remove " + " ".join(e["remove"]))
    return ", ".join(parts) or "nothing"


def filters_text(f: dict[str, Any]) -> list[str]:
    out = []
    if "request_headers" in f:
        out.append("request headers: " + _edit_text(f["request_headers"]))
    if "response_headers" in f:
        out.append("response headers: " + _edit_text(f["response_headers"]))
    if "rewrite" in f:
        rw = f["rewrite"]
        what = []
        if rw.get("hostname"):
            what.append(f"host {rw['hostname']}")
        if rw.get("path"):
            what.append(f"path {rw['path']['type']} {rw['path']['value']}")
        out.append("rewrite: " + (", ".join(what) or "nothing"))
    if "redirect" in f:
        rd = f["redirect"]
        what = [str(rd.get("status", 302))]
        what += [f"{k} {rd[k]}" for k in ("scheme", "hostname", "port") if rd.get(k) is not None]
        if rd.get("path"):
            what.append(f"path {rd['path']['type']} {rd['path']['value']}")
        out.append("redirect: " + ", ".join(what))
    return out


def route_lines(r: dict[str, Any]) -> list[str]:
    """Indented lines for the route's matches (when it has several), filters, timeouts and retry."""
    lines = []
    matches = r.get("matches")
    if matches:
        lines += [f"  match {i}: {match_text(m)}" for i, m in enumerate(matches)]
    elif r.get("match") and any(k in r["match"] for k in ("path", "method", "query")):
        lines.append(f"  match: {match_text(r['match'])}")
    lines += [f"  {t}" for t in filters_text(r.get("filters", {}))]
    for v, f in r.get("version_filters", {}).items():
        lines += [f"  version {v} {t}" for t in filters_text(f)]
    t = r.get("timeouts")
    if t:
        lines.append("  timeouts: " + ", ".join(f"{k} {v:g}s" for k, v in t.items()))
    rt = r.get("retry")
    if rt:
        codes = " ".join(map(str, rt.get("codes", []))) or "none"
        lines.append(f"  retry: {rt.get('attempts', 1)} attempt(s) on {codes}, backoff {rt.get('backoff', 0):g}s")
    return lines
