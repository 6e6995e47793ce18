"""Booking service settings, read once from the environment (BOOKING_* variables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from booking_service import webhooks
from service_kit import config
from service_kit.auth import AuthSettings, load_private_key
from service_kit.batching import BatchSettings
from service_kit.config import ServerSettings
from service_kit.tls import ClientTls

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
# The metrics side port (deploy/k8s names it `metrics`); BOOKING_METRICS_ADDRESS=off turns it off.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9465"
# The plaintext health-only port, served by default only when the gRPC port is TLS.
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:8081"
DEFAULT_CREDIT_TARGET = "127.0.0.1:50052"
# Crash points exist for fault-injection tests only (`BOOKING_CRASH_POINTS`); production never sets them.
CRASH_POINTS = ("after_reserve", "after_booking_commit", "before_commit_reservation")
NOTIFICATION_SINKS = ("log", "webhook")
# `local` needs no network (`make run` works offline); production sets `daily`.
VIDEO_PROVIDERS = ("local", "daily", "none")
DEFAULT_DAILY_API_URL = "https://api.daily.co/v1"
# A request's answer is kept at least a day (docs/design.md, "One answer per request").
MINIMUM_REQUEST_RETENTION_HOURS = 24
# The previous version's decision log must outlive every hold it decides: the credit service
# accepts holds of up to 7 days (CREDIT_RESERVATION_TTL_S), so a day more than that.
MINIMUM_PREVIOUS_VERSION_RETENTION_HOURS = 8 * 24
# A delivered event is kept an hour at least, so that a delivery racing its own lease finds it.
MINIMUM_DELIVERED_RETENTION_HOURS = 1
MAXIMUM_RETENTION_HOURS = 10 * 365 * 24


@dataclass(frozen=True)
class RetentionSettings:
    """What the retention worker purges, and when (docs/operations.md, "Retention"). Every bound
    counts from the row's own time: an answer's recording, an event's delivery or death, the
    previous version's binding or decision."""

    enabled: bool
    interval_s: float
    # Rows per statement: each batch is one short statement, whatever the backlog.
    batch_size: int
    # The request-id retention: a request's recorded answer (a refusal, a reschedule's result).
    request_retention_hours: float
    delivered_retention_hours: float
    # Dead letters whose booking's payment is settled (those that are not are kept until it is).
    dead_letter_retention_hours: float
    # The rolling-upgrade window: the previous version's request ids and decisions. Never shorter
    # than the request-id retention, which also covers the previous version's request ids.
    previous_version_retention_hours: float

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> RetentionSettings:
        def hours(name: str, default: float, minimum: float) -> float:
            return config.number(env, name, default, minimum=minimum, maximum=MAXIMUM_RETENTION_HOURS)

        settings = cls(
            enabled=config.boolean(env, "BOOKING_RETENTION_ENABLED", True),
            interval_s=config.number(env, "BOOKING_RETENTION_INTERVAL_S", 60.0, minimum=0.05, maximum=86400.0),
            batch_size=config.integer(env, "BOOKING_RETENTION_BATCH_SIZE", 1000, minimum=1, maximum=10_000),
            request_retention_hours=hours("BOOKING_REQUEST_RETENTION_HOURS", 7 * 24, MINIMUM_REQUEST_RETENTION_HOURS),
            delivered_retention_hours=hours(
                "BOOKING_OUTBOX_DELIVERED_RETENTION_HOURS", 7 * 24, MINIMUM_DELIVERED_RETENTION_HOURS
            ),
            dead_letter_retention_hours=hours(
                "BOOKING_OUTBOX_DEAD_RETENTION_HOURS", 90 * 24, MINIMUM_DELIVERED_RETENTION_HOURS
            ),
            previous_version_retention_hours=hours(
                "BOOKING_PREVIOUS_VERSION_RETENTION_HOURS", 14 * 24, MINIMUM_PREVIOUS_VERSION_RETENTION_HOURS
            ),
        )
        if settings.dead_letter_retention_hours < settings.delivered_retention_hours:
            raise config.ConfigError(
                "BOOKING_OUTBOX_DEAD_RETENTION_HOURS must be at least BOOKING_OUTBOX_DELIVERED_RETENTION_HOURS: "
                "dead letters need a person, and are kept longer than delivered events"
            )
        return settings


class Secret(str):
    """A string that never shows itself in a repr (settings, tracebacks, log lines)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True)
class BookingSettings:
    server: ServerSettings
    auth: AuthSettings
    credit_target: str
    # None: the channel to credit is plaintext. Else TLS, mutual with a client certificate.
    credit_tls: ClientTls | None
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
    # Delays of the outbox: backoff with jitter from the base up to the max, which also bounds
    # a provider's Retry-After.
    outbox_base_delay_s: float
    outbox_max_delay_s: float
    crash_points: frozenset[str]
    notification_sink: str
    # BOOKING_WEBHOOK_URL and its secret: the endpoint made at the first start when the sink is
    # `webhook` (then managed like any other: docs/notifications.md).
    webhook_url: str
    webhook_secret: Secret
    # How long the webhook delivery log (attempts, delivered retries) is kept.
    webhook_log_retention_s: float
    video_provider: str
    daily_api_url: str
    daily_api_key: Secret
    # A room opens this long before its session starts and expires this long after it ends.
    video_opens_before_s: int
    video_expires_after_s: int
    # Bound on one HTTP call of a side effect (connect, read, write, pool wait each).
    side_effect_http_timeout_s: float
    # The booking service's own identity towards the credit service (role `service`): a token
    # minted from this private key, or a pre-made one; neither: calls carry no token (only for a
    # credit service with authentication disabled).
    service_token_private_key: Ed25519PrivateKey | None
    service_token: str | None
    service_token_ttl_s: float
    service_name: str
    # Concurrent bookings' steps are coalesced into batches (service_kit/batching.py).
    batching: BatchSettings
    # Therapists whose schedules (the rules' inputs) are kept in memory, checked against the
    # database's version at every claim (migration 0004).
    context_cache_size: int
    # Sessions nobody marked become COMPLETED this long after their end (the sweeper, every
    # outcome_sweep_interval_s).
    outcome_sweep_after_s: float
    outcome_sweep_interval_s: float
    # Reminders this long before each session's start (none: no reminders), checked every
    # reminder_interval_s.
    reminder_offsets_s: tuple[int, ...]
    reminder_interval_s: float
    # A calendar feed shows the bookings from this many weeks back to this many ahead.
    calendar_past_weeks: int
    calendar_future_weeks: int
    # A waitlist offer holds its slot this long; the waitlist worker runs this often.
    waitlist_offer_hold_s: float
    waitlist_interval_s: float
    # The outbox retries a reservation's commit only this long after its booking was decided:
    # the inline commit is normally done by then (a longer call has timed out long before).
    commit_retry_after_s: float
    retention: RetentionSettings

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> BookingSettings:
        crash_points = frozenset(p.strip() for p in env.get("BOOKING_CRASH_POINTS", "").split(",") if p.strip())
        unknown = crash_points - set(CRASH_POINTS)
        if unknown:
            raise config.ConfigError(
                f"BOOKING_CRASH_POINTS has unknown points {sorted(unknown)}; known: {CRASH_POINTS}"
            )
        return cls(
            server=ServerSettings.from_environment(
                env, "BOOKING", DEFAULT_GRPC_ADDRESS, DEFAULT_METRICS_ADDRESS, DEFAULT_HEALTH_ADDRESS
            ),
            auth=AuthSettings.from_environment(env),
            credit_target=config.text(env, "BOOKING_CREDIT_TARGET", DEFAULT_CREDIT_TARGET),
            credit_tls=ClientTls.from_environment(env, "BOOKING_CREDIT"),
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
            outbox_base_delay_s=config.number(env, "BOOKING_OUTBOX_BASE_DELAY_S", 1.0, minimum=0.01, maximum=600.0),
            outbox_max_delay_s=config.number(env, "BOOKING_OUTBOX_MAX_DELAY_S", 300.0, minimum=0.1, maximum=86400.0),
            crash_points=crash_points,
            **_side_effects(env),
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
            batching=BatchSettings.from_environment(env, "BOOKING"),
            context_cache_size=config.integer(env, "BOOKING_CONTEXT_CACHE_SIZE", 4096, minimum=0, maximum=1_000_000),
            commit_retry_after_s=config.number(env, "BOOKING_COMMIT_RETRY_AFTER_S", 10.0, minimum=0.0, maximum=3600.0),
            retention=RetentionSettings.from_environment(env),
            outcome_sweep_after_s=config.number(
                env, "BOOKING_OUTCOME_SWEEP_AFTER_S", 172_800.0, minimum=0.0, maximum=90 * 86400.0
            ),
            outcome_sweep_interval_s=config.number(
                env, "BOOKING_OUTCOME_SWEEP_INTERVAL_S", 300.0, minimum=0.05, maximum=86400.0
            ),
            reminder_offsets_s=_reminder_offsets(env),
            reminder_interval_s=config.number(env, "BOOKING_REMINDER_INTERVAL_S", 30.0, minimum=0.05, maximum=3600.0),
            calendar_past_weeks=config.integer(env, "BOOKING_CALENDAR_PAST_WEEKS", 4, minimum=0, maximum=52),
            calendar_future_weeks=config.integer(env, "BOOKING_CALENDAR_FUTURE_WEEKS", 26, minimum=1, maximum=104),
            waitlist_offer_hold_s=config.number(
                env, "BOOKING_WAITLIST_OFFER_HOLD_S", 900.0, minimum=10.0, maximum=86400.0
            ),
            waitlist_interval_s=config.number(env, "BOOKING_WAITLIST_INTERVAL_S", 10.0, minimum=0.05, maximum=3600.0),
        )


def _side_effects(env: Mapping[str, str]) -> dict[str, Any]:
    sink = config.choice(env, "BOOKING_NOTIFICATION_SINK", "log", NOTIFICATION_SINKS)
    provider = config.choice(env, "BOOKING_VIDEO_PROVIDER", "local", VIDEO_PROVIDERS)
    webhook_url = env.get("BOOKING_WEBHOOK_URL", "")
    webhook_secret = Secret(env.get("BOOKING_WEBHOOK_SECRET", ""))
    if sink == "webhook":
        _require_http_url("BOOKING_WEBHOOK_URL", webhook_url)
        if not webhook_secret:
            raise config.ConfigError("BOOKING_WEBHOOK_SECRET is required when BOOKING_NOTIFICATION_SINK=webhook")
        try:
            webhooks.key_of(webhook_secret)
        except webhooks.InvalidSecret as error:
            raise config.ConfigError(
                f"BOOKING_WEBHOOK_SECRET is not a Standard Webhooks secret ({error}); make one with "
                "`python -m booking_service.webhooks`"
            ) from None
    daily_api_url = env.get("BOOKING_DAILY_API_URL") or DEFAULT_DAILY_API_URL
    daily_api_key = Secret(env.get("BOOKING_DAILY_API_KEY", ""))
    if provider == "daily":
        _require_http_url("BOOKING_DAILY_API_URL", daily_api_url)
        if not daily_api_key:
            raise config.ConfigError("BOOKING_DAILY_API_KEY is required when BOOKING_VIDEO_PROVIDER=daily")
    return {
        "notification_sink": sink,
        "webhook_url": webhook_url,
        "webhook_secret": webhook_secret,
        "webhook_log_retention_s": 3600.0
        * config.number(env, "BOOKING_WEBHOOK_LOG_RETENTION_H", 168.0, minimum=1.0, maximum=24.0 * 90),
        "video_provider": provider,
        "daily_api_url": daily_api_url.rstrip("/"),
        "daily_api_key": daily_api_key,
        "video_opens_before_s": config.integer(env, "BOOKING_VIDEO_OPENS_BEFORE_S", 600, minimum=0, maximum=86400),
        "video_expires_after_s": config.integer(
            env, "BOOKING_VIDEO_EXPIRES_AFTER_S", 3600, minimum=60, maximum=7 * 86400
        ),
        "side_effect_http_timeout_s": config.number(
            env, "BOOKING_SIDE_EFFECT_HTTP_TIMEOUT_S", 5.0, minimum=0.1, maximum=60.0
        ),
    }


# At most this many reminders per session, each at most 30 days before it.
MAX_REMINDER_OFFSETS = 5
MAX_REMINDER_OFFSET_S = 30 * 86400


def _reminder_offsets(env: Mapping[str, str]) -> tuple[int, ...]:
    """BOOKING_REMINDER_OFFSETS_S: comma-separated seconds before the start (default 24 h and 1 h);
    empty: no reminders."""
    text = env.get("BOOKING_REMINDER_OFFSETS_S", "86400,3600")
    try:
        offsets = tuple(sorted({int(part) for part in text.split(",") if part.strip()}, reverse=True))
    except ValueError:
        raise config.ConfigError("BOOKING_REMINDER_OFFSETS_S must be whole seconds, comma-separated") from None
    if len(offsets) > MAX_REMINDER_OFFSETS or any(not 0 < o <= MAX_REMINDER_OFFSET_S for o in offsets):
        raise config.ConfigError(
            f"BOOKING_REMINDER_OFFSETS_S: at most {MAX_REMINDER_OFFSETS} offsets, each 1 to {MAX_REMINDER_OFFSET_S} s"
        )
    return offsets


def _require_http_url(name: str, value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise config.ConfigError(f"{name} must be an http:// or https:// URL")
