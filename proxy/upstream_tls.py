"""A version's `tls:` block for https:// upstreams: parsing it (field-path errors) and the SSLContext it means.

Design rule: verification is on unless the file says both `verify: false` and `insecure_skip_verify: true`,
so no typo or half-edited block ever yields an unverified connection. The context is built from the spec
alone (stdlib `ssl`, no event loop): the data plane caches one per spec, and parsing builds one to refuse
unreadable files and keys that do not match their certificate before a version is registered.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import Any

from proxy.errors import FieldError
from proxy.model import UpstreamTLS

TLS_FIELDS = frozenset({"ca", "server_name", "verify", "insecure_skip_verify", "client_cert", "client_key"})
SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


class TLSFileError(Exception):
    """A file of the block cannot be used; `field` names the key that gave it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def parse_tls(value: object, path: str, *, stored: bool = False) -> tuple[UpstreamTLS | None, list[FieldError]]:
    """The block at `path` -> (spec, errors). Stored revisions were accepted once: their files are not
    checked again (a rollback must load; a file missing now fails that version's connections instead)."""
    errors: list[FieldError] = []
    if not isinstance(value, dict):
        return None, [FieldError(path, f"expected a mapping like {{ca: ca.pem, server_name: api.internal}}, "
                                       f"got {type(value).__name__}")]
    for k in value:
        if k not in TLS_FIELDS:
            errors.append(FieldError(f"{path}.{k}",
                                     f"unknown field (expected one of: {', '.join(sorted(TLS_FIELDS))})"))
    files: dict[str, str | None] = {}
    for k in ("ca", "client_cert", "client_key"):
        v = value.get(k)
        if v is not None and (not isinstance(v, str) or not v):
            errors.append(FieldError(f"{path}.{k}", f"expected a file path, got {type(v).__name__}"))
            v = None
        files[k] = v
    name = value.get("server_name")
    if name is not None and (not isinstance(name, str) or not SERVER_NAME_RE.fullmatch(name)):
        errors.append(FieldError(f"{path}.server_name", f"expected a host name, got {name!r}"))
        name = None
    verify, skip = value.get("verify", True), value.get("insecure_skip_verify", False)
    for k, v in (("verify", verify), ("insecure_skip_verify", skip)):
        if not isinstance(v, bool):
            errors.append(FieldError(f"{path}.{k}", f"expected true or false, got {type(v).__name__}"))
    if verify is False and skip is not True:
        errors.append(FieldError(f"{path}.verify", "false turns certificate verification off: also set "
                                                   "insecure_skip_verify: true to mean it"))
    if skip is True and verify is not False:
        errors.append(FieldError(f"{path}.insecure_skip_verify", "only goes with verify: false"))
    if verify is False and files["ca"] is not None:
        errors.append(FieldError(f"{path}.ca", "unused with verify: false (nothing is verified)"))
    if (files["client_cert"] is None) != (files["client_key"] is None):
        missing = "client_key" if files["client_key"] is None else "client_cert"
        errors.append(FieldError(f"{path}.{missing}", "client_cert and client_key go together"))
    if not stored:
        for k, f in files.items():
            if f is not None and not os.path.isfile(f):
                errors.append(FieldError(f"{path}.{k}", f"file not found: {f}"))
    if errors:
        return None, errors
    spec = UpstreamTLS(ca=files["ca"], server_name=name, verify=verify is not False,
                       client_cert=files["client_cert"], client_key=files["client_key"])
    if not stored:
        try:
            build_context(spec)
        except TLSFileError as e:
            return None, [FieldError(f"{path}.{e.field}", e.message)]
    return spec, []


def tls_to_dict(t: UpstreamTLS) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if t.ca is not None:
        d["ca"] = t.ca
    if t.server_name is not None:
        d["server_name"] = t.server_name
    if not t.verify:
        d["verify"] = False
        d["insecure_skip_verify"] = True
    if t.client_cert is not None:
        d["client_cert"] = t.client_cert
        d["client_key"] = t.client_key
    return d


def build_context(t: UpstreamTLS, h2: bool = False) -> ssl.SSLContext:
    """The client context for `t`: TLS 1.2+, the CA file (or the system's store), host name checks, and the
    client certificate when given. Raises TLSFileError naming the field whose file is unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if t.verify:
        if t.ca is not None:
            try:
                ctx.load_verify_locations(cafile=t.ca)
            except (OSError, ssl.SSLError) as e:
                raise TLSFileError("ca", f"cannot load CA certificates from {t.ca}: {_reason(e)}") from e
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if t.client_cert is not None:
        try:
            ctx.load_cert_chain(t.client_cert, t.client_key)
        except (OSError, ssl.SSLError) as e:
            raise TLSFileError("client_key", f"cannot load {t.client_cert} with key {t.client_key} (both PEM, "
                               f"the key matching the certificate, unencrypted): {_reason(e)}") from e
    # What the data plane speaks to the version (its `protocol`): only that is offered, so an upstream that
    # cannot speak it fails the handshake's ALPN check instead of answering in another protocol.
    ctx.set_alpn_protocols(["h2"] if h2 else ["http/1.1"])
    return ctx


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e)
