"""Wiring of the booking service: database, credit client, servicer, reconciler, outbox worker, metrics."""

from __future__ import annotations

import structlog

from booking.v1 import booking_pb2_grpc
from booking_service import side_effects
from booking_service.access import ACCESS_RULES
from booking_service.config import BookingSettings
from booking_service.credits import CreditClient
from booking_service.metrics import BookingMetrics
from booking_service.service import BookingService
from booking_service.servicer import ERROR_CODES, ERROR_DOMAIN, SERVICE_NAME, BookingServicer
from booking_service.store import SCHEMA
from service_kit import migrations
from service_kit.auth import ServiceToken
from service_kit.database import Database
from service_kit.server import Runtime, ServiceDefinition, ServiceParts, Worker
from service_kit.tls import channel_transport
from service_kit.workers import periodic

log = structlog.get_logger()

DEFINITION = ServiceDefinition(
    service_name=SERVICE_NAME, error_domain=ERROR_DOMAIN, error_codes=ERROR_CODES, access_rules=ACCESS_RULES
)


def service_token(settings: BookingSettings) -> ServiceToken | None:
    """This service's own identity towards the credit service (a minted key wins over a fixed token)."""
    key = settings.service_token_private_key
    if key is None and settings.service_token is None:
        log.warning("no_service_token", detail="calls to the credit service carry no token")
        return None
    return ServiceToken(
        private_key=key,
        fixed_token=settings.service_token if key is None else None,
        subject=settings.service_name,
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        ttl_s=settings.service_token_ttl_s,
    )


def _log_credit_channel(settings: BookingSettings) -> None:
    """Whether the calls to credit are plaintext, TLS or mutual TLS (never any key material)."""
    tls = settings.credit_tls
    certificate = tls.certificate if tls is not None else None
    log.info(
        "credit_client_configured",
        target=settings.credit_target,
        transport=channel_transport(tls).value,
        server_name=tls.server_name if tls is not None else None,
        **(certificate.log_fields("client_certificate") if certificate is not None else {}),
    )


async def start(settings: BookingSettings) -> Runtime:
    """Starts serving; returns the runtime (its `port`, its `stop()`)."""
    database = Database(settings.server, SCHEMA, migrations.load("booking_service"))
    runtime = Runtime(settings.server, DEFINITION, database, settings.auth)
    metrics = BookingMetrics(runtime.registry)
    credits = CreditClient(
        settings.credit_target,
        call_timeout_s=settings.credit_call_timeout_s,
        interceptors=runtime.client_interceptors(),
        token=service_token(settings),
        batching=settings.batching,
        batch_observer=metrics.batch_finished,
        tls=settings.credit_tls,
    )
    _log_credit_channel(settings)
    notifier = side_effects.notifier_from(settings)
    video = side_effects.video_provider_from(settings)
    service = BookingService(database, credits, settings, metrics=metrics, notifier=notifier, video=video)

    workers: list[Worker] = []
    if settings.reconciler_enabled:
        workers.append(periodic("reconciler", settings.reconcile_interval_s, service.reconciler.reconcile_once))
    else:
        log.warning("reconciler_disabled", detail="stale credit holds will not be resolved")
    workers.append(periodic("outbox", settings.outbox_interval_s, service.outbox.deliver_once))
    workers.append(periodic("webhooks", settings.outbox_interval_s, service.webhook_delivery.deliver_due_once))
    if settings.retention.enabled:
        workers.append(periodic("retention", settings.retention.interval_s, service.retention.purge_once))
    else:
        log.warning("retention_disabled", detail="request answers, delivered events and dead letters are kept for ever")
    workers.append(periodic("outcome_sweeper", settings.outcome_sweep_interval_s, service.outcomes.sweep_once))
    workers.append(periodic("reminders", settings.reminder_interval_s, service.reminders.send_due_once))
    workers.append(periodic("waitlist", settings.waitlist_interval_s, service.waitlist.offer_once))
    workers.append(metrics.refresher(database, settings.server))

    def parts(_: Database) -> ServiceParts:
        return ServiceParts(
            register=lambda server: booking_pb2_grpc.add_BookingServiceServicer_to_server(
                BookingServicer(service), server
            ),
            workers=workers,
            observers=(metrics.rpc_finished,),
            on_shutdown=[service.close, credits.close, notifier.close, *([video.close] if video is not None else [])],
        )

    await runtime.start(parts)
    return runtime
