"""How a State is written into a store: a small manifest plus content-addressed blobs.

Why: a route's pins can hold 100,000 entries, and every revision keeps the whole state. Pins go into a
blob named by its SHA-256, so a weight change stores a few hundred bytes and points at the pins blob the
previous revision already stored; reading back resolves the blobs (and caches them by hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from proxy.model import State
from proxy.parse import state_from_stored, state_to_stored

PINS_REF = "$pins"


class Codec:
    def __init__(self) -> None:
        # id(pins mapping) -> (the mapping, its hash). Holding the mapping keeps its id from being reused.
        self._hash_of: dict[int, tuple[Mapping[str, str], str]] = {}
        self._pins_by_hash: dict[str, dict[str, str]] = {}

    def encode(self, state: State) -> tuple[str, dict[str, bytes]]:
        """-> (manifest JSON, {blob hash: blob bytes}) for every pins blob the state refers to."""
        stored = state_to_stored(state)
        blobs: dict[str, bytes] = {}
        live: dict[int, tuple[Mapping[str, str], str]] = {}
        for r in state.routes:
            if not r.pins:
                continue
            known = self._hash_of.get(id(r.pins))
            if known is None:
                # Pins decoded from an older revision (a rollback) are the cached mappings themselves.
                known = next(((p, d) for d, p in self._pins_by_hash.items() if p is r.pins), None)
            if known is not None and known[0] is r.pins:
                digest = known[1]
            else:
                data = json.dumps(r.pins, separators=(",", ":"), sort_keys=True).encode()
                digest = hashlib.sha256(data).hexdigest()
                blobs[digest] = data
                self._pins_by_hash[digest] = dict(r.pins)
            live[id(r.pins)] = (r.pins, digest)
            stored["routes"][r.name]["pins"] = {PINS_REF: digest}
        self._hash_of = live
        self._pins_by_hash = {d: self._pins_by_hash[d] for _, d in live.values() if d in self._pins_by_hash}
        return json.dumps(stored, separators=(",", ":")), blobs

    def decode(self, manifest: str, load_blob: Callable[[str], bytes | None], remember: bool = True) -> State:
        """Manifest -> State. `remember=False` (reading an old revision) uses the pins cache but leaves it
        as it is, so the current revision's pins stay cached for the next commit and the next read."""
        stored: dict[str, Any] = json.loads(manifest)
        digests: dict[str, str] = {}
        reuse: dict[str, dict[str, str]] = {}
        for name, rd in stored.get("routes", {}).items():
            pins = rd.get("pins")
            if isinstance(pins, dict) and PINS_REF in pins:
                digest = pins[PINS_REF]
                digests[name] = digest
                cached = self._pins_by_hash.get(digest)
                if cached is not None:
                    # Validated when first loaded: skip re-checking 100,000 entries on every revision.
                    reuse[name] = cached
                    rd["pins"] = {}
                    continue
                data = load_blob(digest)
                if data is None:
                    raise ValueError(f"revision refers to missing pins blob {digest}")
                rd["pins"] = json.loads(data)
        state = state_from_stored(stored)
        if reuse:
            routes = []
            for r in state.routes:
                pins = reuse.get(r.name)
                if pins is not None:
                    missing = set(pins.values()) - set(state.versions)
                    if missing:
                        raise ValueError(f"routes.{r.name}.pins: unknown version(s) {sorted(missing)}")
                    routes.append(dataclasses.replace(r, pins=pins))
                else:
                    routes.append(r)
            state = dataclasses.replace(state, routes=tuple(routes))
        if not remember:
            return state
        # Remember decoded pins so re-encoding an unchanged route does not hash its pins again; keep only
        # the blobs this state uses so memory stays bounded however many pin changes go by. States share
        # the same pins mapping, which nothing mutates (changes always build a new mapping).
        self._pins_by_hash = {d: dict(r.pins) if not isinstance(r.pins, dict) else r.pins for r in state.routes
                              if (d := digests.get(r.name)) is not None}
        self._hash_of = {id(r.pins): (r.pins, digests[r.name]) for r in state.routes if r.name in digests}
        return state
