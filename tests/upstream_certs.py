"""Certificates for HTTPS-upstream tests, made with `cryptography`: a private CA, server certificates it signed
(127.0.0.1 + api.internal, and one for other.internal only), a second CA with a server certificate for the
same names (the "wrong CA"), and a client certificate for mTLS to the upstream. EC P-256 keys: fast."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Certs:
    ca: str  # the private CA the versions trust
    server: Pair  # 127.0.0.1 and api.internal, signed by ca
    other_name: Pair  # other.internal only, signed by ca
    wrong_ca: str
    wrong_server: Pair  # 127.0.0.1 and api.internal, signed by wrong_ca
    client: Pair  # CN turnout-proxy, clientAuth, signed by ca
    not_pem: str  # a file that is no certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, dns: list[str], ips: list[str],
          client: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(IPv4Address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def make_certs(d: Path) -> Certs:
    ca = _ca("turnout test CA")
    wrong = _ca("some other CA")

    def pair(name: str, made: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Pair:
        return Pair(_write_cert(d / f"{name}.pem", made[0]), _write_key(d / f"{name}-key.pem", made[1]))

    not_pem = d / "not-a-cert.pem"
    not_pem.write_text("this is no certificate\n")
    return Certs(
        ca=_write_cert(d / "ca.pem", ca[0]),
        server=pair("server", _leaf(ca, "api.internal", ["api.internal"], ["127.0.0.1"])),
        other_name=pair("other", _leaf(ca, "other.internal", ["other.internal"], [])),
        wrong_ca=_write_cert(d / "wrong-ca.pem", wrong[0]),
        wrong_server=pair("wrong-server", _leaf(wrong, "api.internal", ["api.internal"], ["127.0.0.1"])),
        client=pair("client", _leaf(ca, "turnout-proxy", [], [], client=True)),
        not_pem=str(not_pem),
    )
