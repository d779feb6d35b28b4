"""The SSLContexts of https:// upstreams: one per version's tls spec, built when a table arrives, kept across
tables while the spec and its files stay the same.

Design rule: contexts are built off the request path (a table change), never per connection; a spec whose
files cannot be loaded gets no context, so its endpoints fail their connects (502, counted as `tls`) and
never speak cleartext or unverified TLS. A file replaced in place (same path, new mtime or size) builds a
new context at the next table, so a rotated CA or client certificate needs no new version.
"""

from __future__ import annotations

import logging
import os
import ssl

from proxy.model import UpstreamTLS, Version
from proxy.upstream_tls import TLSFileError, build_context

log = logging.getLogger("turnout.dataplane")

DEFAULTS = UpstreamTLS()  # an https:// version without a tls block: the system's trust store, verified

_Key = tuple[UpstreamTLS, tuple[tuple[int, int], ...], bool]


def _key(t: UpstreamTLS, h2: bool = False) -> _Key:
    stamps = []
    for f in (t.ca, t.client_cert, t.client_key):
        if f is not None:
            try:
                st = os.stat(f)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((-1, -1))
    return t, tuple(stamps), h2


class UpstreamContexts:
    """Contexts by spec; `refresh` keeps those the new table still uses and builds the missing ones."""

    def __init__(self) -> None:
        self._built: dict[_Key, ssl.SSLContext | None] = {}

    def __repr__(self) -> str:
        return f"<UpstreamContexts [{len(self._built)} specs]>"

    def refresh(self, versions: list[Version]) -> dict[str, ssl.SSLContext | None]:
        """Version name -> its context, for the versions with https:// endpoints."""
        old = self._built
        new: dict[_Key, ssl.SSLContext | None] = {}
        out: dict[str, ssl.SSLContext | None] = {}
        for v in versions:
            if not any(e.startswith("https:") for e in v.endpoints):
                continue
            key = _key(v.spec.tls or DEFAULTS, v.spec.protocol == "h2")
            if key in new:
                ctx = new[key]
            elif key in old:
                ctx = new[key] = old[key]
            else:
                ctx = new[key] = self._build(v.name, key[0], key[2])
            out[v.name] = ctx
        self._built = new
        return out

    @staticmethod
    def _build(version: str, t: UpstreamTLS, h2: bool) -> ssl.SSLContext | None:
        try:
            return build_context(t, h2)
        except TLSFileError as e:
            log.error("version %s: tls.%s: %s; its https endpoints get no connections", version, e.field, e.message)
            return None
