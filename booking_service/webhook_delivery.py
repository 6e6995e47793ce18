"""Webhook delivery: each booking event to every enabled endpoint subscribed to its type, and the
retries of those that failed, one endpoint at a time (docs/notifications.md, "Webhook endpoints").

The outbox worker calls `fan_out` for an event's notification: every subscribed endpoint gets one
attempt at once, concurrently. An endpoint that fails gets a delivery row of its own for that
event (`webhook_deliveries`), with its own attempts, backoff and dead letter; the event row itself
is done with the notification, so one failing endpoint never holds back another, the video room,
or the payment settled from the same row. An endpoint with deliveries already waiting is not
tried at once: the new event waits behind them (a receiver that is down costs one timeout per
outbox pass, not one per event). `deliver_due_once` retries the due deliveries. Every attempt is
logged (`webhook_attempts`), and the log is purged after BOOKING_WEBHOOK_LOG_RETENTION_H.

What the booking transaction writes does not change: one outbox row per event, nothing per
endpoint. What the fan-out writes (the log, and deliveries for failures) is written with the
outbox pass's own write-back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import structlog

from booking_service import events, webhooks
from booking_service.config import BookingSettings
from booking_service.delivery import Failure, RetryPolicy, attempt, check_response
from booking_service.store import webhook_deliveries as delivery_store
from booking_service.store import webhook_endpoints as endpoint_store
from service_kit.connection import Connection
from service_kit.database import Database

log = structlog.get_logger()

# Requests in flight at once from one process (each bounded by BOOKING_SIDE_EFFECT_HTTP_TIMEOUT_S).
MAX_CONCURRENT_REQUESTS = 32
# The log and the delivered deliveries are purged this often, this many rows at a time at most.
PURGE_INTERVAL_S = 60.0
PURGE_BATCH = 1000
# The endpoint of BOOKING_WEBHOOK_URL: its id is derived from the URL, so replicas agree on it.
BOOTSTRAP_NAMESPACE = uuid.UUID("6f1d7c0e-3a52-4b8e-9a0c-2f4f6f1b9e21")
_MAX_ERROR_LENGTH = 300


@dataclass
class FanOut:
    """What one event's fan-out leaves to write: the deliveries of the endpoints that failed (or
    wait behind earlier failures), and the attempts."""

    deliveries: list[delivery_store.NewDelivery] = field(default_factory=list)
    attempts: list[delivery_store.Attempt] = field(default_factory=list)

    def extend(self, other: FanOut) -> None:
        self.deliveries += other.deliveries
        self.attempts += other.attempts


@dataclass(frozen=True)
class _Sent:
    attempt: delivery_store.Attempt
    failure: Failure | None


class WebhookDelivery:
    def __init__(
        self, database: Database, settings: BookingSettings, observe: Callable[[bool], None] = lambda _: None
    ) -> None:
        self._database = database
        self._settings = settings
        self._observe = observe  # each attempt's result, for the metrics
        self._policy = RetryPolicy(
            settings.outbox_base_delay_s, settings.outbox_max_delay_s, settings.outbox_max_attempts
        )
        self._client = httpx.AsyncClient(timeout=settings.side_effect_http_timeout_s, follow_redirects=False)
        self._in_flight = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._bootstrapped = settings.notification_sink != "webhook"
        self._next_purge_s = 0.0

    async def close(self) -> None:
        await self._client.aclose()

    # --- the fan-out of the outbox's events ---

    async def endpoints(self, connection: Connection) -> list[endpoint_store.SigningEndpoint]:
        """The enabled endpoints, read once per outbox pass (so a disabled one is skipped from the
        next pass on). The first pass makes BOOKING_WEBHOOK_URL's endpoint if it is not there."""
        if not self._bootstrapped:
            await self._bootstrap(connection)
        return await endpoint_store.signing_endpoints(connection)

    async def _bootstrap(self, connection: Connection) -> None:
        url = self._settings.webhook_url
        created = await endpoint_store.insert_bootstrap_endpoint(
            connection,
            uuid.uuid5(BOOTSTRAP_NAMESPACE, url),
            f"bootstrap:{url}",
            url,
            events.EVENT_TYPES,
            self._settings.webhook_secret,
        )
        if created:
            log.info("webhook_bootstrap_endpoint_created", url=url)
        self._bootstrapped = True

    async def fan_out(
        self, event_id: uuid.UUID, event_type: str, body: bytes, endpoints: Sequence[endpoint_store.SigningEndpoint]
    ) -> FanOut:
        """One attempt at every subscribed endpoint that has nothing waiting; a delivery row for
        each that failed or waits. Never raises: a failure is the endpoint's, not the event's."""
        result = FanOut()
        subscribed = [endpoint for endpoint in endpoints if event_type in endpoint.event_types]
        for endpoint in subscribed:
            if endpoint.backed_up:
                result.deliveries.append(
                    delivery_store.NewDelivery(
                        uuid.uuid4(), endpoint.endpoint_id, event_id, event_type, body.decode(), 0, 0.0, False, None
                    )
                )
        tried = [endpoint for endpoint in subscribed if not endpoint.backed_up]
        sent = await asyncio.gather(*(self._send(endpoint, event_id, event_type, body, None) for endpoint in tried))
        for endpoint, outcome in zip(tried, sent, strict=True):
            result.attempts.append(outcome.attempt)
            if outcome.failure is None:
                continue
            dead, delay_s = self._policy.after_failure(outcome.failure, 1)
            result.deliveries.append(
                delivery_store.NewDelivery(
                    outcome.attempt.delivery_id or uuid.uuid4(),
                    endpoint.endpoint_id,
                    event_id,
                    event_type,
                    body.decode(),
                    1,
                    delay_s,
                    dead,
                    outcome.failure.reason,
                )
            )
            _log_failure(endpoint.endpoint_id, event_id, outcome.failure, attempts=1, dead=dead, delay_s=delay_s)
        return result

    async def record(self, connection: Connection, fan_out: FanOut) -> None:
        await delivery_store.record(connection, fan_out.deliveries, fan_out.attempts)

    # --- the retries ---

    async def deliver_due_once(self) -> bool:
        """Retries up to one batch of due deliveries; True when the batch was full. Written back
        in one transaction at the end: a worker that dies before leaves them to the lease's end."""
        async with self._database.pool.acquire() as connection:
            await self._purge_now_and_then(connection)
            due = await delivery_store.lease_due_deliveries(
                connection, self._settings.outbox_batch_size, self._settings.outbox_lease_s
            )
        if not due:
            return False
        sent = await asyncio.gather(
            *(self._send(d.endpoint, d.event_id, d.event_type, d.body.encode(), d.delivery_id) for d in due)
        )
        outcomes = []
        for delivery, outcome in zip(due, sent, strict=True):
            if outcome.failure is None:
                outcomes.append(
                    delivery_store.DeliveryOutcome(
                        delivery.delivery_id, delivery_store.DeliveryStatus.DELIVERED, 0.0, None
                    )
                )
                continue
            attempts = delivery.attempts + 1
            dead, delay_s = self._policy.after_failure(outcome.failure, attempts)
            status = delivery_store.DeliveryStatus.DEAD if dead else delivery_store.DeliveryStatus.PENDING
            outcomes.append(
                delivery_store.DeliveryOutcome(delivery.delivery_id, status, delay_s, outcome.failure.reason)
            )
            _log_failure(
                delivery.endpoint.endpoint_id,
                delivery.event_id,
                outcome.failure,
                attempts=attempts,
                dead=dead,
                delay_s=delay_s,
            )
        async with self._database.pool.acquire() as connection, connection.transaction():
            await delivery_store.finish_deliveries(connection, outcomes, [outcome.attempt for outcome in sent])
        return len(due) == self._settings.outbox_batch_size

    async def _purge_now_and_then(self, connection: Connection) -> None:
        now_s = time.monotonic()
        if now_s < self._next_purge_s:
            return
        self._next_purge_s = now_s + PURGE_INTERVAL_S
        purged = await delivery_store.purge(connection, self._settings.webhook_log_retention_s, PURGE_BATCH)
        if purged:
            log.info("webhook_log_purged", rows=purged)

    # --- one request ---

    async def _send(
        self,
        endpoint: endpoint_store.SigningEndpoint,
        event_id: uuid.UUID,
        event_type: str,
        body: bytes,
        delivery_id: uuid.UUID | None,
    ) -> _Sent:
        """One signed POST, timed; its attempt for the log and its failure, if it failed. A first
        attempt that fails names the delivery that will retry it (made by the caller)."""
        async with self._in_flight:
            # Signed when sent (receivers refuse a stale webhook-timestamp), with the wall clock.
            headers = webhooks.sign(endpoint.secrets, str(event_id), int(time.time()), body)
            headers["content-type"] = "application/json"
            status: list[int] = []
            attempted_at = datetime.now(UTC)
            started_s = time.perf_counter()
            failure = await attempt(self._post(endpoint.url, body, headers, status))
            latency_ms = round((time.perf_counter() - started_s) * 1000)
        self._observe(failure is None)
        if failure is not None and delivery_id is None:
            delivery_id = uuid.uuid4()
        error = None if failure is None else failure.reason[:_MAX_ERROR_LENGTH]
        return _Sent(
            delivery_store.Attempt(
                attempt_id=uuid.uuid4(),
                endpoint_id=endpoint.endpoint_id,
                event_id=event_id,
                event_type=event_type,
                delivery_id=delivery_id,
                attempted_at=attempted_at,
                http_status=status[0] if status else None,
                latency_ms=latency_ms,
                succeeded=failure is None,
                error=error,
            ),
            failure,
        )

    async def _post(self, url: str, body: bytes, headers: dict[str, str], status: list[int]) -> None:
        response = await self._client.post(url, content=body, headers=headers)
        status.append(response.status_code)
        check_response(response, "webhook")


def _log_failure(
    endpoint_id: uuid.UUID, event_id: uuid.UUID, failure: Failure, *, attempts: int, dead: bool, delay_s: float
) -> None:
    level = log.error if dead else log.warning
    level(
        "webhook_delivery_failed",
        endpoint_id=str(endpoint_id),
        event_id=str(event_id),
        attempts=attempts,
        dead=dead,
        retry_in_s=None if dead else round(delay_s, 3),
        error=failure.reason,
    )
