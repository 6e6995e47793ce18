"""Who is calling, and may they call this: bearer JWTs, a principal per call, rules per RPC.

Tokens are JWTs signed with EdDSA (Ed25519) and verified against public keys from configuration
(docs/security.md). Verification is pure: `TokenVerifier.verify` takes the token text and gives
back a `Principal` or raises `Unauthenticated`. The server interceptor binds the principal to the
call (a contextvar, like the request id), so the servicer can do the checks that need the
resource (the owner of a booking). Only the principal's subject and roles are ever logged; the
token itself never is.

Each service declares one table, RPC name -> `Rule`; an RPC without a rule is refused (fail
closed), and a test checks that every RPC of both services has one. Rules see the request, so
"a client may read only its own balance" is a rule on `owner_id`; they run before the handler,
so a forbidden id and a missing one look alike.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service_kit.config import ConfigError, choice, number, text
from service_kit.errors import DomainError

CLIENT = "client"
THERAPIST = "therapist"
ADMIN = "admin"
SERVICE = "service"
ROLES = frozenset({CLIENT, THERAPIST, ADMIN, SERVICE})
ALGORITHM = "EdDSA"
AUTHORIZATION_HEADER = "authorization"
# Probes and tooling need these without a token (reflection can be switched off instead).
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
MAX_TOKEN_LENGTH = 8192
# Verified tokens kept, so that a caller's next call with the same token skips the signature check
# (about 0.1 ms of CPU, the largest part of authenticating a call; docs/performance.md). Bounded;
# an entry is used only until the token's own expiry, so a cached token expires on time.
VERIFIED_TOKEN_CACHE_SIZE = 4096
DEFAULT_ISSUER = "therapy-booking"
DEFAULT_AUDIENCE = "therapy-booking"
# The setting that alone allows AUTH_MODE=disabled: a typo cannot switch authentication off.
DISABLED_ACKNOWLEDGEMENT = "AUTH_DISABLED_I_UNDERSTAND_ANYONE_CAN_CALL"


class Unauthenticated(DomainError):
    """No valid credentials: TOKEN_MISSING, TOKEN_EXPIRED or TOKEN_INVALID (the message says no more)."""

    reason = "TOKEN_INVALID"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # type: ignore[misc]  # which of the three


class PermissionDenied(DomainError):
    """Authenticated, but this caller may not make this call."""

    reason = "PERMISSION_DENIED"


class TooManyConcurrentCalls(DomainError):
    """The caller already has its bound of calls in flight."""

    reason = "TOO_MANY_CONCURRENT_REQUESTS"


@dataclass(frozen=True)
class Principal:
    """The caller: `subject` is a client, therapist or admin id (a UUID) or a service's name."""

    subject: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles

    def is_subject(self, identifier: str) -> bool:
        """Whether a request's id names this caller (UUIDs compare in canonical form)."""
        return bool(identifier) and _canonical(identifier) == _canonical(self.subject)


def _canonical(identifier: str) -> str:
    try:
        return str(uuid.UUID(identifier))
    except ValueError:
        return identifier


# Authentication switched off (development only): every call acts with every role.
DEVELOPMENT_PRINCIPAL = Principal("development", ROLES)

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("rpc_principal", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being served; only called from a handler of an authenticated RPC."""
    principal = _principal.get()
    assert principal is not None, "no principal: called outside an authenticated RPC"
    return principal


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _principal.set(principal)


def unbind_principal(token: contextvars.Token[Principal | None]) -> None:
    _principal.reset(token)


# --- keys --------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's id (`kid`): a digest of its raw bytes, so issuer and verifier agree without a registry."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_keys(pem_text: str, source: str) -> dict[str, Ed25519PublicKey]:
    """Every `PUBLIC KEY` block in the text (several keys for rotation), by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    marker = "-----END PUBLIC KEY-----"
    for block in pem_text.split(marker):
        if "-----BEGIN PUBLIC KEY-----" not in block:
            continue
        try:
            key = serialization.load_pem_public_key((block.strip() + "\n" + marker + "\n").encode())
        except ValueError:
            raise ConfigError(f"{source} holds a malformed public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{source} holds a key that is not Ed25519 (only EdDSA tokens are accepted)")
        keys[key_id(key)] = key
    return keys


def load_private_key(path: Path, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise ConfigError(f"{source}: {path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{source}: {path} is not an Ed25519 private key")
    return key


def public_pem(private_key: Ed25519PrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthSettings:
    required: bool
    public_keys: Mapping[str, Ed25519PublicKey]
    issuer: str
    audience: str
    clock_skew_s: float

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> AuthSettings:
        mode = choice(env, "AUTH_MODE", "required", ("required", "disabled"))
        issuer = text(env, "AUTH_JWT_ISSUER", DEFAULT_ISSUER)
        audience = text(env, "AUTH_JWT_AUDIENCE", DEFAULT_AUDIENCE)
        skew = number(env, "AUTH_CLOCK_SKEW_S", 30.0, minimum=0.0, maximum=300.0)
        if mode == "disabled":
            if env.get("AUTH_DISABLED_ACKNOWLEDGEMENT") != DISABLED_ACKNOWLEDGEMENT:
                raise ConfigError(
                    "AUTH_MODE=disabled lets anyone call anything: it is accepted only with "
                    f"AUTH_DISABLED_ACKNOWLEDGEMENT={DISABLED_ACKNOWLEDGEMENT} (development only)"
                )
            return cls(False, {}, issuer, audience, skew)
        keys: dict[str, Ed25519PublicKey] = {}
        if env.get("AUTH_JWT_PUBLIC_KEYS"):
            keys.update(load_public_keys(env["AUTH_JWT_PUBLIC_KEYS"], "AUTH_JWT_PUBLIC_KEYS"))
        if env.get("AUTH_JWT_PUBLIC_KEY_FILE"):
            path = Path(env["AUTH_JWT_PUBLIC_KEY_FILE"])
            try:
                pem_text = path.read_text()
            except OSError as error:
                raise ConfigError(f"AUTH_JWT_PUBLIC_KEY_FILE: cannot read {path}: {error.strerror}") from None
            keys.update(load_public_keys(pem_text, "AUTH_JWT_PUBLIC_KEY_FILE"))
        if not keys:
            raise ConfigError(
                "AUTH_JWT_PUBLIC_KEYS or AUTH_JWT_PUBLIC_KEY_FILE is required (Ed25519 public keys in PEM); "
                "see docs/security.md"
            )
        return cls(True, keys, issuer, audience, skew)


# --- tokens ------------------------------------------------------------------------------------


def mint_token(
    private_key: Ed25519PrivateKey,
    *,
    subject: str,
    roles: Iterable[str],
    issuer: str,
    audience: str,
    ttl_s: float,
    now_s: float | None = None,
) -> str:
    """A signed token (for the booking service's own identity, `make run` and tests)."""
    issued = int(time.time() if now_s is None else now_s)
    claims = {
        "sub": subject,
        "roles": sorted(roles),
        "iss": issuer,
        "aud": audience,
        "iat": issued,
        "exp": issued + int(ttl_s),
    }
    return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": key_id(private_key.public_key())})


class TokenVerifier:
    def __init__(
        self,
        settings: AuthSettings,
        *,
        cache_size: int = VERIFIED_TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.required and settings.public_keys
        assert cache_size >= 0
        self._settings = settings
        self._clock = clock
        self._cache_size = cache_size
        # token -> (its principal, the last instant it is accepted: exp + skew). The keys trusted
        # are fixed for the life of the process, so a token verified once stays verified; only
        # time can make it invalid, and that is checked on every use.
        self._verified: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, accepted_until_s = cached
            if self._clock() <= accepted_until_s:
                return principal
            del self._verified[token]
            raise Unauthenticated("TOKEN_EXPIRED", "the bearer token has expired")
        principal, expires_at_s = self._verify_signed(token)
        if self._cache_size:
            if len(self._verified) >= self._cache_size:
                # The oldest entry goes (dicts keep insertion order): a bound, not an LRU.
                del self._verified[next(iter(self._verified))]
            self._verified[token] = (principal, expires_at_s + self._settings.clock_skew_s)
        return principal

    def _verify_signed(self, token: str) -> tuple[Principal, float]:
        """The principal of a token whose signature and claims check out, and its expiry."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid") from None
        kid = header.get("kid")
        if kid is None:
            candidates: Sequence[Ed25519PublicKey] = list(self._settings.public_keys.values())
        elif isinstance(kid, str) and kid in self._settings.public_keys:
            candidates = [self._settings.public_keys[kid]]
        else:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is signed with an unknown key")
        claims = self._decode(token, candidates)
        subject, roles, expires_at_s = claims.get("sub"), claims.get("roles"), claims["exp"]
        if not isinstance(subject, str) or not subject or not isinstance(roles, list):
            raise Unauthenticated("TOKEN_INVALID", "the bearer token lacks a subject or roles")
        # Unknown roles grant nothing; a token with none is valid and may call nothing.
        principal = Principal(subject, frozenset(r for r in roles if isinstance(r, str) and r in ROLES))
        # PyJWT has checked `exp` as `int(exp)` does (which also takes "123" and 1.5): the same here.
        return principal, float(int(expires_at_s))

    def _decode(self, token: str, candidates: Sequence[Ed25519PublicKey]) -> dict[str, Any]:
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    audience=self._settings.audience,
                    issuer=self._settings.issuer,
                    leeway=self._settings.clock_skew_s,
                    options={"require": ["exp", "iat", "iss", "aud", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe the next key (rotation); no key at all falls through below
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("TOKEN_EXPIRED", "the bearer token has expired") from None
            except jwt.InvalidTokenError:
                raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid") from None
            return claims
        raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of the one `authorization: Bearer <token>` header (Unauthenticated otherwise)."""
    values = [value for key, value in metadata if key == AUTHORIZATION_HEADER]
    if not values:
        raise Unauthenticated("TOKEN_MISSING", "an authorization header with a bearer token is required")
    if len(values) > 1 or not isinstance(values[0], str):
        raise Unauthenticated("TOKEN_INVALID", "give exactly one authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("TOKEN_INVALID", 'the authorization header must be "Bearer <token>"')
    return token.strip()


class ServiceToken:
    """The booking service's own token for its calls to the credit service: minted from its
    private key, short-lived and minted again before it expires; or a fixed, pre-made token."""

    def __init__(
        self,
        *,
        private_key: Ed25519PrivateKey | None = None,
        fixed_token: str | None = None,
        subject: str,
        issuer: str,
        audience: str,
        ttl_s: float,
    ) -> None:
        assert (private_key is None) != (fixed_token is None)
        self._private_key = private_key
        self._token = fixed_token or ""
        self._subject, self._issuer, self._audience, self._ttl_s = subject, issuer, audience, ttl_s
        self._renew_at_s = 0.0 if private_key is not None else float("inf")

    def token(self) -> str:
        now_s = time.time()
        if now_s >= self._renew_at_s:
            assert self._private_key is not None
            self._token = mint_token(
                self._private_key,
                subject=self._subject,
                roles=[SERVICE],
                issuer=self._issuer,
                audience=self._audience,
                ttl_s=self._ttl_s,
                now_s=now_s,
            )
            # Renew at half life: a call in flight never carries a token about to expire.
            self._renew_at_s = now_s + self._ttl_s / 2
        return self._token

    def metadata(self) -> tuple[str, str]:
        return (AUTHORIZATION_HEADER, f"Bearer {self.token()}")


# --- rules -------------------------------------------------------------------------------------

# Whether this principal may make this call with this request.
Rule = Callable[[Principal, Any], bool]
AccessRules = Mapping[str, Rule]


def anyone_with(*roles: str) -> Rule:
    assert set(roles) <= ROLES

    def rule(principal: Principal, request: Any) -> bool:
        return any(principal.has(role) for role in roles)

    return rule


def own(role: str, field: str) -> Rule:
    """The caller has `role` and the request's `field` (a dotted path) names the caller."""
    assert role in ROLES
    path = field.split(".")

    def rule(principal: Principal, request: Any) -> bool:
        if not principal.has(role):
            return False
        value = request
        for part in path:
            value = getattr(value, part)
        return isinstance(value, str) and principal.is_subject(value)

    return rule


def either(*rules: Rule) -> Rule:
    def rule(principal: Principal, request: Any) -> bool:
        return any(one(principal, request) for one in rules)

    return rule


class Gate:
    """Authentication and authorization for one server: used by the interceptor on every call."""

    def __init__(self, settings: AuthSettings, service_name: str, rules: AccessRules) -> None:
        self._verifier = TokenVerifier(settings) if settings.required else None
        self._service_name = service_name
        self._rules = rules

    @property
    def required(self) -> bool:
        return self._verifier is not None

    def admit(
        self, service: str, rpc: str, request: Any, metadata: Iterable[tuple[str, str | bytes]]
    ) -> Principal | None:
        """The caller of an RPC of this service, allowed to make it; None for the open services."""
        if service in OPEN_SERVICES:
            return None
        if self._verifier is None:
            return DEVELOPMENT_PRINCIPAL
        principal = self._verifier.verify(bearer_token(metadata))
        rule = self._rules.get(rpc) if service == self._service_name else None
        if rule is None or not rule(principal, request):
            raise PermissionDenied("the caller may not make this call")
        return principal


class CallerLimits:
    """At most `limit` calls in flight per caller (by subject): one caller cannot take all slots."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_flight: dict[str, int] = {}  # bounded: an entry exists only while a call runs

    def acquire(self, subject: str) -> None:
        count = self._in_flight.get(subject, 0)
        if count >= self._limit:
            raise TooManyConcurrentCalls(
                f"at most {self._limit} concurrent calls per caller; retry later",
                metadata={"limit": str(self._limit)},
            )
        self._in_flight[subject] = count + 1

    def release(self, subject: str) -> None:
        count = self._in_flight[subject] - 1
        if count:
            self._in_flight[subject] = count
        else:
            del self._in_flight[subject]
