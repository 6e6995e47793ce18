"""The signing keys an identity provider publishes as a JWKS, fetched, cached and refreshed.

PyJWT's `PyJWKClient` fetches and parses the set (with its timeout); this module decides when:
the set is used for `cache_s`, then fetched again; a token naming a `kid` that the set lacks makes
it fetched again at once (a key rotated in at the provider is accepted without a restart), but
at most once per `min_refresh_interval_s`, so that tokens with made-up `kid`s cannot turn every
call into a request to the provider. A failed fetch keeps the last good set (an outage of the
provider does not log everybody out) and is tried again after the same interval; with no good
set at all, no token verifies (fail closed).

Fetches run on a worker thread (PyJWKClient is blocking), one at a time; a call that needs them
waits at most the timeout. `JwksRefresher` is the gRPC server interceptor that does this waiting
before the call's token is verified, so that verification itself (`service_kit.auth`) stays a
cheap, synchronous lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import jwt
import structlog

from service_kit.config import ConfigError

if TYPE_CHECKING:
    from service_kit.auth import TokenVerifier, VerificationKey

log = structlog.get_logger()

# Past this many keys a set is not a provider's: the rest are ignored (each is tried for a token
# without a kid).
MAX_KEYS = 50
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_USER_AGENT = "therapy-booking-jwks/1"


@dataclass(frozen=True)
class JwksSettings:
    url: str
    # How long a fetched set is used before it is fetched again: the bound on how long a key the
    # provider removed is still accepted.
    cache_s: float = 300.0
    # The least time between two fetches that a call waits for (unknown kid, or a failed fetch).
    min_refresh_interval_s: float = 30.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        assert self.cache_s > 0 and self.min_refresh_interval_s >= 0 and self.timeout_s > 0


def check_jwks_url(url: str, source: str) -> str:
    """HTTPS, or HTTP on loopback only (a provider on the same machine, or a test's)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("https", "http"):
        raise ConfigError(f"{source} must be an https:// URL, got {url!r}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ConfigError(f"{source} must use https (plain http only on loopback), got {url!r}")
    return url


class JwksKeys:
    """The current keys of one JWKS URL, by kid."""

    def __init__(
        self,
        settings: JwksSettings,
        *,
        to_verification_key: Callable[[jwt.PyJWK], VerificationKey | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._to_verification_key = to_verification_key
        # The caches of the client are off: this class decides when to fetch.
        self._client = jwt.PyJWKClient(
            settings.url,
            cache_keys=False,
            cache_jwk_set=False,
            timeout=settings.timeout_s,
            headers={"User-Agent": _USER_AGENT},
        )
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at_s: float | None = None
        self._attempted_at_s = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def keys(self) -> Mapping[str, VerificationKey]:
        return self._keys

    def is_stale(self) -> bool:
        """No set yet, or the set is older than cache_s, and a fetch is allowed now."""
        now_s = self._clock()
        old = self._fetched_at_s is None or now_s - self._fetched_at_s >= self._settings.cache_s
        return old and self._may_fetch(now_s)

    def may_fetch_for_unknown_kid(self) -> bool:
        return self._may_fetch(self._clock())

    def _may_fetch(self, now_s: float) -> bool:
        return now_s - self._attempted_at_s >= self._settings.min_refresh_interval_s

    async def refresh(self) -> None:
        """Fetch the set again (one fetch at a time: a caller that waited for another's is done)."""
        attempted_before = self._attempted_at_s
        async with self._lock:
            if self._attempted_at_s != attempted_before:
                return  # another call fetched while this one waited
            self._attempted_at_s = self._clock()
            try:
                async with asyncio.timeout(self._settings.timeout_s * 2):
                    jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
            except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.InvalidKeyError, TimeoutError, ValueError) as error:
                # The last good set stays; a token it cannot verify is refused.
                log.warning("jwks_fetch_failed", url=self._settings.url, error=_describe(error))
                return
            self._keys = self._usable(jwk_set.keys)
            self._fetched_at_s = self._clock()
            log.info("jwks_keys_fetched", url=self._settings.url, key_ids=sorted(self._keys))

    def _usable(self, keys: list[jwt.PyJWK]) -> dict[str, VerificationKey]:
        usable: dict[str, VerificationKey] = {}
        for jwk in keys[:MAX_KEYS]:
            if jwk.public_key_use not in (None, "sig") or not jwk.key_id:
                continue
            key = self._to_verification_key(jwk)
            if key is not None:
                usable[key.key_id] = key
        return usable


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text[:300]


class JwksRefresher(grpc.aio.ServerInterceptor):
    """Before a call is verified: wait for a fresh key set when the set is stale, or when the
    call's token names a kid the set lacks (both rate-limited by JwksKeys)."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self._verifier.wants_fresh_keys(handler_call_details.invocation_metadata or ()):
            await self._verifier.refresh_keys()
        return await continuation(handler_call_details)
