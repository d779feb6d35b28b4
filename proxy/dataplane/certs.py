"""TLS listeners' certificates: files -> one SSLContext per certificate, picked by SNI, reloaded on change.

Design rules:
- A listener's handshakes start on the context of its first certificate (the default); its sni_callback
  switches to the context of the certificate whose names match the client's server name. Every context of
  a listener is configured alike (TLS 1.2+, no compression, ALPN, client CA), so the switch changes only
  the certificate.
- Reload: `check()` compares each pair's files (inode, mtime, size) with the loaded ones; a changed pair is
  loaded into a new context, and only a pair that loads replaces the old one (a broken one is reported
  once and the old one keeps serving). Open connections keep the context they were accepted with.
- Every error names its field path (`listeners[0].tls.certificates[1].key: file not found`).
No asyncio here: `turnout check --config` loads the same pairs; proxy.dataplane.tls runs the handshakes.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.errors import FieldError, ValidationError
from proxy.settings import Certificate, Listener, Settings, TlsConfig, listeners_of

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
Signature = tuple[tuple[int, int, int], tuple[int, int, int]]  # (inode, mtime_ns, size) of cert and key


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _why(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    return e.strerror or str(e)


def cert_names(pem: bytes) -> tuple[str, ...]:
    """The DNS names a certificate is for (subjectAltName, else the subject's CN), lower-case."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


class Pair:
    """One loaded certificate: its names, its context and the files' signature it was loaded from."""

    def __init__(self, names: tuple[str, ...], context: ssl.SSLContext, signature: Signature,
                 not_after: datetime.datetime) -> None:
        self.names = names
        self.context = context
        self.signature = signature
        self.not_after = not_after


def load_pair(tls: TlsConfig, protocols: tuple[str, ...], cert: Certificate, path: str,
              sni: Callable[[Any, str | None, ssl.SSLContext], None] | None = None) -> Pair:
    """Load one certificate/key pair into a new context, or ValidationError naming `path`.cert / .key."""
    try:
        signature = (_stat(cert.cert), (0, 0, 0))
        with open(cert.cert, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValidationError([FieldError(f"{path}.cert", _why(e))]) from e
    try:
        signature = (signature[0], _stat(cert.key))
        with open(cert.key, "rb"):
            pass
    except OSError as e:
        raise ValidationError([FieldError(f"{path}.key", _why(e))]) from e
    try:
        names = cert_names(pem)
        not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    except ValueError as e:
        raise ValidationError([FieldError(f"{path}.cert", f"not a PEM certificate ({e})")]) from e
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert.cert, cert.key)
    except (ssl.SSLError, OSError) as e:
        raise ValidationError([FieldError(f"{path}.key", f"not the private key of {cert.cert} ({e})")]) from e
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(list(protocols))
    if sni is not None:
        ctx.sni_callback = sni
    return Pair(names, ctx, signature, not_after)


def _load_ca(ctx: ssl.SSLContext, tls: TlsConfig, path: str) -> None:
    if tls.client_ca is None:
        return
    try:
        ctx.load_verify_locations(cafile=tls.client_ca)
    except FileNotFoundError as e:
        raise ValidationError([FieldError(f"{path}.client_ca", "file not found")]) from e
    except (ssl.SSLError, OSError) as e:
        raise ValidationError([FieldError(f"{path}.client_ca", f"not a PEM CA file ({e})")]) from e


def _matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    # A wildcard covers exactly one label, as certificate checks do.
    return pattern.startswith("*.") and host.partition(".")[2] == pattern[2:] and "." in host


class ListenerTls:
    """The certificates of one TLS listener, the SNI choice among them and their reload."""

    def __init__(self, listener: Listener, index: int) -> None:
        assert listener.tls is not None
        self.listener = listener
        self.name = listener.name
        self.tls: TlsConfig = listener.tls
        self.path = f"listeners[{index}].tls"
        self.pairs: list[Pair] = []
        self.refused: dict[int, Signature] = {}  # pairs whose changed files did not load (reported once)
        self._hosts: dict[str, int] = {}  # host -> index of the certificate for it (-1: none)
        errors: list[FieldError] = []
        for i, cert in enumerate(self.tls.certificates):
            try:
                self.pairs.append(self._load(i, cert))
            except ValidationError as e:
                errors.extend(e.errors)
        if errors:
            raise ValidationError(errors)

    def expired(self, now: datetime.datetime) -> list[str]:
        """One line per certificate past its end date: served anyway (clients decide), but said at start."""
        return [f"listener {self.name}: certificate {c.cert} expired on {p.not_after:%Y-%m-%d %H:%M} UTC"
                for c, p in zip(self.tls.certificates, self.pairs, strict=True) if p.not_after < now]

    def _load(self, i: int, cert: Certificate) -> Pair:
        pair = load_pair(self.tls, self.listener.protocols, cert, f"{self.path}.certificates[{i}]", self._sni)
        _load_ca(pair.context, self.tls, self.path)
        return pair

    @property
    def context(self) -> ssl.SSLContext:
        """The context handshakes start on (the default certificate's)."""
        return self.pairs[0].context

    def pick(self, server_name: str | None) -> int:
        """Index of the certificate served for an SNI name (the default, 0, when none matches)."""
        if server_name is None:
            return 0
        i = self.cert_of_host(server_name)
        return i if i >= 0 else 0

    def cert_of_host(self, host: str) -> int:
        """Index of the certificate whose names cover `host`, -1 when none does (cached, bounded)."""
        i = self._hosts.get(host)
        if i is None:
            i = -1
            for n, pair in enumerate(self.pairs):
                if any(p == host for p in pair.names):
                    i = n
                    break
            if i < 0:
                for n, pair in enumerate(self.pairs):
                    if any(_matches(p, host) for p in pair.names):
                        i = n
                        break
            if len(self._hosts) > 1000:  # Host values are client-controlled
                self._hosts.clear()
            self._hosts[host] = i
        return i

    def session(self, transport: Any) -> TlsSession:
        return session_of(self, transport)

    def _sni(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        i = self.pick(server_name.lower() if server_name else None)
        if i:
            sslobj.context = self.pairs[i].context
        # Read back by proxy.dataplane.tls once the handshake completed (the server side has no API for it).
        sslobj.turnout_cert = i

    def check(self) -> list[str]:
        """Reload every pair whose files changed; -> one log line per pair reloaded or refused."""
        lines: list[str] = []
        for i, cert in enumerate(self.tls.certificates):
            try:
                now = (_stat(cert.cert), _stat(cert.key))
            except OSError:
                now = ((0, 0, 0), (0, 0, 0))
            old = self.pairs[i]
            if now == old.signature or self.refused.get(i) == now:
                continue
            try:
                new = self._load(i, cert)
            except ValidationError as e:
                self.refused[i] = now
                lines.append(f"listener {self.name}: new certificate refused, the old one keeps serving: {e}")
                continue
            self.refused.pop(i, None)
            self.pairs[i] = new
            self._hosts = {}
            lines.append(f"listener {self.name}: certificate {cert.cert} reloaded ({', '.join(new.names)})")
        return lines


def load_listeners(settings: Settings) -> list[ListenerTls | None]:
    """The TLS state of each listener (None for a cleartext one), or ValidationError with every error."""
    out: list[ListenerTls | None] = []
    errors: list[FieldError] = []
    for i, listener in enumerate(listeners_of(settings)):
        if listener.tls is None:
            out.append(None)
            continue
        try:
            out.append(ListenerTls(listener, i))
        except ValidationError as e:
            errors.extend(e.errors)
    if errors:
        raise ValidationError(errors)
    return out


def session_of(listener: ListenerTls, transport: Any) -> TlsSession:
    """The TlsSession of a connection whose handshake on `listener` just completed."""
    sslobj = transport.get_extra_info("ssl_object")
    served = getattr(sslobj, "turnout_cert", 0)
    peer = sslobj.getpeercert() if sslobj is not None else None
    der = sslobj.getpeercert(binary_form=True) if peer else None
    return TlsSession(listener, served, peer or None, der)


class TlsSession:
    """What a client connection knows of its handshake: the certificate it was served, and its peer's (verified
    against the listener's client_ca: ssl's getpeercert() dict, and DER for fingerprints)."""

    def __init__(self, listener: ListenerTls, served: int, peer_cert: dict[str, Any] | None,
                 peer_der: bytes | None = None) -> None:
        self.listener = listener
        self.served = served
        self.peer_cert = peer_cert
        self.peer_der = peer_der

    def misdirected(self, host: str) -> bool:
        """Host names another certificate's domain than the one SNI chose: 421, so a client cannot reach a
        route by a Host its certificate check never saw."""
        i = self.listener.cert_of_host(host)
        return i >= 0 and i != self.served
