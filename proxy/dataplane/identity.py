"""Verified client identity on the request path: client certificates, JWTs and API keys, in route order.

Design rules:
- Only routes with a verified source come here (CompiledRoute.verifying); every other route keeps the one
  `route.client_id` call it always had.
- The first source that yields an id wins. A credential that is present but fails (bad signature, expired,
  wrong issuer or audience, unknown key id, an algorithm not allowed, `none` included; an API key not in
  the table) ends the walk: the request is anonymous, it never falls through to an unverified source, and
  the failure is counted (turnout_identity_rejected_total{route,source,reason}).
- Key files are read when first needed, then stat()ed at most every KEY_CHECK_INTERVAL seconds and re-read
  when their mtime, inode or size changed; a file that fails to load leaves the last good keys serving.
- A token's verdict is cached until its expiry (at most TOKEN_TTL; a refusal REFUSAL_TTL), in a bounded LRU,
  and forgotten when its source's keys change. Signatures are PyJWT's (with `cryptography`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl

import jwt

from proxy.identities import KeyFileError, PeerCert, cert_id, key_path, load_source_keys, valid_id
from proxy.table import cookie_value

if TYPE_CHECKING:
    from proxy.model import IdentitySource
    from proxy.table import CompiledRoute
    from proxy.telemetry.stats import IdentityRejectReason, Stats

log = logging.getLogger("turnout.identity")

KEY_CHECK_INTERVAL: Final = 2.0
TOKEN_CACHE: Final = 4096
TOKEN_TTL: Final = 300.0  # a token without `exp` is verified again after this long
REFUSAL_TTL: Final = 30.0  # a refused token is checked again after this long (nbf, a key that appears)

_UNVERIFIED: Final = ("", None)


class KeyFile:
    """The parsed contents of one source's key file, re-read when the file changes."""

    __slots__ = ("checked", "generation", "source", "stamp", "value")

    def __init__(self, source: IdentitySource) -> None:
        self.source = source
        self.value: object = None
        self.stamp: tuple[int, int, int] | None = None
        self.checked = -KEY_CHECK_INTERVAL
        self.generation = 0

    def get(self, now: float) -> object:
        if now - self.checked >= KEY_CHECK_INTERVAL:
            self.refresh(now)
        return self.value

    def refresh(self, now: float) -> None:
        self.checked = now
        path = key_path(self.source)
        try:
            st = os.stat(path)
        except OSError as e:
            if self.stamp is not None or self.value is None:
                log.warning("identity keys %s: %s; %s", path, e.strerror or e,
                            "keeping the keys read before" if self.value is not None else "no keys")
            self.stamp = None
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            value = load_source_keys(self.source)
        except (OSError, KeyFileError) as e:
            log.warning("identity keys %s refused: %s; %s", path, e,
                        "keeping the keys read before" if self.value is not None else "no keys")
            return
        self.value = value
        self.generation += 1


class Source:
    """One identity source of a route, ready for the request path."""

    __slots__ = ("algorithms", "audience", "claim", "cookie", "issuer", "keys", "kind", "name", "secret")

    def __init__(self, s: IdentitySource, keys: KeyFile | None) -> None:
        self.kind = s.kind
        self.name = s.name
        self.keys = keys
        j = s.jwt
        self.cookie = j.cookie if j is not None else None
        self.claim: tuple[str, ...] = j.claim if j is not None else ()
        self.algorithms: tuple[str, ...] = j.algorithms if j is not None else ()
        self.issuer = j.issuer if j is not None else None
        self.audience = j.audience if j is not None else None
        self.secret = j is not None and j.secret is not None


class Identity:
    """Per process: key files, each route's sources, and the token verdict cache."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        # One Source per distinct configuration, kept for the process's life: a table swap (every pin change)
        # finds its sources, key files and cached verdicts again, and the id() in a verdict's key is never
        # reused by a source with another issuer, audience or key file.
        self.sources: dict[IdentitySource, Source] = {}
        self.chains: dict[str, tuple[CompiledRoute, list[Source]]] = {}
        # (id(Source), token) -> (client id or None, reason, valid until (wall clock), keys generation)
        self.tokens: OrderedDict[tuple[int, str], tuple[str | None, str, float, int]] = OrderedDict()

    def chain(self, route: CompiledRoute) -> list[Source]:
        entry = self.chains.get(route.name)
        if entry is not None and entry[0] is route:
            return entry[1]
        out = []
        for s in route.sources:
            src = self.sources.get(s)
            if src is None:
                kf = KeyFile(s) if s.kind == "jwt" or s.kind == "api_key" else None
                src = self.sources[s] = Source(s, kf)
            out.append(src)
        self.chains[route.name] = (route, out)
        return out

    def resolve(self, route: CompiledRoute, hdrs: Mapping[str, str], query: str | None,
                peer: PeerCert | None, now: float) -> tuple[str, str | None]:
        """(source kind, client id): ("", id) for an id from an unverified source, ("", None) for none."""
        for src in self.chain(route):
            kind = src.kind
            if kind == "client_cert":
                if peer is None or not peer.cert:
                    continue
                cid = cert_id(src.name, peer)
                if cid is None:
                    return self._reject(route, kind, "missing_field")
                return kind, cid
            if kind == "jwt":
                token = _bearer(hdrs.get(src.name)) if src.cookie is None else \
                    cookie_value(hdrs.get("cookie"), src.cookie)
                if token is None:
                    continue
                cid, reason = self._verify_jwt(src, token, now)
                if cid is None:
                    return self._reject(route, kind, cast("IdentityRejectReason", reason))
                return kind, cid
            if kind == "api_key":
                key = hdrs.get(src.name)
                if not key:
                    continue
                assert src.keys is not None
                table = cast("dict[str, str] | None", src.keys.get(now))
                if table is None:
                    return self._reject(route, kind, "keys_unavailable")
                # Only digests are stored: the key itself is never kept, compared or logged.
                cid = table.get(hashlib.sha256(key.encode("latin-1")).hexdigest())
                if cid is None:
                    return self._reject(route, kind, "unknown_key")
                return kind, cid
            v: str | None = None
            if kind == "header":
                v = hdrs.get(src.name)
            elif kind == "cookie":
                v = cookie_value(hdrs.get("cookie"), src.name)
            elif query:
                for k, qv in parse_qsl(query, keep_blank_values=False):
                    if k == src.name and qv:
                        v = qv
                        break
            if v:
                return "", v
        return _UNVERIFIED

    def _reject(self, route: CompiledRoute, kind: str, reason: IdentityRejectReason) -> tuple[str, str | None]:
        self.stats.identity_rejected(route.name, kind, reason)
        return _UNVERIFIED

    def _verify_jwt(self, src: Source, token: str, now: float) -> tuple[str | None, str]:
        assert src.keys is not None
        keys = src.keys.get(now)
        generation = src.keys.generation
        wall = time.time()
        ck = (id(src), token)
        cache = self.tokens
        hit = cache.get(ck)
        if hit is not None and hit[2] > wall and hit[3] == generation:
            cache.move_to_end(ck)
            return hit[0], hit[1]
        cid, reason, exp = self._check_jwt(src, token, keys, wall)
        until = min(exp, wall + TOKEN_TTL) if cid is not None else wall + REFUSAL_TTL
        cache[ck] = (cid, reason, until, generation)
        if len(cache) > TOKEN_CACHE:
            cache.popitem(last=False)
        return cid, reason

    def _check_jwt(self, src: Source, token: str, keys: object, wall: float) -> tuple[str | None, str, float]:
        if keys is None:
            return None, "keys_unavailable", 0.0
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None, "malformed", 0.0
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in src.algorithms:
            return None, "algorithm", 0.0
        key: Any
        if src.secret:
            key = keys
        else:
            jwks = cast("dict[str, jwt.PyJWK]", keys)
            kid = header.get("kid", "")
            jwk = jwks.get(kid) if isinstance(kid, str) else None
            if jwk is None and kid == "" and len(jwks) == 1:
                jwk = next(iter(jwks.values()))
            if jwk is None:
                return None, "unknown_kid", 0.0
            key = jwk.key
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=src.audience, issuer=src.issuer,
                                options={"verify_aud": src.audience is not None})
        except jwt.ExpiredSignatureError:
            return None, "expired", 0.0
        except jwt.ImmatureSignatureError:
            return None, "not_yet_valid", 0.0
        except jwt.InvalidAudienceError:
            return None, "audience", 0.0
        except jwt.InvalidIssuerError:
            return None, "issuer", 0.0
        except jwt.MissingRequiredClaimError:
            return None, "missing_claim", 0.0
        except jwt.InvalidSignatureError:
            return None, "signature", 0.0
        except jwt.InvalidAlgorithmError:
            return None, "algorithm", 0.0
        except (jwt.InvalidTokenError, ValueError, TypeError):
            return None, "malformed", 0.0
        value: object = claims
        for part in src.claim:
            value = value.get(part) if isinstance(value, dict) else None
        cid = valid_id(value)
        if cid is None:
            return None, "bad_claim", 0.0
        exp = claims.get("exp")
        return cid, "", float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else wall + TOKEN_TTL


def _bearer(value: str | None) -> str | None:
    """The token of "Bearer <token>"; another scheme (Basic ...) carries none. "Bearer" alone is an empty
    token, which fails as malformed."""
    if value is None or len(value) < 6 or value[:6].lower() != "bearer":
        return None
    if len(value) > 6 and value[6] != " ":
        return None
    return value[7:].strip()


def identity_lines(source: str, client_id: str) -> bytes:
    """The lines telling the upstream who was verified (client-sent copies never pass: headers.OURS)."""
    return (b"X-Turnout-Client: " + client_id.encode() + b"\r\nX-Turnout-Identity-Source: " + source.encode()
            + b"\r\n")
