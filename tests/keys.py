"""Keys, certificates and tokens made fresh for identity tests (cryptography + PyJWT), written to files."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from proxy.identities import PeerCert

ISSUER = "https://id.example.test"
AUDIENCE = "turnout"


@dataclass
class Signer:
    alg: str
    kid: str
    key: Any  # private key

    def jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        d: dict[str, Any] = json.loads(algo.to_jwk(self.key.public_key()))
        d["kid"] = self.kid
        return d

    def token(self, sub: str = "acme", *, exp: float | None = 600, iss: str | None = ISSUER,
              aud: str | None = AUDIENCE, kid: str | None = "", **claims: Any) -> str:
        payload: dict[str, Any] = {"sub": sub, **claims}
        if exp is not None:
            payload["exp"] = int(time.time() + exp)
        if iss is not None:
            payload["iss"] = iss
        if aud is not None:
            payload["aud"] = aud
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(payload, self.key, algorithm=self.alg, headers=headers)


def rsa_signer(kid: str = "rsa-1") -> Signer:
    return Signer("RS256", kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_signer(kid: str = "ec-1") -> Signer:
    return Signer("ES256", kid, ec.generate_private_key(ec.SECP256R1()))


def ed_signer(kid: str = "ed-1") -> Signer:
    return Signer("EdDSA", kid, ed25519.Ed25519PrivateKey.generate())


def write_jwks(path: Path, *signers: Signer) -> Path:
    path.write_text(json.dumps({"keys": [s.jwk() for s in signers]}))
    return path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(sub: str = "acme", kid: str = "rsa-1") -> str:
    """alg: none, as an attacker would send it."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}).encode())
    return f"{header}.{body}."


def api_key_line(client: str, key: str) -> str:
    return f"{client} {hashlib.sha256(key.encode()).hexdigest()}\n"


# -- certificates

@dataclass
class Issued:
    cert: x509.Certificate
    key: Any
    cert_file: Path
    key_file: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(dirpath: Path, stem: str, cert: x509.Certificate, key: Any) -> Issued:
    cf = dirpath / f"{stem}.pem"
    kf = dirpath / f"{stem}-key.pem"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return Issued(cert, key, cf, kf)


def make_ca(dirpath: Path, cn: str = "turnout test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(dirpath, "ca", cert, key)


def issue(ca: Issued, dirpath: Path, stem: str, cn: str, dns: tuple[str, ...] = (), uris: tuple[str, ...] = (),
          client: bool = True) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(dirpath, stem, b.sign(ca.key, hashes.SHA256()), key)


async def handshake(pki: dict[str, Issued], client: str | None, verify: bool = True) -> PeerCert:
    """One real TLS handshake against a local server asking for a client certificate; the PeerCert its side
    of the connection shows (what the data plane's TLS listener hands to identity)."""
    seen: asyncio.Future[PeerCert] = asyncio.get_running_loop().create_future()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server"].cert_file, pki["server"].key_file)
    server_ctx.load_verify_locations(pki["ca"].cert_file)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL if verify else ssl.CERT_NONE

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        seen.set_result(PeerCert(obj.getpeercert() or {}, obj.getpeercert(binary_form=True) or b""))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    ctx = ssl.create_default_context(cafile=pki["ca"].cert_file)
    if client is not None:
        ctx.load_cert_chain(pki[client].cert_file, pki[client].key_file)
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        peer = await asyncio.wait_for(seen, 5)
        w.close()
    finally:
        server.close()
        await server.wait_closed()
    return peer
