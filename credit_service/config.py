"""Credit service settings, read once from the environment (CREDIT_* variables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service_kit import config
from service_kit.auth import AuthSettings
from service_kit.config import ServerSettings

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50052"
# The metrics side port (deploy/k8s names it `metrics`); CREDIT_METRICS_ADDRESS=off turns it off.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
# The plaintext health-only port, served by default only when the gRPC port is TLS.
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:8082"


@dataclass(frozen=True)
class CreditSettings:
    server: ServerSettings
    auth: AuthSettings
    # A hold nobody commits or cancels goes back to available after this long. Generous: the
    # booking service's reconciler resolves stuck holds within minutes; this is the last resort
    # for a coordinator that never comes back.
    reservation_ttl_s: float
    sweep_interval_s: float
    sweep_batch_size: int

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> CreditSettings:
        return cls(
            server=ServerSettings.from_environment(
                env, "CREDIT", DEFAULT_GRPC_ADDRESS, DEFAULT_METRICS_ADDRESS, DEFAULT_HEALTH_ADDRESS
            ),
            auth=AuthSettings.from_environment(env),
            reservation_ttl_s=config.number(env, "CREDIT_RESERVATION_TTL_S", 3600.0, minimum=1.0, maximum=7 * 86400.0),
            sweep_interval_s=config.number(env, "CREDIT_SWEEP_INTERVAL_S", 10.0, minimum=0.05, maximum=3600.0),
            sweep_batch_size=config.integer(env, "CREDIT_SWEEP_BATCH_SIZE", 100, minimum=1, maximum=10_000),
        )
