"""Verified identity sources: their route syntax, their key files' formats, and a client certificate's id.

Design rule: pure functions over plain data. The route syntax (`client_cert`, `jwt`, `api_key` next to the
unverified `header`/`cookie`/`query`) becomes model.IdentitySource values, every error with its field path;
key files are parsed from their bytes (the data plane decides when to read them, and caches the result).
The one read here is `check_files`, when a route is written: a route naming a missing or broken key file is
refused then, while a stored revision always loads (its files are checked again when the data plane reads
them). Signatures are checked by PyJWT (with `cryptography`), never by code of ours.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from proxy.errors import FieldError
from proxy.model import ApiKeySource, CertField, IdentitySource, JwtSource

_TOKEN_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CLAIM_RE: Final = re.compile(r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
CERT_FIELDS: Final[tuple[CertField, ...]] = ("san_dns", "san_uri", "subject_cn", "fingerprint_sha256")
ASYMMETRIC: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
SYMMETRIC: Final = ("HS256", "HS384", "HS512")
# Defaults when `algorithms` is not given: the ones a JWKS file usually carries, or HS256 with a secret.
DEFAULT_ASYMMETRIC: Final = ("RS256", "ES256", "EdDSA")
_EC_CURVE: Final = {"ES256": "secp256r1", "ES384": "secp384r1"}
KINDS: Final = ("header", "cookie", "query", "client_cert", "jwt", "api_key")
JWT_FIELDS: Final = {"header", "cookie", "claim", "keys", "secret", "algorithms", "issuer", "audience"}
API_KEY_FIELDS: Final = {"header", "keys"}
MAX_ID: Final = 256


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says why (without the path: the caller names the field)."""


class PeerCert:
    """A client certificate the TLS layer verified: `cert` as ssl.SSLSocket.getpeercert() gives it (empty
    when it was not verified), `der` its DER bytes (getpeercert(binary_form=True))."""

    __slots__ = ("cert", "der")

    def __init__(self, cert: Mapping[str, Any], der: bytes) -> None:
        self.cert = cert
        self.der = der


def valid_id(value: object) -> str | None:
    """A verified value usable as client id (and as a header value): 1-256 printable characters."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    s = str(value)
    return s if 0 < len(s) <= MAX_ID and s.isprintable() else None


def cert_id(field: str, peer: PeerCert | None) -> str | None:
    """The id `field` gives for a verified certificate; None without one, or when it lacks the field (the
    first entry counts when there are several)."""
    if peer is None or not peer.cert:
        return None
    cert = peer.cert
    if field == "fingerprint_sha256":
        return hashlib.sha256(peer.der).hexdigest() if peer.der else None
    if field == "subject_cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return valid_id(value)
        return None
    want = "DNS" if field == "san_dns" else "URI"
    for key, value in cert.get("subjectAltName", ()):
        if key == want:
            return valid_id(value)
    return None


# -- key files ------------------------------------------------------------------------------------------

def _compatible(alg: str, key: object) -> bool:
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    if alg in _EC_CURVE:
        return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and \
            key.curve.name == _EC_CURVE[alg]
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def parse_jwks(data: bytes, algorithms: tuple[str, ...]) -> dict[str, jwt.PyJWK]:
    """A JWKS document -> its usable public keys by key id ("" for a key without one). Keys whose type
    no allowed algorithm can use are left out; a file with none left is refused."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyFileError(f"not a JWKS document (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError('not a JWKS document (expected {"keys": [...]})')
    out: dict[str, jwt.PyJWK] = {}
    for i, kd in enumerate(doc["keys"]):
        if not isinstance(kd, dict):
            raise KeyFileError(f"keys[{i}]: expected a JWK object")
        if "d" in kd or "k" in kd:
            raise KeyFileError(f"keys[{i}]: private or symmetric key material does not belong in a JWKS file")
        try:
            k = jwt.PyJWK(kd)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            raise KeyFileError(f"keys[{i}]: unusable key ({e})") from None
        if not any(_compatible(a, k.key) for a in algorithms):
            continue
        kid = kd.get("kid", "")
        if not isinstance(kid, str):
            raise KeyFileError(f"keys[{i}].kid: expected a string")
        if kid in out:
            raise KeyFileError(f"keys[{i}].kid: {kid!r} appears twice")
        out[kid] = k
    if not out:
        raise KeyFileError(f"no key usable with {', '.join(algorithms)}")
    return out


def parse_secret(data: bytes) -> bytes:
    secret = data.strip()
    if len(secret) < 32:
        raise KeyFileError("an HMAC secret needs at least 32 bytes")
    return secret


def parse_api_keys(data: bytes) -> dict[str, str]:
    """Lines "client-id sha256-hex-of-key" (blank lines and # comments allowed) -> {digest: client id}."""
    out: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise KeyFileError("not UTF-8 text") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _HEX64.fullmatch(parts[1].lower()) or valid_id(parts[0]) is None:
            raise KeyFileError(f'line {n}: expected "client-id sha256-hex-of-key"')
        digest = parts[1].lower()
        if digest in out:
            raise KeyFileError(f"line {n}: this key already belongs to {out[digest]!r}")
        out[digest] = parts[0]
    return out


def load_source_keys(source: IdentitySource) -> object:
    """Read and parse the key file a verified source names; raises OSError or KeyFileError."""
    if source.api_key is not None:
        with open(source.api_key.keys, "rb") as f:
            return parse_api_keys(f.read())
    j = source.jwt
    assert j is not None
    if j.secret is not None:
        with open(j.secret, "rb") as f:
            return parse_secret(f.read())
    assert j.keys is not None
    with open(j.keys, "rb") as f:
        return parse_jwks(f.read(), j.algorithms)


def key_path(source: IdentitySource) -> str:
    if source.api_key is not None:
        return source.api_key.keys
    assert source.jwt is not None
    return source.jwt.secret if source.jwt.secret is not None else source.jwt.keys or ""


# -- route syntax ---------------------------------------------------------------------------------------

def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


class _Fields:
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def mapping(self, value: object, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_kind(value)}")
            return None
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k not in allowed:
                self.fail(f"{path}.{k}", f"unknown field (expected one of: {', '.join(sorted(allowed))})")
            else:
                out[k] = v
        return out

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None, what: str) -> str | None:
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(path, f"expected {what}, got {value!r}" if isinstance(value, str) else
                      f"expected {what}, got {_kind(value)}")
            return None
        return value


def parse_identity(value: object, path: str, check_files: bool) -> tuple[list[IdentitySource], list[FieldError]]:
    """`routes[].identity` -> its sources; errors name their field (`identity[1].jwt.keys: file not found`)."""
    errors: list[FieldError] = []
    f = _Fields(errors)
    out: list[IdentitySource] = []
    if not isinstance(value, list):
        f.fail(path, f"expected a list like [{{header: X-Client-Id}}, {{cookie: client_id}}], got {_kind(value)}")
        return out, errors
    for i, src in enumerate(value):
        sp = f"{path}[{i}]"
        s = f.mapping(src, sp, set(KINDS))
        if s is None:
            continue
        if len(s) != 1:
            if len(s) > 1 or not errors:
                f.fail(sp, f"expected exactly one of {', '.join(KINDS)}")
            continue
        ((k, v),) = s.items()
        kp = f"{sp}.{k}"
        source: IdentitySource | None = None
        if k in ("header", "cookie", "query"):
            n = f.string(v, kp, _TOKEN_RE, "a header, cookie or parameter name")
            if n is not None:
                source = IdentitySource(k, n.lower() if k == "header" else n)  # type: ignore[arg-type]
        elif k == "client_cert":
            if v not in CERT_FIELDS:
                f.fail(kp, f"expected one of {', '.join(CERT_FIELDS)}, got {v!r}")
            else:
                source = IdentitySource("client_cert", v)
        elif k == "jwt":
            source = _parse_jwt(f, v, kp)
        else:
            source = _parse_api_key(f, v, kp)
        if source is None:
            continue
        if check_files and source.verified and source.kind != "client_cert":
            field = "keys" if source.api_key is not None or (source.jwt and source.jwt.secret is None) else "secret"
            try:
                load_source_keys(source)
            except FileNotFoundError:
                f.fail(f"{kp}.{field}", f"file not found: {key_path(source)}")
                continue
            except OSError as e:
                f.fail(f"{kp}.{field}", f"cannot read {key_path(source)}: {e.strerror or e}")
                continue
            except KeyFileError as e:
                f.fail(f"{kp}.{field}", f"{key_path(source)}: {e}")
                continue
        out.append(source)
    return out, errors


def _parse_jwt(f: _Fields, value: object, path: str) -> IdentitySource | None:
    before = len(f.errors)
    d = f.mapping(value, path, JWT_FIELDS)
    if d is None:
        return None
    header: str | None = None
    cookie: str | None = None
    if "header" in d and "cookie" in d:
        f.fail(path, "expected header or cookie, not both")
    elif "cookie" in d:
        cookie = f.string(d["cookie"], f"{path}.cookie", _TOKEN_RE, "a cookie name")
    else:
        header = f.string(d.get("header", "Authorization"), f"{path}.header", _TOKEN_RE, "a header name")
    claim = f.string(d.get("claim", "sub"), f"{path}.claim", _CLAIM_RE, "a claim name (dotted path: org.id)")
    keys = secret = None
    if ("keys" in d) == ("secret" in d):
        f.fail(path, "expected keys (a JWKS file) or secret (a file with an HMAC secret), exactly one")
    elif "keys" in d:
        keys = f.string(d["keys"], f"{path}.keys", None, "a file name")
    else:
        secret = f.string(d["secret"], f"{path}.secret", None, "a file name")
    allowed = SYMMETRIC if secret is not None else ASYMMETRIC
    algs: list[str] = []
    if "algorithms" in d:
        al = d["algorithms"]
        if not isinstance(al, list) or not al:
            f.fail(f"{path}.algorithms", f"expected a list of algorithm names, got {_kind(al)}")
        else:
            for i, a in enumerate(al):
                ap = f"{path}.algorithms[{i}]"
                if a == "none" or (a in SYMMETRIC + ASYMMETRIC and a not in allowed):
                    why = "unsigned tokens are never accepted" if a == "none" else \
                        ("needs secret, not keys" if a in SYMMETRIC else "needs keys (a JWKS file), not secret")
                    f.fail(ap, f"algorithm {a!r}: {why}")
                elif a not in allowed:
                    f.fail(ap, f"unknown algorithm {a!r} (expected one of: {', '.join(allowed)})")
                elif a not in algs:
                    algs.append(a)
    else:
        algs = list(("HS256",) if secret is not None else DEFAULT_ASYMMETRIC)
    issuer = audience = None
    if "issuer" in d:
        issuer = f.string(d["issuer"], f"{path}.issuer", None, "an issuer (the iss claim)")
    if "audience" in d:
        audience = f.string(d["audience"], f"{path}.audience", None, "an audience (the aud claim)")
    if len(f.errors) > before or claim is None:
        return None
    name = header.lower() if header is not None else "cookie"
    return IdentitySource("jwt", name, jwt=JwtSource(
        header=header.lower() if header is not None else None, cookie=cookie, claim=tuple(claim.split(".")),
        keys=keys, secret=secret, algorithms=tuple(algs), issuer=issuer, audience=audience))


def _parse_api_key(f: _Fields, value: object, path: str) -> IdentitySource | None:
    before = len(f.errors)
    d = f.mapping(value, path, API_KEY_FIELDS)
    if d is None:
        return None
    header = f.string(d.get("header", "X-Api-Key"), f"{path}.header", _TOKEN_RE, "a header name")
    keys = f.string(d.get("keys"), f"{path}.keys", None, 'a file of lines "client-id sha256-hex-of-key"')
    if len(f.errors) > before or header is None or keys is None:
        return None
    return IdentitySource("api_key", header.lower(), api_key=ApiKeySource(header.lower(), keys))


def source_to_dict(s: IdentitySource) -> dict[str, Any]:
    j = s.jwt
    if j is not None:
        d: dict[str, Any] = {"header": j.header} if j.header is not None else {"cookie": j.cookie}
        d["claim"] = ".".join(j.claim)
        d["keys" if j.keys is not None else "secret"] = j.keys if j.keys is not None else j.secret
        d["algorithms"] = list(j.algorithms)
        if j.issuer is not None:
            d["issuer"] = j.issuer
        if j.audience is not None:
            d["audience"] = j.audience
        return {"jwt": d}
    if s.api_key is not None:
        return {"api_key": {"header": s.api_key.header, "keys": s.api_key.keys}}
    return {s.kind: s.name}
