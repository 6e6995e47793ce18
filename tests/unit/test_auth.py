"""The token verifier, the bearer header, the rules and the settings: pure, no server."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from booking.v1 import booking_pb2
from booking_service.access import ACCESS_RULES as BOOKING_RULES
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2
from credit_service.servicer import ACCESS_RULES as CREDIT_RULES
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.auth import (
    ADMIN,
    CLIENT,
    DISABLED_ACKNOWLEDGEMENT,
    AuthSettings,
    CallerLimits,
    Gate,
    PermissionDenied,
    Principal,
    ServiceToken,
    TokenVerifier,
    TooManyConcurrentCalls,
    Unauthenticated,
    bearer_token,
    mint_token,
    public_pem,
)
from service_kit.config import ConfigError
from service_kit.errors import InvalidArgument

ISSUER, AUDIENCE = "issuer", "audience"
SUBJECT = "6a1c3f0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"


def settings_for(*keys: Ed25519PrivateKey, skew_s: float = 30) -> AuthSettings:
    env = {
        "AUTH_JWT_PUBLIC_KEYS": "".join(public_pem(key) for key in keys),
        "AUTH_JWT_ISSUER": ISSUER,
        "AUTH_JWT_AUDIENCE": AUDIENCE,
        "AUTH_CLOCK_SKEW_S": str(skew_s),
    }
    return AuthSettings.from_environment(env)


def mint(key: Ed25519PrivateKey, **overrides: object) -> str:
    arguments: dict[str, object] = {
        "subject": SUBJECT,
        "roles": [CLIENT],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "ttl_s": 300,
    }
    arguments.update(overrides)
    return mint_token(key, **arguments)  # type: ignore[arg-type]  # the test varies the arguments


def reason_of(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as refused:
        verifier.verify(token)
    return refused.value.reason


def test_a_good_token_gives_its_subject_and_known_roles() -> None:
    key = Ed25519PrivateKey.generate()
    principal = TokenVerifier(settings_for(key)).verify(mint(key, roles=[CLIENT, "superuser"]))
    assert principal == Principal(SUBJECT, frozenset({CLIENT}))


def test_expired_forged_wrong_audience_issuer_and_garbage_are_refused() -> None:
    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings_for(key))
    an_hour_ago = time.time() - 3600
    assert reason_of(verifier, mint(key, now_s=an_hour_ago)) == "TOKEN_EXPIRED"
    assert reason_of(verifier, mint(Ed25519PrivateKey.generate())) == "TOKEN_INVALID"
    assert reason_of(verifier, mint(key, audience="other")) == "TOKEN_INVALID"
    assert reason_of(verifier, mint(key, issuer="other")) == "TOKEN_INVALID"
    assert reason_of(verifier, "not.a.token") == "TOKEN_INVALID"
    assert reason_of(verifier, "x" * 10_000) == "TOKEN_INVALID"


def test_a_small_clock_skew_is_allowed() -> None:
    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings_for(key, skew_s=30))
    just_expired = mint(key, ttl_s=60, now_s=time.time() - 70)
    assert verifier.verify(just_expired).subject == SUBJECT


def test_an_unsigned_or_symmetric_token_is_refused() -> None:
    import jwt  # noqa: PLC0415  # only this test forges tokens by hand

    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings_for(key))
    claims = {"sub": SUBJECT, "roles": [ADMIN], "iss": ISSUER, "aud": AUDIENCE, "iat": 0, "exp": 2**40}
    assert reason_of(verifier, jwt.encode(claims, "", algorithm="none")) == "TOKEN_INVALID"
    assert reason_of(verifier, jwt.encode(claims, "secret" * 8, algorithm="HS256")) == "TOKEN_INVALID"


def test_keys_rotate_both_old_and_new_verify() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings_for(old, new))
    assert verifier.verify(mint(old)).subject == SUBJECT
    assert verifier.verify(mint(new)).subject == SUBJECT


def test_a_verified_token_is_remembered_but_still_expires_on_time() -> None:
    key = Ed25519PrivateKey.generate()
    now_s = [time.time()]
    verifier = TokenVerifier(settings_for(key, skew_s=30), clock=lambda: now_s[0])
    token = mint(key, ttl_s=60)
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # the second use is the remembered principal
    now_s[0] += 60 + 29
    assert verifier.verify(token) is first  # inside the skew
    now_s[0] += 2
    assert reason_of(verifier, token) == "TOKEN_EXPIRED"


def test_refused_tokens_are_not_remembered_and_the_memory_is_bounded() -> None:
    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings_for(key), cache_size=2)
    forged = mint(Ed25519PrivateKey.generate())
    for _ in range(2):
        assert reason_of(verifier, forged) == "TOKEN_INVALID"
    tokens = [mint(key, subject=f"00000000-0000-4000-8000-00000000000{n}") for n in range(3)]
    principals = [verifier.verify(token) for token in tokens]
    assert len(verifier._verified) == 2 and tokens[0] not in verifier._verified
    assert [verifier.verify(token) for token in tokens] == principals  # an evicted token verifies again


def test_the_bearer_header_must_be_one_and_well_formed() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer abc ")]) == "abc"
    with pytest.raises(Unauthenticated) as missing:
        bearer_token([("x-request-id", "1")])
    assert missing.value.reason == "TOKEN_MISSING"
    for bad in ([("authorization", "Basic abc")], [("authorization", "Bearer a"), ("authorization", "Bearer b")]):
        with pytest.raises(Unauthenticated):
            bearer_token(bad)


def test_settings_refuse_to_start_without_keys_or_with_auth_silently_disabled() -> None:
    with pytest.raises(ConfigError, match="AUTH_JWT_PUBLIC_KEYS"):
        AuthSettings.from_environment({})
    with pytest.raises(ConfigError, match="AUTH_DISABLED_ACKNOWLEDGEMENT"):
        AuthSettings.from_environment({"AUTH_MODE": "disabled"})
    disabled = AuthSettings.from_environment(
        {"AUTH_MODE": "disabled", "AUTH_DISABLED_ACKNOWLEDGEMENT": DISABLED_ACKNOWLEDGEMENT}
    )
    assert not disabled.required


@pytest.mark.parametrize(
    ("service", "rules", "descriptor"),
    [
        (BOOKING_SERVICE_NAME, BOOKING_RULES, booking_pb2.DESCRIPTOR.services_by_name["BookingService"]),
        (CREDIT_SERVICE_NAME, CREDIT_RULES, credit_pb2.DESCRIPTOR.services_by_name["CreditService"]),
    ],
)
def test_every_rpc_has_a_rule(service: str, rules: object, descriptor: object) -> None:
    assert set(rules) == {m.name for m in descriptor.methods}  # type: ignore[attr-defined, call-overload]


def test_the_gate_refuses_unknown_rpcs_and_lets_probes_through() -> None:
    key = Ed25519PrivateKey.generate()
    gate = Gate(settings_for(key), CREDIT_SERVICE_NAME, CREDIT_RULES)
    admin = [("authorization", f"Bearer {mint(key, roles=[ADMIN])}")]
    assert gate.admit("grpc.health.v1.Health", "Check", None, []) is None
    with pytest.raises(PermissionDenied):
        gate.admit(CREDIT_SERVICE_NAME, "DropAllAccounts", None, admin)
    own = [("authorization", f"Bearer {mint(key)}")]
    assert gate.admit(CREDIT_SERVICE_NAME, "GetBalance", SimpleNamespace(owner_id=SUBJECT), own)
    with pytest.raises(PermissionDenied):
        gate.admit(CREDIT_SERVICE_NAME, "GetBalance", SimpleNamespace(owner_id=str(uuid.uuid4())), own)
    # A malformed id is no question of rights: INVALID_ARGUMENT naming the field, as the handler says.
    for malformed in ("someone", SUBJECT.upper(), ""):
        with pytest.raises(InvalidArgument) as caught:
            gate.admit(CREDIT_SERVICE_NAME, "GetBalance", SimpleNamespace(owner_id=malformed), own)
        assert [v.field for v in caught.value.violations] == ["owner_id"]


def test_callers_are_bounded_one_by_one() -> None:
    limits = CallerLimits(2)
    limits.acquire("a")
    limits.acquire("a")
    limits.acquire("b")
    with pytest.raises(TooManyConcurrentCalls):
        limits.acquire("a")
    limits.release("a")
    limits.acquire("a")


def test_the_service_token_is_minted_again_before_it_expires() -> None:
    key = Ed25519PrivateKey.generate()
    source = ServiceToken(private_key=key, subject="booking-service", issuer=ISSUER, audience=AUDIENCE, ttl_s=60)
    first = source.token()
    assert source.token() == first
    verifier = TokenVerifier(settings_for(key))
    assert verifier.verify(first).roles == frozenset({"service"})
    source._renew_at_s = 0  # as if half its life had passed
    assert source.metadata()[1].startswith("Bearer ")
