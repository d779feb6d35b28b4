"""The route index: which match entries can accept a request's host and path, without scanning them all.

Design rule: built once per route table from the entries in precedence order (an entry's position is its
precedence, lower wins); a lookup costs a few dict probes whatever the number of entries, and answers
exactly the positions, ascending, whose host and path part accept the request, as a linear scan would.
The caller then tries each with the entry's own full predicate (method, headers, query, regex) and takes
the first that accepts. Hosts are indexed by exact name, then by wildcard suffix (".example.com" is
probed at each dot of the request's host), then "any host"; within a host bucket, exact paths are one
dict probe and prefixes one probe per distinct prefix length, only at a segment boundary. A regex entry
is a candidate for every path of its bucket. Sans-IO: no asyncio, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

PATH_PREFIX: Final = 0
PATH_EXACT: Final = 1
PATH_REGEX: Final = 2



class IndexedEntry(Protocol):
    """What the index reads of an entry, once, at build time."""

    @property
    def host(self) -> str | None: ...  # exact host, lower-case; None: any host (or a wildcard)

    @property
    def host_suffix(self) -> str | None: ...  # ".example.com" for "*.example.com"

    @property
    def path_kind(self) -> int: ...

    @property
    def path(self) -> str: ...  # the prefix or the exact path; unused for a regex entry


class _Bucket:
    """The entries of one host bucket, by path."""

    __slots__ = ("_every", "_exact", "_lengths", "_prefixes")

    def __init__(self) -> None:
        self._every: list[int] = []  # prefix "/" and regex entries: a candidate for any path
        self._exact: dict[str, list[int]] = {}
        self._prefixes: dict[str, list[int]] = {}
        self._lengths: tuple[int, ...] = ()

    def add(self, position: int, kind: int, path: str) -> None:
        if kind == PATH_REGEX or (kind == PATH_PREFIX and path == "/"):
            self._every.append(position)
        elif kind == PATH_EXACT:
            self._exact.setdefault(path, []).append(position)
        elif kind == PATH_PREFIX:
            self._prefixes.setdefault(path, []).append(position)
        else:
            raise ValueError(f"path_kind: expected {PATH_PREFIX}, {PATH_EXACT} or {PATH_REGEX}, got {kind!r}")

    def seal(self) -> None:
        self._lengths = tuple(sorted({len(p) for p in self._prefixes}))

    def collect(self, path: str, into: list[list[int]]) -> None:
        """Append the position lists of this bucket's entries that accept `path`."""
        if self._every:
            into.append(self._every)
        if self._exact:
            hit = self._exact.get(path)
            if hit is not None:
                into.append(hit)
        n = len(path)
        prefixes = self._prefixes
        for length in self._lengths:
            if length > n:
                break
            # A prefix P (not "/") accepts `path` when path == P, or path starts with P and P ends with "/"
            # or the next character of `path` is "/": the segment-boundary rule of CompiledRoute.matches.
            if length == n:
                hit = prefixes.get(path)
            elif path[length] == "/" or (length > 0 and path[length - 1] == "/"):
                hit = prefixes.get(path[:length])
            else:
                continue
            if hit is not None:
                into.append(hit)


class RouteIndex:
    """`candidates(host, path)`: positions, ascending, of the entries whose host and path part accept."""

    __slots__ = ("_any", "_by_host", "_by_suffix", "_found", "_has_any", "_none", "_odd_suffixes")

    def __init__(self, entries: Sequence[IndexedEntry]) -> None:
        self._by_host: dict[str, _Bucket] = {}
        self._by_suffix: dict[str, _Bucket] = {}
        # Suffixes not starting with "." cannot be probed at dots; they are few (none from route files).
        self._odd_suffixes: list[tuple[str, _Bucket]] = []
        self._any = _Bucket()
        self._none: list[int] = []
        # Scratch space of one lookup (the event loop makes one at a time): no list allocated per request.
        self._found: list[list[int]] = []
        odd: dict[str, _Bucket] = {}
        for position, e in enumerate(entries):
            host, suffix = e.host, e.host_suffix
            if host is not None:
                bucket = self._by_host.get(host)
                if bucket is None:
                    bucket = self._by_host[host] = _Bucket()
                # Both set: the linear predicate tests both, so the exact host must also end with it.
                if suffix is not None and not host.endswith(suffix):
                    continue
            elif suffix is not None:
                table = self._by_suffix if suffix.startswith(".") else odd
                bucket = table.get(suffix)
                if bucket is None:
                    bucket = table[suffix] = _Bucket()
            else:
                bucket = self._any
            bucket.add(position, e.path_kind, e.path)
        self._odd_suffixes = list(odd.items())
        self._has_any = bool(self._any._every or self._any._exact or self._any._prefixes)
        for b in (*self._by_host.values(), *self._by_suffix.values(), *odd.values(), self._any):
            b.seal()

    def __repr__(self) -> str:
        return (f"<RouteIndex [hosts: {len(self._by_host)} | suffixes: "
                f"{len(self._by_suffix) + len(self._odd_suffixes)}]>")

    def candidates(self, host: str, path: str) -> list[int]:
        """A list the caller must not change (a precomputed one is returned when a single one applies)."""
        found = self._found
        found.clear()
        bucket = self._by_host.get(host)
        if bucket is not None:
            bucket.collect(path, found)
        if self._by_suffix:
            by_suffix = self._by_suffix
            dot = host.find(".")
            while dot >= 0:
                b = by_suffix.get(host[dot:])
                if b is not None:
                    b.collect(path, found)
                dot = host.find(".", dot + 1)
        if self._odd_suffixes:
            for suffix, b in self._odd_suffixes:
                if host.endswith(suffix):
                    b.collect(path, found)
        if self._has_any:
            self._any.collect(path, found)
        if not found:
            return self._none
        if len(found) == 1:
            only = found[0]
            found.clear()
            return only
        merged: list[int] = []
        for positions in found:
            merged.extend(positions)
        found.clear()
        merged.sort()
        return merged
