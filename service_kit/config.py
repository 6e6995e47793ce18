"""Reading settings from the environment: explicit, typed, bounded, with errors naming the variable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service_kit.tls import ServerTls


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def text(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None or value == "":
        raise ConfigError(f"{name} is required")
    return value


def integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def number(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def listen_address(env: Mapping[str, str], name: str, default: str) -> str | None:
    """A `host:port` to listen on, or None when the value is `off` (or set but empty)."""
    raw = env.get(name, default).strip()
    if raw in ("", "off"):
        return None
    host, separator, port = raw.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port (or off), got {raw!r}")
    return raw


def choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class ServerSettings:
    """What every service needs to serve: address, database, limits. Units are in the names."""

    grpc_address: str
    # None: the gRPC port is plaintext. Else TLS, mutual when it names a client CA (service_kit/tls.py).
    tls: ServerTls | None
    # A second, plaintext port serving grpc.health.v1 only, for probes that cannot speak TLS
    # (Kubernetes' native gRPC probes); None: not served. On by default only with TLS.
    health_address: str | None
    database_url: str
    database_pool_min_size: int
    database_pool_max_size: int
    database_command_timeout_s: float
    migrate_on_start: bool
    health_check_interval_s: float
    shutdown_grace_s: float
    default_rpc_deadline_s: float
    max_message_bytes: int
    max_concurrent_rpcs: int
    # One caller (a token's subject) cannot take every slot: RESOURCE_EXHAUSTED past this.
    max_concurrent_rpcs_per_caller: int
    reflection_enabled: bool
    # Where /metrics is served (Prometheus text format); None: not served.
    metrics_address: str | None
    # How often the gauges read from the database through an index (pending outbox rows and
    # reservations) are refreshed, and how often those that read a whole table (dead letters,
    # reservations by every state) are.
    metrics_refresh_interval_s: float
    metrics_scan_interval_s: float
    log_format: str
    log_level: str

    @classmethod
    def from_environment(
        cls,
        env: Mapping[str, str],
        prefix: str,
        default_address: str,
        default_metrics_address: str = "off",
        default_health_address: str = "off",
    ) -> ServerSettings:
        """Reads `<PREFIX>_*` variables; DATABASE_URL is the fallback for the database.
        `default_health_address` applies only when the gRPC port is TLS."""
        # Here rather than at the top: service_kit.tls imports ConfigError from this module.
        from service_kit.tls import ServerTls  # noqa: PLC0415

        def key(name: str) -> str:
            return f"{prefix}_{name}"

        tls = ServerTls.from_environment(env, prefix)

        database_url = env.get(key("DATABASE_URL")) or env.get("DATABASE_URL")
        if not database_url:
            raise ConfigError(f"{key('DATABASE_URL')} (or DATABASE_URL) is required")
        pool_max = integer(env, key("DATABASE_POOL_MAX_SIZE"), 10, minimum=1, maximum=200)
        return cls(
            grpc_address=text(env, key("GRPC_ADDRESS"), default_address),
            tls=tls,
            health_address=listen_address(
                env, key("HEALTH_ADDRESS"), default_health_address if tls is not None else "off"
            ),
            database_url=database_url,
            database_pool_min_size=integer(env, key("DATABASE_POOL_MIN_SIZE"), 1, minimum=0, maximum=pool_max),
            database_pool_max_size=pool_max,
            database_command_timeout_s=number(env, key("DATABASE_COMMAND_TIMEOUT_S"), 10.0, minimum=0.1, maximum=300.0),
            migrate_on_start=boolean(env, key("MIGRATE_ON_START"), True),
            health_check_interval_s=number(env, key("HEALTH_CHECK_INTERVAL_S"), 5.0, minimum=0.1, maximum=300.0),
            # Below Kubernetes' default terminationGracePeriodSeconds of 30 s.
            shutdown_grace_s=number(env, key("SHUTDOWN_GRACE_S"), 10.0, minimum=0.0, maximum=120.0),
            # Transcoded HTTP calls arrive without a deadline (docs/conventions.md): give them one.
            default_rpc_deadline_s=number(env, key("DEFAULT_RPC_DEADLINE_S"), 10.0, minimum=0.1, maximum=300.0),
            max_message_bytes=integer(
                env, key("MAX_MESSAGE_BYTES"), 1024 * 1024, minimum=4096, maximum=64 * 1024 * 1024
            ),
            max_concurrent_rpcs=integer(env, key("MAX_CONCURRENT_RPCS"), 1000, minimum=1, maximum=100_000),
            max_concurrent_rpcs_per_caller=integer(
                env, key("MAX_CONCURRENT_RPCS_PER_CALLER"), 64, minimum=1, maximum=100_000
            ),
            reflection_enabled=boolean(env, key("REFLECTION_ENABLED"), True),
            metrics_address=listen_address(env, key("METRICS_ADDRESS"), default_metrics_address),
            metrics_refresh_interval_s=number(
                env, key("METRICS_REFRESH_INTERVAL_S"), 5.0, minimum=0.05, maximum=3600.0
            ),
            metrics_scan_interval_s=number(env, key("METRICS_SCAN_INTERVAL_S"), 60.0, minimum=0.05, maximum=86400.0),
            log_format=choice(env, "LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        )
