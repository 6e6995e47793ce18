"""Certificates for TLS tests, made on the spot with `cryptography`: a CA and its leaves, and a
second, unrelated CA for a rogue client.

The leaves look like the ones docs/security.md tells an operator to make: EC P-256, one name per
workload in the subject alternative names, usable both to serve and to call (serverAuth and
clientAuth), valid for a day. Files are written as PEM under a directory of the test's own.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=1)
# Names of the test servers: they listen on 127.0.0.1 and are dialled by IP or as `localhost`.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Leaf:
    """A certificate and its key, as files."""

    certificate_file: Path
    key_file: Path

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate_file.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key_file.read_bytes()


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate as a file, and its key in memory to sign leaves with."""

    name: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    certificate_file: Path

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate_file.read_bytes()

    def issue(
        self,
        directory: Path,
        file_stem: str,
        names: Sequence[str],
        *,
        not_valid_after: datetime.datetime | None = None,
    ) -> Leaf:
        """A leaf for `names` (DNS names or IP addresses), written as `<stem>.crt` and `<stem>.key`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alternative_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative_names.append(x509.DNSName(name))
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now, not_valid_after or now) - datetime.timedelta(minutes=5))
            .not_valid_after(not_valid_after or now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        leaf = Leaf(directory / f"{file_stem}.crt", directory / f"{file_stem}.key")
        leaf.certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        leaf.key_file.write_bytes(_key_pem(key))
        leaf.key_file.chmod(0o600)
        return leaf


def authority(directory: Path, name: str) -> Authority:
    """A new self-signed CA, its certificate written as `<name>.crt`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(name, certificate, key, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Pki:
    """Everything the TLS tests need: the deployment's CA and leaves, and a rogue CA's client."""

    directory: Path
    ca: Authority
    # Serves the credit service (and, in the process tests, booking too): loopback names.
    server: Leaf
    # The booking service's (or a test's) client certificate for mTLS.
    client: Leaf
    # Another CA, which the servers do not trust, and a client certificate it signed.
    rogue_ca: Authority
    rogue_client: Leaf


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = authority(directory, "test-ca")
    rogue_ca = authority(directory, "rogue-ca")
    return Pki(
        directory=directory,
        ca=ca,
        server=ca.issue(directory, "server", [*LOOPBACK_NAMES, "credit", "booking"]),
        client=ca.issue(directory, "client", ["booking"]),
        rogue_ca=rogue_ca,
        rogue_client=rogue_ca.issue(directory, "rogue-client", ["booking"]),
    )
