"""Booking service settings, read once from the environment (BOOKING_* variables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service_kit import config
from service_kit.auth import AuthSettings, load_private_key
from service_kit.config import ServerSettings

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
# The metrics side port (deploy/k8s names it `metrics`); BOOKING_METRICS_ADDRESS=off turns it off.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9465"
DEFAULT_CREDIT_TARGET = "127.0.0.1:50052"
# Crash points exist for fault-injection tests only (`BOOKING_CRASH_POINTS`); production never sets them.
CRASH_POINTS = ("after_reserve", "after_booking_commit", "before_commit_reservation")


@dataclass(frozen=True)
class BookingSettings:
    server: ServerSettings
    auth: AuthSettings
    credit_target: str
    credit_call_timeout_s: float
    # Holding the therapist's lock longer than this means something is wrong: refuse, don't queue.
    lock_timeout_ms: int
    free_cancellation_hours: float
    reconcile_interval_s: float
    # A PENDING reservation younger than this may still be in a live booking call: leave it alone.
    reconcile_after_s: float
    reconcile_batch_size: int
    # Off only to prove that the fault-injection harness catches a build without recovery
    # (`python -m tests.chaos --no-reconciler`); production never turns it off.
    reconciler_enabled: bool
    outbox_interval_s: float
    outbox_batch_size: int
    outbox_max_attempts: int
    outbox_lease_s: float
    crash_points: frozenset[str]
    # The booking service's own identity towards the credit service (role `service`): a token
    # minted from this private key, or a pre-made one; neither: calls carry no token (only for a
    # credit service with authentication disabled).
    service_token_private_key: Ed25519PrivateKey | None
    service_token: str | None
    service_token_ttl_s: float
    service_name: str

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> BookingSettings:
        crash_points = frozenset(p.strip() for p in env.get("BOOKING_CRASH_POINTS", "").split(",") if p.strip())
        unknown = crash_points - set(CRASH_POINTS)
        if unknown:
            raise config.ConfigError(
                f"BOOKING_CRASH_POINTS has unknown points {sorted(unknown)}; known: {CRASH_POINTS}"
            )
        return cls(
            server=ServerSettings.from_environment(env, "BOOKING", DEFAULT_GRPC_ADDRESS, DEFAULT_METRICS_ADDRESS),
            auth=AuthSettings.from_environment(env),
            credit_target=config.text(env, "BOOKING_CREDIT_TARGET", DEFAULT_CREDIT_TARGET),
            credit_call_timeout_s=config.number(env, "BOOKING_CREDIT_CALL_TIMEOUT_S", 3.0, minimum=0.05, maximum=60.0),
            lock_timeout_ms=config.integer(env, "BOOKING_LOCK_TIMEOUT_MS", 3000, minimum=10, maximum=60_000),
            free_cancellation_hours=config.number(
                env, "BOOKING_FREE_CANCELLATION_HOURS", 24.0, minimum=0.0, maximum=24.0 * 30
            ),
            reconcile_interval_s=config.number(env, "BOOKING_RECONCILE_INTERVAL_S", 10.0, minimum=0.05, maximum=3600.0),
            reconcile_after_s=config.number(env, "BOOKING_RECONCILE_AFTER_S", 60.0, minimum=0.0, maximum=86400.0),
            reconcile_batch_size=config.integer(env, "BOOKING_RECONCILE_BATCH_SIZE", 100, minimum=1, maximum=500),
            reconciler_enabled=config.boolean(env, "BOOKING_RECONCILER_ENABLED", True),
            outbox_interval_s=config.number(env, "BOOKING_OUTBOX_INTERVAL_S", 1.0, minimum=0.01, maximum=600.0),
            outbox_batch_size=config.integer(env, "BOOKING_OUTBOX_BATCH_SIZE", 50, minimum=1, maximum=1000),
            outbox_max_attempts=config.integer(env, "BOOKING_OUTBOX_MAX_ATTEMPTS", 12, minimum=1, maximum=100),
            outbox_lease_s=config.number(env, "BOOKING_OUTBOX_LEASE_S", 30.0, minimum=1.0, maximum=3600.0),
            crash_points=crash_points,
            service_token_private_key=(
                load_private_key(
                    Path(env["BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE"]), "BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE"
                )
                if env.get("BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE")
                else None
            ),
            service_token=env.get("BOOKING_SERVICE_TOKEN") or None,
            service_token_ttl_s=config.number(env, "BOOKING_SERVICE_TOKEN_TTL_S", 300.0, minimum=10.0, maximum=86400.0),
            service_name=config.text(env, "BOOKING_SERVICE_NAME", "booking-service"),
        )
