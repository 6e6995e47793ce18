"""booking.v1.BookingService's webhook endpoint RPCs, and their messages. A mixin of the servicer
(servicer.py). Operators manage endpoints; an endpoint's partner (a caller with the `service` role
whose subject is the endpoint's partner_id) reads it, its log and its deliveries, and retries a
dead delivery; another's endpoint looks missing to it (NOT_FOUND), as another's booking does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc

from booking.v1 import booking_pb2
from booking_service import events
from booking_service.messages import shown, timestamp
from booking_service.service import BookingService
from booking_service.store import webhook_deliveries as delivery_store
from booking_service.store import webhook_endpoints as endpoint_store
from booking_service.webhook_endpoints import DEFAULT_OVERLAP, MAX_OVERLAP
from booking_service.webhook_errors import WebhookEndpointNotFound
from service_kit import pagination
from service_kit.auth import ADMIN, SERVICE, current_principal
from service_kit.validation import Checks

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_URL_LENGTH = 2000
MAX_DESCRIPTION_LENGTH = 500
MAX_PARTNER_ID_LENGTH = 200
ENDPOINT_UPDATABLE_FIELDS = ("url", "event_types", "description", "partner_id")
_DELIVERY_STATUS_TO_PROTO = {
    delivery_store.DeliveryStatus.PENDING: booking_pb2.WEBHOOK_DELIVERY_STATE_PENDING,
    delivery_store.DeliveryStatus.DELIVERED: booking_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED,
    delivery_store.DeliveryStatus.DEAD: booking_pb2.WEBHOOK_DELIVERY_STATE_DEAD,
}
_DELIVERY_STATUS_FROM_PROTO = {number: status for status, number in _DELIVERY_STATUS_TO_PROTO.items()}


class WebhookHandlers:
    _service: BookingService

    async def CreateWebhookEndpoint(
        self, request: booking_pb2.CreateWebhookEndpointRequest, context: Context
    ) -> booking_pb2.CreateWebhookEndpointResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        values = _endpoint_fields(checks, request.endpoint, ENDPOINT_UPDATABLE_FIELDS)
        checks.done()
        now = datetime.now(UTC)
        asked = endpoint_store.Endpoint(
            endpoint_id=uuid.uuid4(),
            enabled=True,
            created_at=now,
            updated_at=now,
            previous_secret_expires_at=None,
            **values,
        )
        endpoint, secret = await self._service.webhook_endpoints.create(request_id, asked)
        return booking_pb2.CreateWebhookEndpointResponse(endpoint=endpoint_message(endpoint), secret=secret)

    async def GetWebhookEndpoint(
        self, request: booking_pb2.GetWebhookEndpointRequest, context: Context
    ) -> booking_pb2.GetWebhookEndpointResponse:
        endpoint = await self._readable_endpoint(_endpoint_id(request.endpoint_id))
        return booking_pb2.GetWebhookEndpointResponse(endpoint=endpoint_message(endpoint))

    async def ListWebhookEndpoints(
        self, request: booking_pb2.ListWebhookEndpointsRequest, context: Context
    ) -> booking_pb2.ListWebhookEndpointsResponse:
        checks = Checks()
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        page = await self._service.webhook_endpoints.list(
            pagination.decode_instant_and_id(request.page_token, ()), page_size
        )
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.created_at, last.endpoint_id, ())
        return booking_pb2.ListWebhookEndpointsResponse(
            endpoints=[endpoint_message(e) for e in page.items], next_page_token=next_token
        )

    async def UpdateWebhookEndpoint(
        self, request: booking_pb2.UpdateWebhookEndpointRequest, context: Context
    ) -> booking_pb2.UpdateWebhookEndpointResponse:
        checks = Checks()
        endpoint_id = checks.uuid("endpoint.endpoint_id", request.endpoint.endpoint_id)
        paths = tuple(request.update_mask.paths)
        unknown = [p for p in paths if p not in ENDPOINT_UPDATABLE_FIELDS]
        allowed = ", ".join(ENDPOINT_UPDATABLE_FIELDS)
        if not paths:
            checks.fail("update_mask", f"must name the fields to change: {allowed}")
        elif unknown:
            checks.fail("update_mask", f"cannot change {shown(unknown)}; changeable: {allowed}")
        values = _endpoint_fields(checks, request.endpoint, tuple(p for p in paths if p not in unknown))
        checks.done()
        updated = await self._service.webhook_endpoints.update(endpoint_id, values)
        return booking_pb2.UpdateWebhookEndpointResponse(endpoint=endpoint_message(updated))

    async def RotateWebhookSecret(
        self, request: booking_pb2.RotateWebhookSecretRequest, context: Context
    ) -> booking_pb2.RotateWebhookSecretResponse:
        checks = Checks()
        endpoint_id = checks.uuid("endpoint_id", request.endpoint_id)
        overlap = DEFAULT_OVERLAP
        if request.HasField("overlap"):
            given = request.overlap
            if given.seconds < 0 or given.nanos < 0 or not 0 <= given.seconds <= MAX_OVERLAP.total_seconds():
                checks.fail("overlap", f"must be between 0s and {int(MAX_OVERLAP.total_seconds())}s")
            else:
                overlap = min(MAX_OVERLAP, timedelta(seconds=given.seconds, microseconds=given.nanos // 1000))
        checks.done()
        endpoint, secret = await self._service.webhook_endpoints.rotate_secret(endpoint_id, overlap)
        return booking_pb2.RotateWebhookSecretResponse(endpoint=endpoint_message(endpoint), secret=secret)

    async def DisableWebhookEndpoint(
        self, request: booking_pb2.DisableWebhookEndpointRequest, context: Context
    ) -> booking_pb2.DisableWebhookEndpointResponse:
        changed = await self._service.webhook_endpoints.set_enabled(_endpoint_id(request.endpoint_id), enabled=False)
        return booking_pb2.DisableWebhookEndpointResponse(endpoint=endpoint_message(changed))

    async def EnableWebhookEndpoint(
        self, request: booking_pb2.EnableWebhookEndpointRequest, context: Context
    ) -> booking_pb2.EnableWebhookEndpointResponse:
        changed = await self._service.webhook_endpoints.set_enabled(_endpoint_id(request.endpoint_id), enabled=True)
        return booking_pb2.EnableWebhookEndpointResponse(endpoint=endpoint_message(changed))

    async def DeleteWebhookEndpoint(
        self, request: booking_pb2.DeleteWebhookEndpointRequest, context: Context
    ) -> booking_pb2.DeleteWebhookEndpointResponse:
        await self._service.webhook_endpoints.delete(_endpoint_id(request.endpoint_id))
        return booking_pb2.DeleteWebhookEndpointResponse()

    async def ListWebhookAttempts(
        self, request: booking_pb2.ListWebhookAttemptsRequest, context: Context
    ) -> booking_pb2.ListWebhookAttemptsResponse:
        checks = Checks()
        endpoint_id = checks.uuid("endpoint_id", request.endpoint_id)
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        filters = (endpoint_id,)
        after = pagination.decode_instant_and_id(request.page_token, filters)
        await self._readable_endpoint(endpoint_id)
        page = await self._service.webhook_endpoints.attempts(endpoint_id, after, page_size)
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.attempted_at, last.attempt_id, filters)
        return booking_pb2.ListWebhookAttemptsResponse(
            attempts=[attempt_message(a) for a in page.items], next_page_token=next_token
        )

    async def ListWebhookDeliveries(
        self, request: booking_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> booking_pb2.ListWebhookDeliveriesResponse:
        checks = Checks()
        endpoint_id = checks.uuid("endpoint_id", request.endpoint_id)
        state = checks.enum("state", request.state, booking_pb2.WebhookDeliveryState.Name, allow_unspecified=True)
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        filters = (endpoint_id, state)
        after = pagination.decode_instant_and_id(request.page_token, filters)
        await self._readable_endpoint(endpoint_id)
        page = await self._service.webhook_endpoints.deliveries(
            endpoint_id, _DELIVERY_STATUS_FROM_PROTO.get(state), after, page_size
        )
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.updated_at, last.delivery_id, filters)
        return booking_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_message(d) for d in page.items], next_page_token=next_token
        )

    async def RetryWebhookDelivery(
        self, request: booking_pb2.RetryWebhookDeliveryRequest, context: Context
    ) -> booking_pb2.RetryWebhookDeliveryResponse:
        checks = Checks()
        endpoint_id = checks.uuid("endpoint_id", request.endpoint_id)
        delivery_id = checks.uuid("delivery_id", request.delivery_id)
        checks.done()
        await self._readable_endpoint(endpoint_id)
        delivery = await self._service.webhook_endpoints.retry_delivery(endpoint_id, delivery_id)
        return booking_pb2.RetryWebhookDeliveryResponse(delivery=delivery_message(delivery))

    async def _readable_endpoint(self, endpoint_id: uuid.UUID) -> endpoint_store.Endpoint:
        """The endpoint, if the caller may read it: an operator, or its partner. Another's looks
        missing (NOT_FOUND), exactly as one that does not exist."""
        endpoint = await self._service.webhook_endpoints.get(endpoint_id)
        principal = current_principal()
        if principal.has(ADMIN) or (principal.has(SERVICE) and principal.is_subject(endpoint.partner_id)):
            return endpoint
        raise WebhookEndpointNotFound(endpoint_id)


def _endpoint_id(value: str) -> uuid.UUID:
    checks = Checks()
    endpoint_id = checks.uuid("endpoint_id", value)
    checks.done()
    return endpoint_id


def _endpoint_fields(checks: Checks, message: booking_pb2.WebhookEndpoint, paths: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "url" in paths:
        values["url"] = _url(checks, "endpoint.url", message.url)
    if "event_types" in paths:
        values["event_types"] = _event_types(checks, "endpoint.event_types", message.event_types)
    if "description" in paths:
        values["description"] = checks.text(
            "endpoint.description", message.description, max_length=MAX_DESCRIPTION_LENGTH
        )
    if "partner_id" in paths:
        values["partner_id"] = checks.text("endpoint.partner_id", message.partner_id, max_length=MAX_PARTNER_ID_LENGTH)
    return values


def _url(checks: Checks, field: str, value: str) -> str:
    """An absolute http(s) URL with a host and no credentials in it (they would be logged)."""
    try:
        parts = urlsplit(value)
        well_formed = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        well_formed = False
    if not value:
        checks.fail(field, "is required (an http:// or https:// URL)")
    elif len(value) > MAX_URL_LENGTH:
        checks.fail(field, f"must be at most {MAX_URL_LENGTH} characters")
    elif not well_formed or not value.isprintable() or " " in value:
        checks.fail(field, "must be an absolute http:// or https:// URL")
    elif parts.username is not None or parts.password is not None:
        checks.fail(field, "must not carry credentials: the receiver verifies the signature instead")
    return value


def _event_types(checks: Checks, field: str, values: Any) -> tuple[str, ...]:
    known = ", ".join(events.EVENT_TYPES)
    if not values:
        checks.fail(field, f"must name at least one of {known}")
    for index, value in enumerate(values[: len(events.EVENT_TYPES) + 1]):
        if value not in events.EVENT_TYPES:
            checks.fail(f"{field}[{index}]", f"must be one of {known}")
    return tuple(sorted(set(values)))


def endpoint_message(endpoint: endpoint_store.Endpoint) -> booking_pb2.WebhookEndpoint:
    expires = endpoint.previous_secret_expires_at
    return booking_pb2.WebhookEndpoint(
        endpoint_id=str(endpoint.endpoint_id),
        url=endpoint.url,
        event_types=endpoint.event_types,
        description=endpoint.description,
        state=booking_pb2.WEBHOOK_ENDPOINT_STATE_ENABLED
        if endpoint.enabled
        else booking_pb2.WEBHOOK_ENDPOINT_STATE_DISABLED,
        partner_id=endpoint.partner_id,
        create_time=timestamp(endpoint.created_at),
        update_time=timestamp(endpoint.updated_at),
        previous_secret_expire_time=timestamp(expires) if expires else None,
    )


def attempt_message(attempt: delivery_store.Attempt) -> booking_pb2.WebhookAttempt:
    return booking_pb2.WebhookAttempt(
        attempt_id=str(attempt.attempt_id),
        endpoint_id=str(attempt.endpoint_id),
        event_id=str(attempt.event_id),
        event_type=attempt.event_type,
        delivery_id=str(attempt.delivery_id) if attempt.delivery_id else "",
        attempt_time=timestamp(attempt.attempted_at),
        http_status=attempt.http_status or 0,
        latency_ms=attempt.latency_ms,
        succeeded=attempt.succeeded,
        error=attempt.error or "",
    )


def delivery_message(delivery: delivery_store.Delivery) -> booking_pb2.WebhookDelivery:
    return booking_pb2.WebhookDelivery(
        delivery_id=str(delivery.delivery_id),
        endpoint_id=str(delivery.endpoint_id),
        event_id=str(delivery.event_id),
        event_type=delivery.event_type,
        state=_DELIVERY_STATUS_TO_PROTO[delivery.status],
        attempts=delivery.attempts,
        last_error=delivery.last_error or "",
        next_attempt_time=timestamp(delivery.next_attempt_at)
        if delivery.status is delivery_store.DeliveryStatus.PENDING
        else None,
        create_time=timestamp(delivery.created_at),
        update_time=timestamp(delivery.updated_at),
    )
