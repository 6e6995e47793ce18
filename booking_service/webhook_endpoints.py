"""Webhook endpoints, managed by operators: create (with a fresh secret), read, change the URL or
the event types, rotate the secret with an overlap, disable and enable, delete; and what an
endpoint's partner reads: its delivery log and its deliveries, and the retry of a dead one.

Secrets leave the service only in the answers of create and rotate (and of a repeated create),
never in a read, a log line or a repr (`config.Secret`).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from booking_service import webhooks
from booking_service.config import Secret
from booking_service.domain import RequestIdReused
from booking_service.store import webhook_deliveries as delivery_store
from booking_service.store import webhook_endpoints as endpoint_store
from booking_service.webhook_errors import (
    WebhookDeliveryNotDead,
    WebhookDeliveryNotFound,
    WebhookEndpointLimit,
    WebhookEndpointNotFound,
)
from service_kit.database import Database, in_transaction
from service_kit.pagination import Page

log = structlog.get_logger()

# Each enabled endpoint is called for every event it subscribes to: a bound on the fan-out.
MAX_WEBHOOK_ENDPOINTS = 50
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_OVERLAP = timedelta(days=7)
_FIRST_CURSOR = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


class WebhookEndpoints:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def create(
        self, request_id: str, endpoint: endpoint_store.Endpoint
    ) -> tuple[endpoint_store.Endpoint, Secret]:
        """The new endpoint and its secret; a repeat of the request gets the same endpoint and its
        current secret, the same request id with other values REQUEST_ID_REUSED."""
        secret = webhooks.new_secret()

        async def work(connection: Any) -> endpoint_store.Endpoint | None:
            await endpoint_store.lock_creation(connection)
            existing = await endpoint_store.endpoint_by_request(connection, request_id)
            if existing is not None:
                return None
            created = await endpoint_store.insert_endpoint(
                connection, request_id, endpoint, secret, max_endpoints=MAX_WEBHOOK_ENDPOINTS
            )
            if created is None:
                raise WebhookEndpointLimit(f"there are {MAX_WEBHOOK_ENDPOINTS} webhook endpoints already; delete one")
            return created

        created = await in_transaction(self._database.pool, work)
        if created is not None:
            log.info("webhook_endpoint_created", endpoint_id=str(created.endpoint_id), url=created.url)
            return created, Secret(secret)
        async with self._database.pool.acquire() as connection:
            found = await endpoint_store.endpoint_by_request(connection, request_id)
        assert found is not None
        existing, current = found
        if _asked(existing) != _asked(endpoint):
            raise RequestIdReused(request_id)
        return existing, current

    async def get(self, endpoint_id: uuid.UUID) -> endpoint_store.Endpoint:
        async with self._database.pool.acquire() as connection:
            found = await endpoint_store.fetch_endpoint(connection, endpoint_id)
        if found is None:
            raise WebhookEndpointNotFound(endpoint_id)
        return found

    async def list(self, after: tuple[datetime, uuid.UUID] | None, page_size: int) -> Page[endpoint_store.Endpoint]:
        async with self._database.pool.acquire() as connection:
            found = await endpoint_store.list_endpoints(connection, after or _FIRST_CURSOR, page_size + 1)
        return Page.from_rows(found, page_size)

    async def update(self, endpoint_id: uuid.UUID, changes: dict[str, Any]) -> endpoint_store.Endpoint:
        async def work(connection: Any) -> endpoint_store.Endpoint:
            current = await endpoint_store.fetch_endpoint(connection, endpoint_id)
            if current is None:
                raise WebhookEndpointNotFound(endpoint_id)
            updated = await endpoint_store.update_endpoint(connection, replace(current, **changes))
            if updated is None:
                raise WebhookEndpointNotFound(endpoint_id)
            return updated

        updated = await in_transaction(self._database.pool, work)
        log.info("webhook_endpoint_updated", endpoint_id=str(endpoint_id), fields=sorted(changes))
        return updated

    async def rotate_secret(self, endpoint_id: uuid.UUID, overlap: timedelta) -> tuple[endpoint_store.Endpoint, Secret]:
        assert timedelta(0) <= overlap <= MAX_OVERLAP, overlap
        secret = webhooks.new_secret()
        async with self._database.pool.acquire() as connection:
            rotated = await endpoint_store.rotate_secret(connection, endpoint_id, secret, overlap.total_seconds())
        if rotated is None:
            raise WebhookEndpointNotFound(endpoint_id)
        log.info("webhook_secret_rotated", endpoint_id=str(endpoint_id), overlap_s=overlap.total_seconds())
        return rotated, Secret(secret)

    async def set_enabled(self, endpoint_id: uuid.UUID, *, enabled: bool) -> endpoint_store.Endpoint:
        async with self._database.pool.acquire() as connection:
            changed = await endpoint_store.set_enabled(connection, endpoint_id, enabled=enabled)
        if changed is None:
            raise WebhookEndpointNotFound(endpoint_id)
        log.info("webhook_endpoint_enabled" if enabled else "webhook_endpoint_disabled", endpoint_id=str(endpoint_id))
        return changed

    async def delete(self, endpoint_id: uuid.UUID) -> None:
        async with self._database.pool.acquire() as connection:
            deleted = await endpoint_store.delete_endpoint(connection, endpoint_id)
        if not deleted:
            raise WebhookEndpointNotFound(endpoint_id)
        log.info("webhook_endpoint_deleted", endpoint_id=str(endpoint_id))

    async def attempts(
        self, endpoint_id: uuid.UUID, after: tuple[datetime, uuid.UUID] | None, page_size: int
    ) -> Page[delivery_store.Attempt]:
        async with self._database.pool.acquire() as connection:
            found = await delivery_store.attempts(connection, endpoint_id, after, page_size + 1)
        return Page.from_rows(found, page_size)

    async def deliveries(
        self,
        endpoint_id: uuid.UUID,
        status: delivery_store.DeliveryStatus | None,
        after: tuple[datetime, uuid.UUID] | None,
        page_size: int,
    ) -> Page[delivery_store.Delivery]:
        async with self._database.pool.acquire() as connection:
            found = await delivery_store.deliveries(connection, endpoint_id, status, after, page_size + 1)
        return Page.from_rows(found, page_size)

    async def retry_delivery(self, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> delivery_store.Delivery:
        """Makes a dead delivery due again with fresh attempts."""
        async with self._database.pool.acquire() as connection:
            revived = await delivery_store.revive_delivery(connection, endpoint_id, delivery_id)
            if revived is None:
                found = await delivery_store.fetch_delivery(connection, endpoint_id, delivery_id)
                if found is None:
                    raise WebhookDeliveryNotFound(delivery_id)
                raise WebhookDeliveryNotDead(delivery_id)
        log.info("webhook_delivery_retried", endpoint_id=str(endpoint_id), delivery_id=str(delivery_id))
        return revived


def _asked(endpoint: endpoint_store.Endpoint) -> tuple[object, ...]:
    """What a create asks for, to compare a repeat with the first."""
    return (endpoint.url, tuple(sorted(endpoint.event_types)), endpoint.description, endpoint.partner_id)
