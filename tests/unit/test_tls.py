"""TLS settings: which variables turn what on, and a clear error naming the variable for every
way the files can be wrong. No server here (tests/integration/test_tls.py has the handshakes)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from booking_service.config import BookingSettings
from credit_service.config import CreditSettings
from service_kit.config import ConfigError
from service_kit.tls import ClientTls, ServerTls, Transport
from tests.support.auth import auth_environment
from tests.support.pki import Pki, make_pki

DATABASE = {"CREDIT_DATABASE_URL": "postgresql://user@db/credit", "BOOKING_DATABASE_URL": "postgresql://user@db/b"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def credit(env: Mapping[str, str]) -> CreditSettings:
    return CreditSettings.from_environment({**auth_environment(), **DATABASE, **env})


def booking(env: Mapping[str, str]) -> BookingSettings:
    return BookingSettings.from_environment({**auth_environment(), **DATABASE, **env})


def server_files(pki: Pki, prefix: str = "CREDIT", *, mutual: bool = True) -> dict[str, str]:
    env = {
        f"{prefix}_TLS_CERT_FILE": str(pki.server.certificate_file),
        f"{prefix}_TLS_KEY_FILE": str(pki.server.key_file),
    }
    if mutual:
        env[f"{prefix}_TLS_CLIENT_CA_FILE"] = str(pki.ca.certificate_file)
    return env


def client_files(pki: Pki) -> dict[str, str]:
    return {
        "BOOKING_CREDIT_TLS_CA_FILE": str(pki.ca.certificate_file),
        "BOOKING_CREDIT_TLS_CERT_FILE": str(pki.client.certificate_file),
        "BOOKING_CREDIT_TLS_KEY_FILE": str(pki.client.key_file),
    }


# --- what turns what on ----------------------------------------------------------------------------


def test_without_tls_variables_everything_stays_plaintext_and_no_health_port() -> None:
    settings = booking({})
    assert settings.server.tls is None
    assert settings.server.health_address is None
    assert settings.credit_tls is None
    assert credit({}).server.tls is None


def test_a_certificate_and_key_make_tls_and_a_client_ca_makes_it_mutual(pki: Pki) -> None:
    tls_only = credit(server_files(pki, mutual=False)).server
    assert tls_only.tls is not None
    assert tls_only.tls.transport is Transport.TLS
    assert tls_only.tls.client_ca_pem is None

    mutual = credit(server_files(pki)).server
    assert mutual.tls is not None
    assert mutual.tls.transport is Transport.MTLS
    assert mutual.tls.client_ca_pem == pki.ca.certificate_pem
    assert mutual.tls.certificate_chain_pem == pki.server.certificate_pem
    assert "127.0.0.1" in mutual.tls.certificate.names
    assert "localhost" in mutual.tls.certificate.names


def test_with_tls_the_health_port_is_on_by_default_and_configurable(pki: Pki) -> None:
    assert credit(server_files(pki)).server.health_address == "127.0.0.1:8082"
    assert booking(server_files(pki, "BOOKING")).server.health_address == "127.0.0.1:8081"
    assert credit({**server_files(pki), "CREDIT_HEALTH_ADDRESS": "0.0.0.0:9000"}).server.health_address == (
        "0.0.0.0:9000"  # parsed, not bound
    )
    assert credit({**server_files(pki), "CREDIT_HEALTH_ADDRESS": "off"}).server.health_address is None
    # Asked for explicitly, a plaintext server gets one too.
    assert credit({"CREDIT_HEALTH_ADDRESS": "127.0.0.1:0"}).server.health_address == "127.0.0.1:0"
    with pytest.raises(ConfigError, match="CREDIT_HEALTH_ADDRESS"):
        credit({**server_files(pki), "CREDIT_HEALTH_ADDRESS": "nowhere"})


def test_the_booking_client_is_tls_with_a_ca_and_mutual_with_a_certificate(pki: Pki) -> None:
    tls_only = booking({"BOOKING_CREDIT_TLS_CA_FILE": str(pki.ca.certificate_file)}).credit_tls
    assert tls_only is not None
    assert tls_only.transport is Transport.TLS
    assert tls_only.certificate_chain_pem is None and tls_only.private_key_pem is None

    mutual = booking({**client_files(pki), "BOOKING_CREDIT_TLS_SERVER_NAME": "credit"}).credit_tls
    assert mutual is not None
    assert mutual.transport is Transport.MTLS
    assert mutual.root_certificates_pem == pki.ca.certificate_pem
    assert mutual.private_key_pem == pki.client.key_pem
    assert mutual.server_name == "credit"
    # The client side does not turn the booking server's own port to TLS, nor the reverse.
    assert booking(client_files(pki)).server.tls is None
    assert booking(server_files(pki, "BOOKING")).credit_tls is None


def test_no_repr_shows_a_key(pki: Pki) -> None:
    server = ServerTls.from_environment(server_files(pki), "CREDIT")
    client = ClientTls.from_environment(client_files(pki), "BOOKING_CREDIT")
    key_body = pki.server.key_pem.decode().splitlines()[1]
    client_key_body = pki.client.key_pem.decode().splitlines()[1]
    for text in (repr(server), repr(client), repr(booking({**server_files(pki, "BOOKING"), **client_files(pki)}))):
        assert "PRIVATE KEY" not in text
        assert key_body not in text
        assert client_key_body not in text


# --- every way to get it wrong names the variable --------------------------------------------------


def write(directory: Path, name: str, content: bytes) -> str:
    path = directory / name
    path.write_bytes(content)
    return str(path)


def refusal(settings: object, env: Mapping[str, str]) -> str:
    reader = credit if settings == "credit" else booking
    with pytest.raises(ConfigError) as raised:
        reader(env)
    return str(raised.value)


def test_half_a_server_pair_is_refused(pki: Pki) -> None:
    cert_only = {"CREDIT_TLS_CERT_FILE": str(pki.server.certificate_file)}
    assert refusal("credit", cert_only) == "CREDIT_TLS_KEY_FILE is required with CREDIT_TLS_CERT_FILE"
    key_only = {"BOOKING_TLS_KEY_FILE": str(pki.server.key_file)}
    assert refusal("booking", key_only) == "BOOKING_TLS_CERT_FILE is required with BOOKING_TLS_KEY_FILE"
    ca_only = {"CREDIT_TLS_CLIENT_CA_FILE": str(pki.ca.certificate_file)}
    assert refusal("credit", ca_only).startswith("CREDIT_TLS_CLIENT_CA_FILE needs CREDIT_TLS_CERT_FILE")


def test_unreadable_files_are_refused_naming_the_variable(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    message = refusal("credit", {**server_files(pki), "CREDIT_TLS_CERT_FILE": missing})
    assert message.startswith(f"CREDIT_TLS_CERT_FILE: cannot read {missing}")
    message = refusal("credit", {**server_files(pki), "CREDIT_TLS_KEY_FILE": str(tmp_path)})  # a directory
    assert message.startswith("CREDIT_TLS_KEY_FILE: cannot read")
    message = refusal("credit", {**server_files(pki), "CREDIT_TLS_CLIENT_CA_FILE": missing})
    assert message.startswith("CREDIT_TLS_CLIENT_CA_FILE: cannot read")
    blank = refusal("credit", {**server_files(pki), "CREDIT_TLS_CLIENT_CA_FILE": "  "})
    assert blank == "CREDIT_TLS_CLIENT_CA_FILE is blank"
    huge = write(tmp_path, "huge.pem", b"A" * (1024 * 1024 + 1))
    assert "larger than" in refusal("credit", {**server_files(pki), "CREDIT_TLS_CERT_FILE": huge})


def test_files_that_are_not_pem_are_refused_naming_the_variable(pki: Pki, tmp_path: Path) -> None:
    garbage = write(tmp_path, "garbage.pem", b"not a certificate\n")
    for name in ("CREDIT_TLS_CERT_FILE", "CREDIT_TLS_CLIENT_CA_FILE"):
        message = refusal("credit", {**server_files(pki), name: garbage})
        assert message.startswith(f"{name}: {garbage} holds no PEM certificate"), message
    # A certificate where the key should be, and garbage there.
    for key_file in (str(pki.server.certificate_file), garbage):
        message = refusal("credit", {**server_files(pki), "CREDIT_TLS_KEY_FILE": key_file})
        assert message == f"CREDIT_TLS_KEY_FILE: {key_file} is not a PEM private key", message
    # A DER certificate is not PEM either.
    der = write(tmp_path, "server.der", pki.ca.certificate.public_bytes(serialization.Encoding.DER))
    assert refusal("credit", {**server_files(pki), "CREDIT_TLS_CLIENT_CA_FILE": der}).startswith(
        "CREDIT_TLS_CLIENT_CA_FILE:"
    )


def test_a_key_that_is_not_the_certificates_is_refused(pki: Pki) -> None:
    message = refusal("credit", {**server_files(pki), "CREDIT_TLS_KEY_FILE": str(pki.client.key_file)})
    assert message.startswith("CREDIT_TLS_KEY_FILE: the key in")
    assert "does not belong to the first certificate of CREDIT_TLS_CERT_FILE" in message
    message = refusal("booking", {**client_files(pki), "BOOKING_CREDIT_TLS_KEY_FILE": str(pki.server.key_file)})
    assert message.startswith("BOOKING_CREDIT_TLS_KEY_FILE: the key in")


def test_an_encrypted_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server.key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path = write(tmp_path, "encrypted.key", encrypted)
    message = refusal("credit", {**server_files(pki), "CREDIT_TLS_KEY_FILE": path})
    assert message.startswith(f"CREDIT_TLS_KEY_FILE: {path} is encrypted")


def test_an_expired_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = pki.ca.issue(tmp_path, "expired", ["localhost"], not_valid_after=yesterday)
    env = {"CREDIT_TLS_CERT_FILE": str(expired.certificate_file), "CREDIT_TLS_KEY_FILE": str(expired.key_file)}
    message = refusal("credit", env)
    assert message.startswith("CREDIT_TLS_CERT_FILE: the certificate 'CN=localhost'")
    assert "expired at" in message


def test_client_settings_without_a_ca_or_with_half_a_pair_are_refused(pki: Pki) -> None:
    without_ca = {k: v for k, v in client_files(pki).items() if k != "BOOKING_CREDIT_TLS_CA_FILE"}
    assert refusal("booking", without_ca).startswith("BOOKING_CREDIT_TLS_CERT_FILE needs BOOKING_CREDIT_TLS_CA_FILE")
    name_only = {"BOOKING_CREDIT_TLS_SERVER_NAME": "credit"}
    assert refusal("booking", name_only).startswith("BOOKING_CREDIT_TLS_SERVER_NAME needs BOOKING_CREDIT_TLS_CA_FILE")
    cert_without_key = {k: v for k, v in client_files(pki).items() if k != "BOOKING_CREDIT_TLS_KEY_FILE"}
    assert refusal("booking", cert_without_key) == (
        "BOOKING_CREDIT_TLS_KEY_FILE is required with BOOKING_CREDIT_TLS_CERT_FILE"
    )
    not_a_ca = {**client_files(pki), "BOOKING_CREDIT_TLS_CA_FILE": str(pki.client.key_file)}
    assert refusal("booking", not_a_ca).startswith("BOOKING_CREDIT_TLS_CA_FILE:")
    bad_name = {**client_files(pki), "BOOKING_CREDIT_TLS_SERVER_NAME": "two words"}
    assert refusal("booking", bad_name).startswith("BOOKING_CREDIT_TLS_SERVER_NAME must be a host name")
