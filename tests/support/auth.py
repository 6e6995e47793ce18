"""Tokens for tests: one Ed25519 key pair per test process, a local identity provider, and
channels that carry a token.

Every server a test starts (in-process or a real process) trusts both through
`auth_environment()`, which `server_environment` adds: the key pair as a PEM key, and the
provider's JWKS (tests/support/jwks.py, an RS256 key served on 127.0.0.1 by this process).
Channels from `authorized_channel` attach a token with every role that the existing tests need
(admin and service), unless a call brings its own `authorization` metadata; `token(...)` mints
one for a given role and subject, signed with the PEM key or, with `via="jwks"`, the provider's.
"""

from __future__ import annotations

import functools
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service_kit.auth import ADMIN, SERVICE, mint_token, private_pem, public_pem
from tests.support.jwks import JwksServer, SigningKey, claims_for

ISSUER = "therapy-booking-tests"
AUDIENCE = "therapy-booking"
# The subject of the default token: an operator with the admin and service roles.
OPERATOR_ID = "00000000-0000-4000-8000-00000000a000"


@functools.cache
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@functools.cache
def private_key_file() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="auth-test-keys-"))
    path = directory / "signing-key.pem"
    path.write_bytes(private_pem(signing_key()))
    path.chmod(0o600)
    return path


@functools.cache
def provider_key() -> SigningKey:
    return SigningKey.rsa("test-provider-rs256")


@functools.cache
def identity_provider() -> JwksServer:
    """The session's identity provider, started on first use, alive until the process ends."""
    return JwksServer(provider_key())


def auth_environment() -> dict[str, str]:
    """What a service needs to trust the test tokens (and, for booking, to mint its own)."""
    return {
        "AUTH_JWT_PUBLIC_KEYS": public_pem(signing_key()),
        "AUTH_JWKS_URL": identity_provider().url,
        "AUTH_JWT_ISSUER": ISSUER,
        "AUTH_JWT_AUDIENCE": AUDIENCE,
        "BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE": str(private_key_file()),
    }


def token(
    subject: str | uuid.UUID = OPERATOR_ID,
    roles: Iterable[str] = (ADMIN, SERVICE),
    *,
    ttl_s: float = 3600,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    key: Ed25519PrivateKey | None = None,
    now_s: float | None = None,
    via: str = "pem",
) -> str:
    """A token signed with the PEM key pair, or (`via="jwks"`) with the identity provider's key."""
    if via == "jwks":
        claims = claims_for(str(subject), list(roles), issuer=issuer, audience=audience, ttl_s=ttl_s, now_s=now_s)
        return provider_key().mint(claims)
    assert via == "pem", via
    return mint_token(
        key or signing_key(),
        subject=str(subject),
        roles=roles,
        issuer=issuer,
        audience=audience,
        ttl_s=ttl_s,
        now_s=now_s,
    )


def bearer(value: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying this token."""
    return (("authorization", f"Bearer {value}"),)


class _AttachToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, make_token: Callable[[], str]) -> None:
        self._make_token = make_token

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        metadata = list(client_call_details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._make_token()}"))
        return await continuation(client_call_details._replace(metadata=tuple(metadata)), request)


def authorized_channel(
    target: str,
    *,
    token_value: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel whose calls carry `token_value` (default: the operator's token): plaintext, or
    TLS with `credentials`."""
    value = token_value or token()
    interceptors = [_AttachToken(lambda: value)]
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
