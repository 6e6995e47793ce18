"""Wiring of the credit service: database, servicer, sweeper, metrics, server lifecycle."""

from __future__ import annotations

from credit.v1 import credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.metrics import CreditMetrics
from credit_service.service import CreditService
from credit_service.servicer import ACCESS_RULES, ERROR_CODES, ERROR_DOMAIN, SERVICE_NAME, CreditServicer
from credit_service.store import SCHEMA
from service_kit import migrations
from service_kit.database import Database
from service_kit.server import Runtime, ServiceDefinition, ServiceParts
from service_kit.workers import periodic

DEFINITION = ServiceDefinition(
    service_name=SERVICE_NAME, error_domain=ERROR_DOMAIN, error_codes=ERROR_CODES, access_rules=ACCESS_RULES
)


def build_runtime(settings: CreditSettings) -> tuple[Runtime, CreditService]:
    database = Database(settings.server, SCHEMA, migrations.load("credit_service"))
    service = CreditService(database, reservation_ttl_s=settings.reservation_ttl_s)
    return Runtime(settings.server, DEFINITION, database, settings.auth), service


async def start(settings: CreditSettings) -> Runtime:
    """Starts serving; returns the runtime (its `port`, its `stop()`)."""
    runtime, service = build_runtime(settings)
    metrics = CreditMetrics(runtime.registry)

    async def sweep() -> bool:
        released = await service.release_expired(settings.sweep_batch_size)
        return released == settings.sweep_batch_size

    def parts(_: Database) -> ServiceParts:
        return ServiceParts(
            register=lambda server: credit_pb2_grpc.add_CreditServiceServicer_to_server(
                CreditServicer(service), server
            ),
            workers=[
                periodic("reservation_sweeper", settings.sweep_interval_s, sweep),
                metrics.refresher(runtime.database, settings.server),
            ],
        )

    await runtime.start(parts)
    return runtime
