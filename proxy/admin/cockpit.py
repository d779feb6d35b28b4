"""The status page's per-route extras in GET /api/v1/stats: what the proxy answered itself, and what the
mirror targets answered to their copies (proxy.admin.observe adds these to each route).

Design rule: pure functions of two statistics snapshots (totals now, and the window since the rate base),
like the rest of the stats view; nothing is kept here. The numbers are arranged so that they add up to
what clients saw: `clients` = requests the versions answered + the proxy's own answers that no version
counts (a no_healthy_version 503 is already one of its version's requests, as dispatch records it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.telemetry.metrics import StatsSnapshot

# The proxy's own answers a version's counters already hold (dispatch counts the 503 under the version the
# request was meant for, so that version's error ratio shows what its clients saw).
IN_VERSION_COUNTS = frozenset({"no_healthy_version"})
# What a client got for each refusal, for the page's column headings (bad_request and too_large have variants:
# 400/417/505 and 413/414/431; the most common is shown).
STATUS = {"no_route": 404, "no_healthy_version": 503, "no_identity": 401, "bad_request": 400, "too_large": 413,
          "timeout": 408, "too_many_connections": 503, "misdirected": 421}
# A mirrored copy that got no HTTP answer: "error" (connect failure, timeout) or "dropped" (not sent).
NO_ANSWER = ("error", "dropped")


def _answers(now: StatsSnapshot, recent: StatsSnapshot | None, route: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (r, reason), n in sorted(now.answers.items()):
        if r == route and n:
            out[reason] = {"total": n, "recent": None if recent is None else recent.answers.get((r, reason), 0),
                           "status": STATUS.get(reason), "in_version_counts": reason in IN_VERSION_COUNTS}
    return out


def unrouted(now: StatsSnapshot, recent: StatsSnapshot | None) -> dict[str, dict[str, Any]]:
    """The proxy's answers before any route matched (no route, bad input, connection limit)."""
    return _answers(now, recent, "")


def _mirrored(now: StatsSnapshot, recent: StatsSnapshot | None, route: str,
              seconds: float) -> list[dict[str, Any]]:
    by_version: dict[str, dict[str, int]] = {}
    for (r, version, code), n in now.mirrors.items():
        if r == route:
            by_version.setdefault(version, {})[code] = n
    out = []
    for version, codes in sorted(by_version.items()):
        view: dict[str, Any] = {"version": version, "codes": dict(sorted(codes.items())), "total": sum(codes.values()),
                                "recent": None, "rps": None, "error_ratio": None}
        if recent is not None:
            window = {code: n for (r, v, code), n in recent.mirrors.items() if r == route and v == version and n}
            view["recent"] = dict(sorted(window.items()))
            sent = sum(n for code, n in window.items() if code != "dropped")
            if seconds > 0:
                view["rps"] = round(sent / seconds, 3)
            if sent:
                bad = sum(n for code, n in window.items() if code == "error" or (code.isdigit() and int(code) >= 500))
                view["error_ratio"] = round(bad / sent, 6)
        out.append(view)
    return out


def route_extras(now: StatsSnapshot, recent: StatsSnapshot | None, route: str, seconds: float,
                 version_requests: Mapping[str, int]) -> dict[str, Any]:
    """`version_requests`: each version's request total on the route (the stats view's rows)."""
    answers = _answers(now, recent, route)
    by_versions = sum(version_requests.values())
    by_proxy = sum(a["total"] for reason, a in answers.items() if reason not in IN_VERSION_COUNTS)
    return {
        "answers": answers,
        "clients": {"versions": by_versions, "proxy": by_proxy, "total": by_versions + by_proxy},
        "mirrored": _mirrored(now, recent, route, seconds),
    }
