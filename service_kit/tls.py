"""TLS for the gRPC ports and for the booking service's channel to credit, from PEM files.

Server side (`ServerTls`, `<PREFIX>_TLS_*`): a certificate chain and its key make the port TLS;
a client CA on top makes it mutual TLS, where a client without a certificate signed by that CA
is refused in the handshake, before any RPC. Client side (`ClientTls`, `<PREFIX>_TLS_*` with the
prefix of the client, e.g. `BOOKING_CREDIT`): the roots that verify the server, and a certificate
and key to present to a server that asks for one. docs/security.md has the variables and how to
make certificates.

Everything is read and checked once, at start: a missing or unreadable file, a file that is not
PEM, a key that does not belong to its certificate, an expired certificate are configuration
errors that name the variable, not a handshake failure at the first call. The key bytes are
never part of a repr or a log line.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from service_kit.config import ConfigError

# A PEM file larger than this is not a certificate chain or a key: refuse it unread.
MAX_PEM_FILE_BYTES = 1024 * 1024


class Transport(enum.StrEnum):
    """What a port or a channel speaks; logged at start."""

    PLAINTEXT = "plaintext"
    TLS = "tls"  # the server proves who it is
    MTLS = "mtls"  # both sides do


@dataclass(frozen=True)
class CertificateSummary:
    """What may be logged about a certificate: never the key, never the PEM itself."""

    subject: str
    names: tuple[str, ...]  # subject alternative names
    not_valid_after: datetime.datetime

    def log_fields(self, prefix: str = "certificate") -> dict[str, Any]:
        return {
            f"{prefix}_subject": self.subject,
            f"{prefix}_names": list(self.names),
            f"{prefix}_not_valid_after": self.not_valid_after.isoformat(),
        }


@dataclass(frozen=True)
class ServerTls:
    certificate_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)
    # Set: clients must present a certificate signed by one of these (mutual TLS).
    client_ca_pem: bytes | None
    certificate: CertificateSummary

    @property
    def transport(self) -> Transport:
        return Transport.MTLS if self.client_ca_pem is not None else Transport.TLS

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key_pem, self.certificate_chain_pem)],
            root_certificates=self.client_ca_pem,
            require_client_auth=self.client_ca_pem is not None,
        )

    @classmethod
    def from_environment(cls, env: Mapping[str, str], prefix: str) -> ServerTls | None:
        """`<PREFIX>_TLS_CERT_FILE` and `_KEY_FILE` (both or neither), `_CLIENT_CA_FILE` (only
        with them); None when none is set: the port stays plaintext."""
        cert_name, key_name, ca_name = (f"{prefix}_TLS_{part}" for part in ("CERT_FILE", "KEY_FILE", "CLIENT_CA_FILE"))
        if not env.get(cert_name) and not env.get(key_name):
            if env.get(ca_name):
                raise ConfigError(f"{ca_name} needs {cert_name} and {key_name} (the server's own certificate and key)")
            return None
        chain_pem, chain = _certificates(env, cert_name, required_with=key_name)
        key_pem = _private_key(env, key_name, required_with=cert_name, certificate=chain[0], certificate_name=cert_name)
        client_ca_pem = _certificates(env, ca_name)[0] if env.get(ca_name) else None
        return cls(chain_pem, key_pem, client_ca_pem, _summary(chain[0]))


@dataclass(frozen=True)
class ClientTls:
    root_certificates_pem: bytes
    # Both or neither: the certificate this client presents to a server that asks (mutual TLS).
    certificate_chain_pem: bytes | None
    private_key_pem: bytes | None = field(repr=False)
    # Checked in the server's certificate instead of the target's host name.
    server_name: str | None
    certificate: CertificateSummary | None

    @property
    def transport(self) -> Transport:
        return Transport.MTLS if self.certificate_chain_pem is not None else Transport.TLS

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates_pem,
            private_key=self.private_key_pem,
            certificate_chain=self.certificate_chain_pem,
        )

    @classmethod
    def from_environment(cls, env: Mapping[str, str], prefix: str) -> ClientTls | None:
        """`<PREFIX>_TLS_CA_FILE` (turns TLS on), `_CERT_FILE` and `_KEY_FILE` (both or neither,
        only with the CA), `_SERVER_NAME`; None when none is set: the channel is plaintext."""
        ca_name, cert_name, key_name, server_name_name = (
            f"{prefix}_TLS_{part}" for part in ("CA_FILE", "CERT_FILE", "KEY_FILE", "SERVER_NAME")
        )
        if not env.get(ca_name):
            others = [name for name in (cert_name, key_name, server_name_name) if env.get(name)]
            if others:
                raise ConfigError(
                    f"{others[0]} needs {ca_name} (the CA that verifies the server's certificate): "
                    "without it the channel is plaintext"
                )
            return None
        roots_pem = _certificates(env, ca_name)[0]
        chain_pem: bytes | None = None
        key_pem: bytes | None = None
        summary: CertificateSummary | None = None
        if env.get(cert_name) or env.get(key_name):
            chain_pem, chain = _certificates(env, cert_name, required_with=key_name)
            key_pem = _private_key(
                env, key_name, required_with=cert_name, certificate=chain[0], certificate_name=cert_name
            )
            summary = _summary(chain[0])
        server_name = (env.get(server_name_name) or "").strip() or None
        if server_name is not None and (any(c.isspace() for c in server_name) or "/" in server_name):
            raise ConfigError(f"{server_name_name} must be a host name, got {server_name!r}")
        return cls(roots_pem, chain_pem, key_pem, server_name, summary)


def channel_transport(tls: ClientTls | None) -> Transport:
    return Transport.PLAINTEXT if tls is None else tls.transport


def aio_channel(
    target: str,
    tls: ClientTls | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to `target`: plaintext without `tls`, else TLS (mutual when it has a certificate)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    all_options = list(options)
    if tls.server_name is not None:
        # The name checked in the server's certificate (and sent as SNI), for targets whose host
        # is not that name: an IP address, a list of addresses, a tunnel.
        all_options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=all_options, interceptors=interceptors)


# --- reading and checking the files --------------------------------------------------------------


def _read(env: Mapping[str, str], name: str, *, required_with: str | None = None) -> tuple[Path, bytes]:
    raw = (env.get(name) or "").strip()
    if not raw:
        raise ConfigError(f"{name} is required with {required_with}" if required_with else f"{name} is blank")
    path = Path(raw)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PEM_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_PEM_FILE_BYTES:
        raise ConfigError(f"{name}: {path} is larger than {MAX_PEM_FILE_BYTES} bytes: not a PEM certificate or key")
    return path, data


def _certificates(
    env: Mapping[str, str], name: str, *, required_with: str | None = None
) -> tuple[bytes, list[x509.Certificate]]:
    """The file's PEM bytes and the certificates in it (at least one)."""
    path, data = _read(env, name, required_with=required_with)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{name}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    expired = [c for c in certificates if c.not_valid_after_utc <= datetime.datetime.now(datetime.UTC)]
    if expired:
        raise ConfigError(
            f"{name}: the certificate {expired[0].subject.rfc4514_string()!r} in {path} "
            f"expired at {expired[0].not_valid_after_utc.isoformat()}"
        )
    return data, certificates


def _private_key(
    env: Mapping[str, str],
    name: str,
    *,
    required_with: str,
    certificate: x509.Certificate,
    certificate_name: str,
) -> bytes:
    path, data = _read(env, name, required_with=required_with)
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{name}: {path} is encrypted; give the key unencrypted (protect the file instead: a Secret, mode 0400)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{name}: {path} is not a PEM private key") from None
    if _public_der(key.public_key()) != _public_der(certificate.public_key()):
        raise ConfigError(f"{name}: the key in {path} does not belong to the first certificate of {certificate_name}")
    return data


def _public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _summary(certificate: x509.Certificate) -> CertificateSummary:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = extension.value.get_values_for_type(x509.DNSName)
        addresses = [str(address) for address in extension.value.get_values_for_type(x509.IPAddress)]
        names = (*dns_names, *addresses)
    except x509.ExtensionNotFound:
        names = ()
    return CertificateSummary(certificate.subject.rfc4514_string(), names, certificate.not_valid_after_utc)
