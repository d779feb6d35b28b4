"""How a State is written into a store: a small manifest plus content-addressed blobs.

Why: a route's pins can hold 100,000 entries, and every revision keeps the whole state. A route's pins are
split by CRC-32 of the client id into K buckets (a power of two, about sqrt(pins / 2), so 256 at 100,000
pins); each bucket is a chunk blob named by its SHA-256, and an index blob lists the K chunk digests. The
manifest refers to the index (`{"$chunks": digest}`). So a weight change stores a few hundred bytes and
points at the index the previous revision already stored, and a pin or unpin stores one new chunk (~9 KB
at 100,000 pins) and one new index (32 bytes per chunk), however many pins the route has.

Revisions written before chunking refer to one blob holding all of a route's pins (`{"$pins": digest}`);
they are still read, and a weight change on such a state keeps referring to that blob. The first pin
change rewrites the route's pins as chunks.

Reading back resolves the blobs and caches the decoded chunks of the current state by digest, so reading
the next revision loads and validates only the chunks that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from proxy.model import State
from proxy.parse import route_to_dict, state_from_stored, version_to_stored

PINS_REF = "$pins"  # the old format: one blob with all of a route's pins
CHUNKS_REF = "$chunks"  # an index blob: INDEX_MAGIC then K raw SHA-256 digests of chunk blobs
INDEX_MAGIC = b"turnout pins index 1 crc32\n"
DIGEST_BYTES = 32
# Up to this many pins a route keeps one chunk: below it an index saves nothing worth its own blob.
ONE_CHUNK_MAX = 512
# A pin change diffs against the previous pins; when more than this share changed, re-bucket everything.
INCREMENTAL_SHARE = 8

# Blobs a decode needs, by digest -> their bytes (None: missing). Asked for in batches (all index blobs,
# then all chunks they name) so a store that fetches over the network does a few round trips, not K.
LoadBlobs = Callable[[list[str]], Mapping[str, bytes | None]]


def bucket_count(pins: int) -> int:
    if pins <= ONE_CHUNK_MAX:
        return 1
    return 1 << math.ceil(math.log2(math.sqrt(pins / 2)))


def bucket_of(client: str, k: int) -> int:
    return zlib.crc32(client.encode()) & (k - 1)


def chunk_bytes(chunk: Mapping[str, str]) -> bytes:
    return json.dumps(chunk, separators=(",", ":"), sort_keys=True).encode()


def index_bytes(digests: list[str]) -> bytes:
    return INDEX_MAGIC + b"".join(bytes.fromhex(d) for d in digests)


def parse_index(data: bytes) -> list[str]:
    body = data[len(INDEX_MAGIC):]
    if not data.startswith(INDEX_MAGIC) or len(body) % DIGEST_BYTES:
        raise ValueError("pins index blob is malformed")
    return [body[i:i + DIGEST_BYTES].hex() for i in range(0, len(body), DIGEST_BYTES)]


def blob_refs(manifest: str) -> tuple[set[str], set[str]]:
    """-> (index digests, whole-pins digests of the old format) a manifest refers to (garbage collection)."""
    indexes: set[str] = set()
    whole: set[str] = set()
    for rd in json.loads(manifest).get("routes", {}).values():
        pins = rd.get("pins")
        if isinstance(pins, dict):
            if CHUNKS_REF in pins:
                indexes.add(str(pins[CHUNKS_REF]))
            elif PINS_REF in pins:
                whole.add(str(pins[PINS_REF]))
    return indexes, whole


@dataclasses.dataclass(slots=True)
class _Layout:
    """One route's pins as stored: the mapping, the manifest reference, and (chunked) its buckets."""

    pins: Mapping[str, str]
    ref: dict[str, str]  # what the manifest says: {"$chunks": index digest} or {"$pins": digest}
    buckets: list[dict[str, str]] | None = None  # None for the old format
    digests: list[str] | None = None
    versions: list[frozenset[str]] | None = None  # versions each chunk names


def _split(pins: Mapping[str, str], k: int) -> list[dict[str, str]]:
    buckets: list[dict[str, str]] = [{} for _ in range(k)]
    if k == 1:
        buckets[0] = dict(pins)
        return buckets
    for client, version in pins.items():
        buckets[zlib.crc32(client.encode()) & (k - 1)][client] = version
    return buckets


def _layout(pins: Mapping[str, str], previous: _Layout | None, blobs: dict[str, bytes]) -> _Layout:
    """Chunk `pins`, adding to `blobs` every blob the previous layout does not already have stored."""
    ideal = bucket_count(len(pins))
    if previous is not None and previous.buckets is not None and previous.digests is not None \
            and previous.versions is not None:
        k = len(previous.buckets)
        # Keep the previous bucket count within a factor of 4 of the ideal one, so adding or removing one
        # pin near a boundary does not re-bucket 100,000 pins back and forth.
        if k * 4 >= ideal and ideal * 4 >= k:
            # Which clients changed: a C-level set operation, far cheaper than bucketing every pin.
            changed = {client for client, _ in pins.items() ^ previous.pins.items()}
            if len(changed) * INCREMENTAL_SHARE <= len(pins):
                buckets = list(previous.buckets)
                digests = list(previous.digests)
                versions = list(previous.versions)
                touched: set[int] = set()
                for client in changed:
                    j = bucket_of(client, k)
                    if j not in touched:
                        buckets[j] = dict(buckets[j])  # the previous layout's dicts are shared: copy first
                        touched.add(j)
                    version = pins.get(client)
                    if version is None:
                        buckets[j].pop(client, None)
                    else:
                        buckets[j][client] = version
                for j in touched:
                    data = chunk_bytes(buckets[j])
                    digests[j] = hashlib.sha256(data).hexdigest()
                    versions[j] = frozenset(buckets[j].values())
                    blobs[digests[j]] = data
                return _index(pins, buckets, digests, versions, blobs)
    buckets = _split(pins, ideal)
    digests = []
    for b in buckets:
        data = chunk_bytes(b)
        digests.append(hashlib.sha256(data).hexdigest())
        blobs[digests[-1]] = data
    return _index(pins, buckets, digests, [frozenset(b.values()) for b in buckets], blobs)


def _index(pins: Mapping[str, str], buckets: list[dict[str, str]], digests: list[str],
           versions: list[frozenset[str]], blobs: dict[str, bytes]) -> _Layout:
    data = index_bytes(digests)
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return _Layout(pins, {CHUNKS_REF: digest}, buckets, digests, versions)


def _check_chunk(route: str, data: bytes) -> dict[str, str]:
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"routes.{route}.pins: a pins chunk is not a mapping")
    for client, version in chunk.items():
        if not client or len(client) > 256 or not isinstance(version, str):
            raise ValueError(f"routes.{route}.pins[{client!r}]: a client id is 1-256 characters and maps to a "
                             "version name")
    return chunk


class Codec:
    def __init__(self) -> None:
        # Route name -> how its pins are stored in the state last encoded or decoded (remembered).
        self._layouts: dict[str, _Layout] = {}

    def encode(self, state: State) -> tuple[str, dict[str, bytes]]:
        """-> (manifest JSON, {blob hash: blob bytes}) for every blob the previous state did not have.

        Blobs omitted are referenced by the state last encoded or decoded; a store only commits on top of
        its current revision, which refers to them, so they are still stored."""
        # parse.state_to_stored, without copying every route's pins only to replace them by a reference.
        stored: dict[str, Any] = {
            "versions": {n: version_to_stored(v) for n, v in state.versions.items()},
            "routes": {r.name: route_to_dict(r, with_name=False, with_pins=False) for r in state.routes},
        }
        blobs: dict[str, bytes] = {}
        live: dict[str, _Layout] = {}
        for r in state.routes:
            if not r.pins:
                continue
            known = self._layouts.get(r.name)
            if known is None or known.pins is not r.pins:
                known = _layout(r.pins, known, blobs)
            live[r.name] = known
            stored["routes"][r.name]["pins"] = known.ref
        self._layouts = live
        return json.dumps(stored, separators=(",", ":")), blobs

    def decode(self, manifest: str, load_blobs: LoadBlobs, remember: bool = True) -> State:
        """Manifest -> State. `remember=False` (reading an old revision) uses the cached chunks but leaves
        them as they are, so the current revision's stay cached for the next commit and the next read."""
        stored: dict[str, Any] = json.loads(manifest)
        refs: dict[str, dict[str, str]] = {}
        for name, rd in stored.get("routes", {}).items():
            ref = rd.get("pins")
            if isinstance(ref, dict) and (CHUNKS_REF in ref or PINS_REF in ref):
                refs[name] = {k: str(v) for k, v in ref.items()}
                rd["pins"] = {}
        layouts: dict[str, _Layout] = {}
        wanted: dict[str, str] = {}  # route -> blob it needs (index or whole pins) not cached
        for name, ref in refs.items():
            known = self._layouts.get(name)
            if known is not None and known.ref == ref:
                layouts[name] = known
            else:
                wanted[name] = ref.get(CHUNKS_REF) or ref[PINS_REF]
        got = load_blobs(sorted(set(wanted.values()))) if wanted else {}
        chunk_lists: dict[str, list[str]] = {}
        for name, digest in wanted.items():
            data = got.get(digest)
            if data is None:
                raise ValueError(f"revision refers to missing pins blob {digest}")
            if CHUNKS_REF in refs[name]:
                chunk_lists[name] = parse_index(data)
            else:
                layouts[name] = _Layout(_check_chunk(name, data), refs[name])
        # Chunks already decoded (current state's, any route) are reused; the rest loaded in one batch.
        have: dict[str, tuple[dict[str, str], frozenset[str]]] = {}
        for lay in self._layouts.values():
            if lay.buckets is not None and lay.digests is not None and lay.versions is not None:
                for d, b, v in zip(lay.digests, lay.buckets, lay.versions, strict=True):
                    have[d] = (b, v)
        need = {d: name for name, ds in chunk_lists.items() for d in ds if d not in have}
        if need:
            loaded = load_blobs(sorted(need))
            for d, name in need.items():
                data = loaded.get(d)
                if data is None:
                    raise ValueError(f"revision refers to missing pins chunk {d}")
                # A chunk is validated when first loaded (a few hundred entries), never again.
                chunk = _check_chunk(name, data)
                have[d] = (chunk, frozenset(chunk.values()))
        for name, ds in chunk_lists.items():
            buckets = [have[d][0] for d in ds]
            previous = self._layouts.get(name)
            pins: dict[str, str]
            if previous is not None and previous.digests is not None and previous.buckets is not None \
                    and len(previous.digests) == len(ds) and isinstance(previous.pins, dict):
                # Copy the previous pins and patch the changed buckets: a pin change touches one of 256.
                pins = previous.pins.copy()
                for j, d in enumerate(ds):
                    if d != previous.digests[j]:
                        for client in previous.buckets[j]:
                            del pins[client]
                        pins.update(buckets[j])
            else:
                pins = {}
                for b in buckets:
                    pins.update(b)
            layouts[name] = _Layout(pins, refs[name], buckets, ds, [have[d][1] for d in ds])
        state = state_from_stored(stored)
        if layouts:
            routes = []
            for r in state.routes:
                found = layouts.get(r.name)
                if found is None:
                    routes.append(r)
                    continue
                lay = found
                used = set[str]().union(*lay.versions) if lay.versions is not None else set(lay.pins.values())
                missing = used - set(state.versions)
                if missing:
                    raise ValueError(f"routes.{r.name}.pins: unknown version(s) {sorted(missing)}")
                routes.append(dataclasses.replace(r, pins=lay.pins))
            state = dataclasses.replace(state, routes=tuple(routes))
        if remember:
            # Keep only this state's layouts, so memory stays bounded however many pin changes go by. States
            # share pins mappings, which nothing mutates (changes always build a new mapping).
            self._layouts = layouts
        return state
