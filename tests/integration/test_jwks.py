"""Tokens from an identity provider's JWKS: a local provider (a real HTTP server on 127.0.0.1,
tests/support/jwks.py) and the verifier with a clock the test moves, then a real credit service
that fetches the provider's keys through its interceptor.

What is shown: RS256, ES256 and EdDSA keys; a key rotated in at the provider accepted at once,
without a restart; a key the provider removed refused once the cached set is older than its
bound, even for a token verified before; a provider that is down, or hangs, leaves the last good
keys in use and refuses the rest (fail closed), and is asked again only after the rate limit; a
token from a key not in the set, an HS256 token keyed with the public key, and `alg: none` are
refused; the roles and subject claims can sit where a provider puts them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from credit.v1 import credit_pb2, credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.auth import ADMIN, CLIENT, AuthSettings, Principal, TokenVerifier, Unauthenticated
from service_kit.config import ConfigError
from service_kit.errors import error_details
from tests.support.jwks import JwksServer, SigningKey, claims_for
from tests.support.stack import fresh_database, server_environment, wait_serving

ISSUER = "https://idp.example/"
AUDIENCE = "booking-api"
SUBJECT = "3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b"
CACHE_S = 300.0
MIN_REFRESH_INTERVAL_S = 30.0


@dataclass
class Clock:
    now_s: float = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def keys() -> dict[str, SigningKey]:
    return {
        "rs": SigningKey.rsa("rs-1"),
        "es": SigningKey.ec("es-1"),
        "ed": SigningKey.ed25519("ed-1"),
    }


@pytest.fixture
def provider(keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    server = JwksServer(*keys.values())
    yield server
    server.stop()


def settings(url: str, **extra: str) -> AuthSettings:
    return AuthSettings.from_environment(
        {
            "AUTH_JWKS_URL": url,
            "AUTH_JWT_ISSUER": ISSUER,
            "AUTH_JWT_AUDIENCE": AUDIENCE,
            "AUTH_JWKS_CACHE_S": str(CACHE_S),
            "AUTH_JWKS_MIN_REFRESH_INTERVAL_S": str(MIN_REFRESH_INTERVAL_S),
            "AUTH_JWKS_TIMEOUT_S": "0.5",
            **extra,
        }
    )


def mint(key: SigningKey, roles: list[str] | None = None, **claims: Any) -> str:
    return key.mint({**claims_for(SUBJECT, roles or [CLIENT], issuer=ISSUER, audience=AUDIENCE), **claims})


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def admit(verifier: TokenVerifier, token: str) -> Principal:
    """What the server does for a call: the interceptor's key refresh, then the verification."""
    if verifier.wants_fresh_keys(bearer(token)):
        await verifier.refresh_keys()
    return verifier.verify(token)


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as refusal:
        await admit(verifier, token)
    return refusal.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    """A token built by hand, as an attacker would: PyJWT refuses to make these."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


# --- the verifier, with a clock the test moves --------------------------------------------------


async def test_tokens_of_each_algorithm_verify_with_keys_from_the_set(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(settings(provider.url), jwks_clock=Clock())

    principals = [await admit(verifier, mint(key, [ADMIN])) for key in keys.values()]

    assert principals == [Principal(SUBJECT, frozenset({ADMIN}))] * 3
    assert provider.requests == 1  # one fetch, then the cached set


async def test_a_key_rotated_in_is_accepted_at_once_and_one_removed_is_refused_after_the_bound(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    clock = Clock()
    verifier = TokenVerifier(settings(provider.url), jwks_clock=clock)
    old_token = mint(keys["rs"])
    assert (await admit(verifier, old_token)).subject == SUBJECT
    rotated = SigningKey.rsa("rs-2")
    provider.publish(*keys.values(), rotated)
    clock.now_s += MIN_REFRESH_INTERVAL_S

    # The new kid is unknown: the set is fetched again at once, no restart needed.
    assert (await admit(verifier, mint(rotated))).subject == SUBJECT
    assert provider.requests == 2
    provider.publish(rotated, keys["es"], keys["ed"])  # rs-1 is gone
    # The old token still passes while the set it was verified with is within its bound...
    clock.now_s += CACHE_S - 1
    assert (await admit(verifier, old_token)).subject == SUBJECT
    # ...and no longer after it, although it was verified (and remembered) before.
    clock.now_s += 2
    assert await refused(verifier, old_token) == "TOKEN_INVALID"
    assert await refused(verifier, mint(keys["rs"])) == "TOKEN_INVALID"
    assert (await admit(verifier, mint(rotated))).subject == SUBJECT
    assert provider.requests == 3


async def test_unknown_kids_fetch_the_set_at_most_once_per_interval(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    clock = Clock()
    verifier = TokenVerifier(settings(provider.url), jwks_clock=clock)
    await admit(verifier, mint(keys["ed"]))
    clock.now_s += MIN_REFRESH_INTERVAL_S
    strangers = [SigningKey.ec(f"made-up-{n}") for n in range(5)]

    reasons = [await refused(verifier, mint(key)) for key in strangers]
    clock.now_s += MIN_REFRESH_INTERVAL_S
    reasons.append(await refused(verifier, mint(strangers[0])))

    assert reasons == ["TOKEN_INVALID"] * 6
    assert provider.requests == 3  # the first fetch, one for the made-up kids, one after the interval


async def test_a_provider_that_is_down_or_hangs_leaves_the_last_good_keys_and_refuses_the_rest(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    clock = Clock()
    verifier = TokenVerifier(settings(provider.url), jwks_clock=clock)
    known = mint(keys["es"])
    await admit(verifier, known)
    provider.hang()
    clock.now_s += CACHE_S  # the set is due to be fetched again

    # The fetch times out (0.5 s); the cached set stays in use.
    assert (await admit(verifier, known)).subject == SUBJECT
    assert (await admit(verifier, mint(keys["ed"]))).subject == SUBJECT
    assert await refused(verifier, mint(SigningKey.rsa("new-during-outage"))) == "TOKEN_INVALID"
    provider.stop()
    clock.now_s += MIN_REFRESH_INTERVAL_S
    assert await refused(verifier, mint(SigningKey.rsa("new-after-outage"))) == "TOKEN_INVALID"
    assert (await admit(verifier, known)).subject == SUBJECT


async def test_with_no_set_ever_fetched_every_token_is_refused(keys: dict[str, SigningKey]) -> None:
    unreachable = JwksServer()
    url = unreachable.url
    unreachable.stop()  # nothing listens there any more
    verifier = TokenVerifier(settings(url), jwks_clock=Clock())

    assert await refused(verifier, mint(keys["rs"])) == "TOKEN_INVALID"
    assert await refused(verifier, mint(keys["ed"], [ADMIN])) == "TOKEN_INVALID"


# PyJWT warns when it signs with a weak key: the tests make one on purpose.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_a_key_not_in_the_set_and_algorithm_tricks_are_refused(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    verifier = TokenVerifier(settings(provider.url), jwks_clock=Clock())
    claims = claims_for(SUBJECT, [ADMIN], issuer=ISSUER, audience=AUDIENCE)
    public_pem = (
        keys["rs"]
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def hs256_with_public_key(data: bytes) -> bytes:
        return hmac.new(public_pem, data, hashlib.sha256).digest()

    def eddsa(data: bytes) -> bytes:
        signer = keys["ed"].private_key
        assert isinstance(signer, Ed25519PrivateKey)
        return signer.sign(data)

    forged = {
        "a key not in the set": SigningKey.rsa("not-published").mint(claims),
        "a key not in the set, naming a published kid": SigningKey.rsa("x").mint(claims, kid="rs-1"),
        "HS256 keyed with the public key": hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": "rs-1"}, claims, hs256_with_public_key
        ),
        "alg none": hand_made({"alg": "none", "typ": "JWT", "kid": "rs-1"}, claims, lambda _: b""),
        "alg none, no signature part": hand_made({"alg": "none", "kid": "rs-1"}, claims, lambda _: b"")[:-1],
        "RS256 header on the EdDSA key": hand_made({"alg": "RS256", "kid": "ed-1"}, claims, eddsa),
        "an RSA key of 1024 bits": SigningKey.rsa("rs-1", bits=1024).mint(claims),
    }

    reasons = {name: await refused(verifier, value) for name, value in forged.items()}

    assert reasons == dict.fromkeys(forged, "TOKEN_INVALID")
    assert (await admit(verifier, mint(keys["rs"], [ADMIN]))).roles == {ADMIN}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_unusable_keys_of_a_set_are_left_out(provider: JwksServer, keys: dict[str, SigningKey]) -> None:
    weak = SigningKey.rsa("weak", bits=1024)
    provider.publish(weak, SigningKey.ec("es-1"), keys["ed"])
    verifier = TokenVerifier(settings(provider.url), jwks_clock=Clock())

    assert await refused(verifier, mint(weak)) == "TOKEN_INVALID"
    assert (await admit(verifier, mint(keys["ed"]))).subject == SUBJECT
    assert verifier.jwks is not None and set(verifier.jwks.keys) == {"es-1", "ed-1"}


async def test_the_roles_and_subject_claims_are_where_the_provider_puts_them(
    provider: JwksServer, keys: dict[str, SigningKey]
) -> None:
    """Keycloak: roles in realm_access.roles; Auth0: a namespaced claim whose name has dots and
    slashes; the platform's id in a claim of its own."""
    keycloak = TokenVerifier(settings(provider.url, AUTH_JWT_ROLES_CLAIM="realm_access.roles"), jwks_clock=Clock())
    auth0 = TokenVerifier(
        settings(
            provider.url,
            AUTH_JWT_ROLES_CLAIM="https://booking.example/roles",
            AUTH_JWT_SUBJECT_CLAIM="https://booking.example/user_id",
        ),
        jwks_clock=Clock(),
    )
    keycloak_token = mint(keys["rs"], realm_access={"roles": ["therapist", "offline_access"]})
    namespaced: dict[str, Any] = {
        "https://booking.example/roles": ["client"],
        "https://booking.example/user_id": SUBJECT,
    }
    auth0_token = mint(keys["rs"], sub="auth0|65f0c0ffee", **namespaced)

    assert await admit(keycloak, keycloak_token) == Principal(SUBJECT, frozenset({"therapist"}))
    assert await admit(auth0, auth0_token) == Principal(SUBJECT, frozenset({"client"}))
    assert await refused(keycloak, auth0_token) == "TOKEN_INVALID"  # no roles where it looks


def test_a_jwks_url_must_be_https_except_on_loopback() -> None:
    base = {"AUTH_JWT_ISSUER": ISSUER, "AUTH_JWT_AUDIENCE": AUDIENCE}
    for url in ("http://idp.example/jwks.json", "ftp://idp.example/jwks", "not a url"):
        with pytest.raises(ConfigError, match="AUTH_JWKS_URL"):
            AuthSettings.from_environment({**base, "AUTH_JWKS_URL": url})
    for url in ("https://idp.example/.well-known/jwks.json", "http://127.0.0.1:8000/jwks"):
        jwks = AuthSettings.from_environment({**base, "AUTH_JWKS_URL": url}).jwks
        assert jwks is not None and jwks.url == url


# --- a real service, fetching the keys through its interceptor -----------------------------------


@dataclass
class Service:
    address: str
    provider: JwksServer


@pytest.fixture(scope="module")
async def service(postgres_server_url: str) -> AsyncIterator[Service]:
    provider = JwksServer(SigningKey.rsa("svc-rs-1"))
    environment = server_environment("CREDIT", await fresh_database(postgres_server_url, "jwks_credit"))
    del environment["AUTH_JWT_PUBLIC_KEYS"]  # the provider's keys only
    environment.update(
        AUTH_JWKS_URL=provider.url,
        AUTH_JWT_ISSUER=ISSUER,
        AUTH_JWT_AUDIENCE=AUDIENCE,
        AUTH_JWKS_MIN_REFRESH_INTERVAL_S="0",
    )
    runtime = await start_credit(CreditSettings.from_environment(environment))
    try:
        address = f"127.0.0.1:{runtime.port}"
        await wait_serving(address, CREDIT_SERVICE_NAME)
        yield Service(address, provider)
    finally:
        await runtime.stop()
        provider.stop()


async def test_a_service_accepts_a_rotated_key_without_a_restart(service: Service) -> None:
    rotated = SigningKey.ec("svc-es-2")
    owner = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = credit_pb2_grpc.CreditServiceStub(channel)
        request = credit_pb2.GetBalanceRequest(owner_id=owner)
        with pytest.raises(grpc.aio.AioRpcError) as before_rotation:
            await stub.GetBalance(request, metadata=bearer(rotated.mint(admin_claims())), timeout=10)
        service.provider.publish(SigningKey.rsa("svc-rs-1"), rotated)
        with pytest.raises(grpc.aio.AioRpcError) as after_rotation:
            await stub.GetBalance(request, metadata=bearer(rotated.mint(admin_claims())), timeout=10)

    assert error_details(before_rotation.value).reason == "TOKEN_INVALID"
    # Authenticated and authorized: the admin reads an account that does not exist.
    assert error_details(after_rotation.value).reason == "ACCOUNT_NOT_FOUND"


def admin_claims() -> dict[str, Any]:
    return claims_for(str(uuid.uuid4()), [ADMIN], issuer=ISSUER, audience=AUDIENCE)
