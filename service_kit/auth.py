"""Who is calling, and may they call this: bearer JWTs, a principal per call, rules per RPC.

Tokens are JWTs signed with RS256, ES256 or EdDSA, verified against public keys from PEM files or
from an identity provider's JWKS URL (service_kit/jwks.py), with the issuer, the audience, and
the claims that carry the subject and the roles configured (docs/security.md). Verification is
synchronous and cheap: `TokenVerifier.verify` takes the token text and gives back a `Principal`
or raises `Unauthenticated`; fetching keys happens before it, in an interceptor. The server
interceptor binds the principal to the call (a contextvar, like the request id), so the servicer
can do the checks that need the resource (the owner of a booking). Only the principal's subject
and roles are ever logged; the token itself never is.

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

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from service_kit.config import ConfigError, choice, number, text
from service_kit.errors import DomainError
from service_kit.jwks import JwksKeys, JwksRefresher, JwksSettings, check_jwks_url
from service_kit.validation import Checks

CLIENT = "client"
THERAPIST = "therapist"
ADMIN = "admin"
SERVICE = "service"
ROLES = frozenset({CLIENT, THERAPIST, ADMIN, SERVICE})
# The algorithm of the tokens this process mints itself.
ALGORITHM = "EdDSA"
# What identity providers sign with (Auth0, Okta, Cognito, Keycloak: RS256; some ES256). Never
# `none` and never HMAC: a token is checked with the algorithm of the key that verifies it, so a
# public key cannot be used as an HMAC secret.
ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
MIN_RSA_KEY_BITS = 2048
DEFAULT_ROLES_CLAIM = "roles"
DEFAULT_SUBJECT_CLAIM = "sub"
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

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey


@dataclass(frozen=True)
class VerificationKey:
    """A public key a token may be signed with, and the one algorithm it verifies."""

    key_id: str
    algorithm: str
    key: PublicKey


def key_id(public_key: PublicKey) -> str:
    """A key's id (`kid`) for keys from PEM: a digest of the key, so that issuer and verifier agree
    without a registry (of the raw bytes for Ed25519, as tokens minted here have always used)."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()[:16]


def algorithm_of(public_key: object) -> str | None:
    """The algorithm a key verifies: RSA of 2048 bits or more RS256, EC P-256 ES256, Ed25519 EdDSA."""
    if isinstance(public_key, RSAPublicKey) and public_key.key_size >= MIN_RSA_KEY_BITS:
        return "RS256"
    if isinstance(public_key, EllipticCurvePublicKey) and isinstance(public_key.curve, SECP256R1):
        return "ES256"
    if isinstance(public_key, Ed25519PublicKey):
        return "EdDSA"
    return None


def jwk_verification_key(jwk: jwt.PyJWK) -> VerificationKey | None:
    """A key of a JWKS, if it is one of ours to use: its declared (or implied) algorithm must be
    the one its key type verifies."""
    algorithm = algorithm_of(jwk.key)
    if algorithm is None or jwk.algorithm_name != algorithm or not jwk.key_id:
        return None
    return VerificationKey(jwk.key_id, algorithm, jwk.key)


def load_public_keys(pem_text: str, source: str) -> dict[str, VerificationKey]:
    """Every `PUBLIC KEY` block in the text (several keys for rotation), by key id."""
    keys: dict[str, VerificationKey] = {}
    marker = "-----END PUBLIC KEY-----"
    for block in pem_text.split(marker):
        if "-----BEGIN PUBLIC KEY-----" not in block:
            continue
        try:
            key = serialization.load_pem_public_key((block.strip() + "\n" + marker + "\n").encode())
        except ValueError:
            raise ConfigError(f"{source} holds a malformed public key") from None
        algorithm = algorithm_of(key)
        if algorithm is None:
            raise ConfigError(
                f"{source} holds a key that is neither RSA of {MIN_RSA_KEY_BITS} bits or more, "
                "EC P-256 nor Ed25519 (tokens are accepted signed with RS256, ES256 or EdDSA)"
            )
        assert isinstance(key, PublicKey)
        keys[key_id(key)] = VerificationKey(key_id(key), algorithm, key)
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
    # Keys from PEM (AUTH_JWT_PUBLIC_KEYS, AUTH_JWT_PUBLIC_KEY_FILE), by key id.
    public_keys: Mapping[str, VerificationKey]
    issuer: str
    audience: str
    clock_skew_s: float
    # Keys from an identity provider's JWKS URL (AUTH_JWKS_URL), besides or instead of PEM keys.
    jwks: JwksSettings | None = None
    # The claims that carry the roles and the caller's id: a claim name, or a dotted path into
    # nested claims (Keycloak's realm_access.roles); a name with dots is tried whole first.
    roles_claim: str = DEFAULT_ROLES_CLAIM
    subject_claim: str = DEFAULT_SUBJECT_CLAIM

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> AuthSettings:
        mode = choice(env, "AUTH_MODE", "required", ("required", "disabled"))
        issuer = text(env, "AUTH_JWT_ISSUER", DEFAULT_ISSUER)
        audience = text(env, "AUTH_JWT_AUDIENCE", DEFAULT_AUDIENCE)
        skew = number(env, "AUTH_CLOCK_SKEW_S", 30.0, minimum=0.0, maximum=300.0)
        roles_claim = text(env, "AUTH_JWT_ROLES_CLAIM", DEFAULT_ROLES_CLAIM)
        subject_claim = text(env, "AUTH_JWT_SUBJECT_CLAIM", DEFAULT_SUBJECT_CLAIM)
        if mode == "disabled":
            if env.get("AUTH_DISABLED_ACKNOWLEDGEMENT") != DISABLED_ACKNOWLEDGEMENT:
                raise ConfigError(
                    "AUTH_MODE=disabled lets anyone call anything: it is accepted only with "
                    f"AUTH_DISABLED_ACKNOWLEDGEMENT={DISABLED_ACKNOWLEDGEMENT} (development only)"
                )
            return cls(False, {}, issuer, audience, skew, None, roles_claim, subject_claim)
        keys: dict[str, VerificationKey] = {}
        if env.get("AUTH_JWT_PUBLIC_KEYS"):
            keys.update(load_public_keys(env["AUTH_JWT_PUBLIC_KEYS"], "AUTH_JWT_PUBLIC_KEYS"))
        if env.get("AUTH_JWT_PUBLIC_KEY_FILE"):
            path = Path(env["AUTH_JWT_PUBLIC_KEY_FILE"])
            try:
                pem_text = path.read_text()
            except OSError as error:
                raise ConfigError(f"AUTH_JWT_PUBLIC_KEY_FILE: cannot read {path}: {error.strerror}") from None
            keys.update(load_public_keys(pem_text, "AUTH_JWT_PUBLIC_KEY_FILE"))
        jwks = _jwks_settings(env)
        if not keys and jwks is None:
            raise ConfigError(
                "AUTH_JWKS_URL, AUTH_JWT_PUBLIC_KEYS or AUTH_JWT_PUBLIC_KEY_FILE is required (an identity "
                "provider's JWKS, or public keys in PEM); see docs/security.md"
            )
        return cls(True, keys, issuer, audience, skew, jwks, roles_claim, subject_claim)


def _jwks_settings(env: Mapping[str, str]) -> JwksSettings | None:
    url = env.get("AUTH_JWKS_URL")
    if not url:
        return None
    return JwksSettings(
        url=check_jwks_url(url, "AUTH_JWKS_URL"),
        cache_s=number(env, "AUTH_JWKS_CACHE_S", 300.0, minimum=1.0, maximum=86_400.0),
        min_refresh_interval_s=number(env, "AUTH_JWKS_MIN_REFRESH_INTERVAL_S", 30.0, minimum=0.0, maximum=3600.0),
        timeout_s=number(env, "AUTH_JWKS_TIMEOUT_S", 2.0, minimum=0.1, maximum=30.0),
    )


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


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    # The last instant the token is accepted: its exp plus the allowed skew.
    accepted_until_s: float
    key: VerificationKey


class TokenVerifier:
    def __init__(
        self,
        settings: AuthSettings,
        *,
        cache_size: int = VERIFIED_TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
        jwks_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.required and (settings.public_keys or settings.jwks is not None)
        assert cache_size >= 0
        self._settings = settings
        self._clock = clock
        self._cache_size = cache_size
        self._static_keys = settings.public_keys
        self.jwks = (
            None
            if settings.jwks is None
            else JwksKeys(settings.jwks, to_verification_key=jwk_verification_key, clock=jwks_clock)
        )
        # token -> what it verified to. A token verified once stays verified while the key that
        # verified it is trusted (PEM keys for the life of the process; a JWKS key until a fetch
        # no longer lists it) and until its own expiry; both are checked on every use.
        self._verified: dict[str, _Verified] = {}

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            if not self._trusted(cached.key):
                del self._verified[token]
            elif self._clock() <= cached.accepted_until_s:
                return cached.principal
            else:
                del self._verified[token]
                raise Unauthenticated("TOKEN_EXPIRED", "the bearer token has expired")
        verified = self._verify_signed(token)
        if self._cache_size:
            if len(self._verified) >= self._cache_size:
                # The oldest entry goes (dicts keep insertion order): a bound, not an LRU.
                del self._verified[next(iter(self._verified))]
            self._verified[token] = verified
        return verified.principal

    # --- keys from a JWKS: what the interceptor asks before a call is verified --------------

    def wants_fresh_keys(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        """Whether a call should wait for the JWKS to be fetched: the set is stale, or the call's
        token (not verified before) names a kid that no trusted key has. Cheap: no signature."""
        if self.jwks is None:
            return False
        if self.jwks.is_stale():
            return True
        try:
            token = bearer_token(metadata)
        except Unauthenticated:
            return False
        if token in self._verified or len(token) > MAX_TOKEN_LENGTH:
            return False
        kid = _unverified_key_id(token)
        known = kid is None or kid in self.jwks.keys or kid in self._static_keys
        return not known and self.jwks.may_fetch_for_unknown_kid()

    async def refresh_keys(self) -> None:
        assert self.jwks is not None
        await self.jwks.refresh()

    def _trusted(self, key: VerificationKey) -> bool:
        if self._static_keys.get(key.key_id) is key:
            return True
        return self.jwks is not None and self.jwks.keys.get(key.key_id) is key

    def _candidates(self, kid: object, algorithm: str) -> list[VerificationKey]:
        """The keys to try, all of the token's algorithm: the one named by its kid; else, for a
        kid unknown or absent, the PEM keys (a provider's kid means nothing to a PEM file), and
        with no kid at all the JWKS keys too."""
        jwks_keys: Mapping[str, VerificationKey] = {} if self.jwks is None else self.jwks.keys
        if isinstance(kid, str):
            named = [keys[kid] for keys in (self._static_keys, jwks_keys) if kid in keys]
            if named:
                return [key for key in named if key.algorithm == algorithm]
        pool = list(self._static_keys.values())
        if kid is None:
            pool += list(jwks_keys.values())
        return [key for key in pool if key.algorithm == algorithm]

    # --- one token ---------------------------------------------------------------------------

    def _verify_signed(self, token: str) -> _Verified:
        """What a token whose signature and claims check out verifies to."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid")
        candidates = self._candidates(header.get("kid"), algorithm)
        if not candidates:
            raise Unauthenticated("TOKEN_INVALID", "the bearer token is signed with an unknown key")
        claims, key = self._decode(token, candidates)
        subject = _claim(claims, self._settings.subject_claim)
        roles = _claim(claims, self._settings.roles_claim)
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(subject, str) or not subject or not isinstance(roles, list):
            raise Unauthenticated("TOKEN_INVALID", "the bearer token lacks a subject or roles")
        # Unknown roles grant nothing; a token with none is valid and may call nothing.
        principal = Principal(subject, frozenset(r for r in roles if isinstance(r, str) and r in ROLES))
        # PyJWT has checked `exp` as `int(exp)` does (which also takes "123" and 1.5): the same here.
        return _Verified(principal, float(int(claims["exp"])) + self._settings.clock_skew_s, key)

    def _decode(self, token: str, candidates: Sequence[VerificationKey]) -> tuple[dict[str, Any], VerificationKey]:
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self._settings.audience,
                    issuer=self._settings.issuer,
                    leeway=self._settings.clock_skew_s,
                    options={"require": ["exp", "iat", "iss", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe the next key (rotation); no key at all falls through below
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("TOKEN_EXPIRED", "the bearer token has expired") from None
            except jwt.InvalidTokenError:
                raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid") from None
            return claims, key
        raise Unauthenticated("TOKEN_INVALID", "the bearer token is not valid")


def _unverified_key_id(token: str) -> object:
    try:
        return jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        return None


def _claim(claims: Mapping[str, Any], name: str) -> object:
    """A claim by its name, or by a dotted path into nested claims when no claim has that name."""
    if name in claims:
        return claims[name]
    value: object = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


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


def _open_to_anyone(principal: Principal, request: Any) -> bool:
    return True


# The rule of an RPC anyone may call without a token: the request itself carries its credential
# (a calendar feed's token, which calendar apps put in the URL since they cannot send headers).
OPEN_TO_ANYONE: Rule = _open_to_anyone


def anyone_with(*roles: str) -> Rule:
    assert set(roles) <= ROLES

    def rule(principal: Principal, request: Any) -> bool:
        return any(principal.has(role) for role in roles)

    return rule


def own(role: str, field: str) -> Rule:
    """The caller has `role` and the request's `field` (a dotted path, a UUID) names the caller.
    A caller with the role whose request's id is malformed (or missing) gets INVALID_ARGUMENT
    naming the field, as the handler would answer: a malformed value is not a question of rights."""
    assert role in ROLES
    path = field.split(".")

    def rule(principal: Principal, request: Any) -> bool:
        if not principal.has(role):
            return False
        value = request
        for part in path:
            value = getattr(value, part)
        checks = Checks()
        checks.uuid(field, value if isinstance(value, str) else "")
        checks.done()
        return principal.is_subject(value)

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

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """What must run before the interceptor that calls `admit`: with a JWKS, the fetching
        of its keys (asynchronous, so that `admit` never waits on the network)."""
        if self._verifier is None or self._verifier.jwks is None:
            return []
        return [JwksRefresher(self._verifier)]

    @property
    def required(self) -> bool:
        return self._verifier is not None

    def admit(
        self, service: str, rpc: str, request: Any, metadata: Iterable[tuple[str, str | bytes]]
    ) -> Principal | None:
        """The caller of an RPC of this service, allowed to make it; None for the open services."""
        if service in OPEN_SERVICES:
            return None
        if service == self._service_name and self._rules.get(rpc) is OPEN_TO_ANYONE:
            return None  # no token asked, none read: the handler checks the request's own credential
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
