"""What changed between two states (two revisions): per route (split, pins, every other field) and per version.

Design rule: a pure function of two States, no I/O. Fields are compared in their route-file form
(proxy.parse.route_to_dict), so a field a route gains later (matches, filters, ...) is diffed without a line
here; only the split (per version) and the pins (counts and a few examples: a route can hold 100,000) get
a shape of their own. The JSON form (`diff_to_json`) is what `GET /api/v1/revisions/A/diff/B` serves, the
text form (`render_diff`) what `turnout diff` prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.model import Route, State, Version
from proxy.parse import route_to_dict, version_to_dict

Change = Literal["added", "removed", "changed"]
# Pins named per kind of change: enough to recognise what happened, bounded however many pins moved.
PIN_EXAMPLES = 5
# Fields with a shape of their own (or none worth showing) in a route's diff.
_OWN_FIELDS = frozenset({"name", "split", "pins"})


@dataclass(frozen=True, slots=True)
class WeightChange:
    version: str
    before: float | None  # None: not in that split
    after: float | None


@dataclass(frozen=True, slots=True)
class PinsDiff:
    before: int
    after: int
    added: int
    removed: int
    changed: int
    examples_added: tuple[tuple[str, str], ...]  # (client, version)
    examples_removed: tuple[tuple[str, str], ...]
    examples_changed: tuple[tuple[str, str, str], ...]  # (client, before, after)


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    before: Any  # the field's route-file (JSON) value; None when absent
    after: Any


@dataclass(frozen=True, slots=True)
class RouteDiff:
    route: str
    change: Change
    split_before: tuple[tuple[str, float], ...]
    split_after: tuple[tuple[str, float], ...]
    weights: tuple[WeightChange, ...]  # empty: the split is the same
    pins: PinsDiff | None
    fields: tuple[FieldChange, ...]


@dataclass(frozen=True, slots=True)
class VersionDiff:
    version: str
    change: Change
    before: Mapping[str, Any] | None  # the spec, as GET /api/v1/versions/{name} shows it (plus its kind)
    after: Mapping[str, Any] | None
    fields: tuple[str, ...]  # changed only: the spec keys that differ


@dataclass(frozen=True, slots=True)
class StateDiff:
    routes: tuple[RouteDiff, ...]
    versions: tuple[VersionDiff, ...]

    @property
    def changed(self) -> bool:
        return bool(self.routes or self.versions)


def _weights(before: tuple[tuple[str, float], ...], after: tuple[tuple[str, float], ...]) -> tuple[WeightChange, ...]:
    a, b = dict(before), dict(after)
    order = [v for v, _ in before] + [v for v, _ in after if v not in a]
    return tuple(WeightChange(v, a.get(v), b.get(v)) for v in order if a.get(v) != b.get(v))


def _pins(before: Mapping[str, str], after: Mapping[str, str]) -> PinsDiff | None:
    if before is after:
        return None
    moved = {client for client, _ in before.items() ^ after.items()}
    if not moved:
        return None
    added = sorted(c for c in moved if c not in before)
    removed = sorted(c for c in moved if c not in after)
    changed = sorted(c for c in moved if c in before and c in after)
    return PinsDiff(len(before), len(after), len(added), len(removed), len(changed),
                    tuple((c, after[c]) for c in added[:PIN_EXAMPLES]),
                    tuple((c, before[c]) for c in removed[:PIN_EXAMPLES]),
                    tuple((c, before[c], after[c]) for c in changed[:PIN_EXAMPLES]))


def _fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    keys = [k for k in before if k not in _OWN_FIELDS]
    keys += [k for k in after if k not in _OWN_FIELDS and k not in before]
    return tuple(FieldChange(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k))


def diff_route(before: Route | None, after: Route | None) -> RouteDiff | None:
    """None when the two are equal (or both absent)."""
    if before is after or before == after:
        return None
    either = after if after is not None else before
    assert either is not None
    name = either.name
    change: Change = "added" if before is None else ("removed" if after is None else "changed")
    split_b = () if before is None else before.split
    split_a = () if after is None else after.split
    fb = {} if before is None else route_to_dict(before, with_pins=False)
    fa = {} if after is None else route_to_dict(after, with_pins=False)
    pins = _pins({} if before is None else before.pins, {} if after is None else after.pins)
    return RouteDiff(name, change, split_b, split_a, _weights(split_b, split_a), pins, _fields(fb, fa))


def _spec(v: Version) -> dict[str, Any]:
    return {"kind": v.spec.kind, **version_to_dict(v)}


def diff_version(before: Version | None, after: Version | None) -> VersionDiff | None:
    """By spec only: instances come and go under an unchanged version and are no change of the state's."""
    sb = None if before is None else _spec(before)
    sa = None if after is None else _spec(after)
    if sb == sa:
        return None
    either = after if after is not None else before
    assert either is not None
    name = either.name
    if sb is None or sa is None:
        return VersionDiff(name, "added" if sb is None else "removed", sb, sa, ())
    keys = list(sb) + [k for k in sa if k not in sb]
    return VersionDiff(name, "changed", sb, sa, tuple(k for k in keys if sb.get(k) != sa.get(k)))


def diff_states(before: State, after: State) -> StateDiff:
    """Routes in `after`'s order, then the ones only `before` has; versions by name."""
    routes = []
    for r in after.routes:
        d = diff_route(before.route(r.name), r)
        if d is not None:
            routes.append(d)
    names = {r.name for r in after.routes}
    for r in before.routes:
        if r.name not in names:
            d = diff_route(r, None)
            assert d is not None
            routes.append(d)
    versions = []
    for name in sorted(set(before.versions) | set(after.versions)):
        vd = diff_version(before.versions.get(name), after.versions.get(name))
        if vd is not None:
            versions.append(vd)
    return StateDiff(tuple(routes), tuple(versions))


# JSON and text forms

def _w(x: float | None) -> float | None:
    return None if x is None else float(x)


def diff_to_json(d: StateDiff) -> dict[str, Any]:
    routes = []
    for r in d.routes:
        split = None
        if r.weights:
            split = {"before": {v: float(w) for v, w in r.split_before},
                     "after": {v: float(w) for v, w in r.split_after},
                     "changes": [{"version": c.version, "before": _w(c.before), "after": _w(c.after)}
                                 for c in r.weights]}
        pins = None
        if r.pins is not None:
            p = r.pins
            pins = {"before": p.before, "after": p.after, "added": p.added, "removed": p.removed,
                    "changed": p.changed, "examples": {
                        "added": [{"client": c, "version": v} for c, v in p.examples_added],
                        "removed": [{"client": c, "version": v} for c, v in p.examples_removed],
                        "changed": [{"client": c, "before": b, "after": a} for c, b, a in p.examples_changed]}}
        routes.append({"route": r.route, "change": r.change, "split": split, "pins": pins,
                       "fields": {f.field: {"before": f.before, "after": f.after} for f in r.fields}})
    versions: list[dict[str, Any]] = []
    for v in d.versions:
        item: dict[str, Any] = {"version": v.version, "change": v.change, "before": v.before, "after": v.after}
        if v.change == "changed":
            item["fields"] = list(v.fields)
        versions.append(item)
    return {"changed": d.changed, "routes": routes, "versions": versions}


def _value(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x == int(x):
        return str(int(x))
    if isinstance(x, str):
        return x
    return json.dumps(x, separators=(",", ":"), sort_keys=True)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(*rows, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def render_diff(d: StateDiff) -> str:
    """A readable table: one row per changed thing (ROUTE/VERSION, WHAT, BEFORE, AFTER)."""
    if not d.changed:
        return "no differences"
    rows: list[list[str]] = [["ROUTE", "WHAT", "BEFORE", "AFTER"]]
    for r in d.routes:
        if r.change != "changed":
            rows.append([r.route, f"route {r.change}", "", ""])
        for c in r.weights:
            rows.append([r.route, f"weight {c.version}", _value(c.before), _value(c.after)])
        if r.pins is not None:
            p = r.pins
            rows.append([r.route, "pins", str(p.before),
                         f"{p.after} (+{p.added} -{p.removed} ~{p.changed})"])
            rows += [[r.route, f"  pin {c}", "-", v] for c, v in p.examples_added]
            rows += [[r.route, f"  pin {c}", v, "-"] for c, v in p.examples_removed]
            rows += [[r.route, f"  pin {c}", b, a] for c, b, a in p.examples_changed]
        for f in r.fields:
            rows.append([r.route, f.field, _value(f.before), _value(f.after)])
    lines = _table(rows) if len(rows) > 1 else []
    if d.versions:
        vrows = [["VERSION", "CHANGE", "SPEC"]]
        for v in d.versions:
            if v.change == "changed":
                spec = "; ".join(f"{k}: {_value((v.before or {}).get(k))} -> {_value((v.after or {}).get(k))}"
                                 for k in v.fields)
            else:
                spec = _value(v.after if v.change == "added" else v.before)
            vrows.append([v.version, v.change, spec])
        if lines:
            lines.append("")
        lines += _table(vrows)
    return "\n".join(lines)
