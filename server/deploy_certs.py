"""Certificates and keys of a federation, in the formats Flower 1.41 reads.

Checked against Flower's source: ``flower-superlink --ssl-ca-certfile/--ssl-certfile/
--ssl-keyfile`` take PEM files; ``flower-supernode --auth-supernode-private-key`` is parsed
with ``cryptography``'s ``load_ssh_private_key`` and must be an EC key (OpenSSH private-key
format); ``flwr supernode register <public key>`` parses an OpenSSH public key on a NIST
curve. We use P-384, the curve Flower itself generates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
NO_USAGE = dict.fromkeys(
    (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ),
    False,
)


def san_entries(server_names: list[str]) -> list[x509.GeneralName]:
    """IP literals become IP SANs, everything else DNS SANs (TLS clients check the right one)."""
    if not server_names:
        raise ValueError("give at least one server host name or IP for the certificate")
    entries: list[x509.GeneralName] = []
    for name in server_names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint_of(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER bytes (what ``openssl x509 -fingerprint
    -sha256`` prints, without the colons)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def normal_fingerprint(text: str) -> str:
    hexdigits = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=")
    return "sha256:" + hexdigits.replace(":", "").replace(" ", "")


def same_key(a: object, b: object) -> bool:
    def der(key: object) -> bytes:
        return key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(a) == der(b)


def make_ca(days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-384, path length 0) valid ``days`` from ``now``."""
    key = ec.generate_private_key(CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedskin federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedskin federation CA"),
        ]
    )
    usage = {**NO_USAGE, "digital_signature": True, "key_cert_sign": True, "crl_sign": True}
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_names: list[str],
    days: int,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate for ``server_names``, issued by the CA."""
    key = ec.generate_private_key(CURVE())
    usage = {**NO_USAGE, "digital_signature": True, "key_agreement": True}
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san_entries(server_names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def site_key_pair(site: str) -> tuple[bytes, bytes]:
    """A fresh P-384 SuperNode key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedskin-{site}\n".encode()
