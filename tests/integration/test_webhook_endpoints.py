"""Webhook endpoints (docs/notifications.md, "Webhook endpoints"): managed by admin RPCs, each with
its own secret, retries, dead letters and delivery log; every request verified by real local
receivers with the `standardwebhooks` package, as a partner verifies them.

Each test runs a booking server of its own on a fresh database, so that its endpoints get no
other test's events and no other test's endpoints get its events.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from booking.v1 import booking_pb2
from booking_service.webhook_endpoints import MAX_WEBHOOK_ENDPOINTS
from tests.support.auth import bearer, token
from tests.support.booking_server import Server, booking_server
from tests.support.gateway import Gateway, request_json
from tests.support.stack import fresh_database
from tests.support.webhook_receiver import WebhookReceiver, running_webhook_receiver
from tests.support.world import SETTLE_TIMEOUT_S, World, eventually, future_hour, refusal

EVERY_EVENT = ["booking.confirmed", "booking.cancelled", "booking.rescheduled"]
PARTNER = "partner-acme"
DELIVERED = booking_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED
DEAD = booking_pb2.WEBHOOK_DELIVERY_STATE_DEAD


@pytest.fixture
async def server(postgres_server_url: str, credit_address: str) -> AsyncIterator[Server]:
    database = await fresh_database(postgres_server_url, "webhook_endpoints")
    async with booking_server(database, credit_address, BOOKING_VIDEO_PROVIDER="none") as started:
        yield started


@pytest.fixture
async def receivers() -> AsyncIterator[list[WebhookReceiver]]:
    """Three receivers; each test points endpoints at them and gives each the secret to verify with."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_webhook_receiver()) for _ in range(3)]


async def endpoint_for(
    server: Server, receiver: WebhookReceiver, event_types: list[str] | None = None, partner_id: str = ""
) -> str:
    """An endpoint POSTing to `receiver`, which from now on verifies with the endpoint's secret."""
    created = await server.stub.CreateWebhookEndpoint(
        booking_pb2.CreateWebhookEndpointRequest(
            request_id=str(uuid.uuid4()),
            endpoint=booking_pb2.WebhookEndpoint(
                url=receiver.url, event_types=event_types or EVERY_EVENT, partner_id=partner_id
            ),
        )
    )
    assert created.secret.startswith("whsec_")
    receiver.secret = created.secret
    endpoint_id: str = created.endpoint.endpoint_id
    return endpoint_id


async def received(receiver: WebhookReceiver, booking_id: str, count: int) -> list[dict[str, Any]]:
    async def events() -> list[dict[str, Any]]:
        return receiver.of_booking(booking_id)

    return await eventually(events, lambda found: len(found) >= count, timeout_s=SETTLE_TIMEOUT_S)


async def attempts_of(server: Server, endpoint_id: str, **metadata: Any) -> list[booking_pb2.WebhookAttempt]:
    page = await server.stub.ListWebhookAttempts(
        booking_pb2.ListWebhookAttemptsRequest(endpoint_id=endpoint_id), **metadata
    )
    return list(page.attempts)


async def logged(server: Server, endpoint_id: str, count: int) -> list[booking_pb2.WebhookAttempt]:
    """The endpoint's log once it holds `count` attempts: a receiver has a request a moment
    before the worker writes its attempt down."""
    return await eventually(
        lambda: attempts_of(server, endpoint_id), lambda found: len(found) >= count, timeout_s=SETTLE_TIMEOUT_S
    )


async def test_a_webhook_is_received_and_verified_with_standardwebhooks(
    server: Server, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    receiver = receivers[0]
    endpoint_id = await endpoint_for(server, receiver, ["booking.confirmed", "booking.cancelled"])
    world = await World.create(server.stub, credit_stub)

    booking = await world.book(future_hour(3, 10))
    (event,) = await received(receiver, booking.booking_id, 1)
    assert event["type"] == "booking.confirmed"
    assert event["data"]["booking_id"] == booking.booking_id
    headers, body = receiver.raw[-1]
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(receiver.secret).verify(body, headers) == event  # what the receiver did, once more
    assert receiver.rejected == []

    # Not subscribed to reschedules: the cancellation after it arrives, the reschedule never does.
    await world.reschedule(booking.booking_id, future_hour(3, 12))
    await world.cancel(booking.booking_id)
    events = await received(receiver, booking.booking_id, 2)
    assert sorted(e["type"] for e in events) == ["booking.cancelled", "booking.confirmed"]

    log = await logged(server, endpoint_id, 2)
    assert [(a.event_type, a.http_status, a.succeeded) for a in log] == [
        ("booking.cancelled", 204, True),
        ("booking.confirmed", 204, True),
    ]
    assert all(a.latency_ms >= 0 and a.attempt_time.seconds > 0 and not a.error for a in log)
    assert {a.event_id for a in log} == {e["id"] for e in events}


async def test_a_rotated_secret_verifies_during_the_overlap_and_not_after(
    server: Server, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    receiver = receivers[0]
    endpoint_id = await endpoint_for(server, receiver, ["booking.confirmed"])
    old_secret = receiver.secret  # the receiver keeps verifying with the old secret for now
    rotated = await server.stub.RotateWebhookSecret(
        booking_pb2.RotateWebhookSecretRequest(endpoint_id=endpoint_id, overlap=duration_pb2.Duration(seconds=3600))
    )
    new_secret = rotated.secret
    assert new_secret != old_secret
    assert rotated.endpoint.HasField("previous_secret_expire_time")
    world = await World.create(server.stub, credit_stub)

    during = await world.book(future_hour(3, 10))
    await received(receiver, during.booking_id, 1)  # verified with the old secret
    headers, body = receiver.raw[-1]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new_secret).verify(body, headers)  # and with the new one

    # The overlap runs out (the database's clock decides it: moved here, not waited for).
    connection = await asyncpg.connect(server.database_url)
    try:
        await connection.execute(
            "UPDATE booking.webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'"
            " WHERE endpoint_id = $1",
            uuid.UUID(endpoint_id),
        )
    finally:
        await connection.close()
    got = await server.stub.GetWebhookEndpoint(booking_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id))
    assert not got.endpoint.HasField("previous_secret_expire_time")

    after = await world.book(future_hour(3, 12))

    async def rejections() -> list[str]:
        return receiver.rejected

    await eventually(rejections, lambda found: len(found) >= 1, timeout_s=SETTLE_TIMEOUT_S)
    headers, body = receiver.raw[-1]
    assert headers["webhook-id"] != during.booking_id
    assert Webhook(new_secret).verify(body, headers)["data"]["booking_id"] == after.booking_id
    with pytest.raises(WebhookVerificationError):
        Webhook(old_secret).verify(body, headers)

    # A rotation without an overlap ends the previous secret at once.
    receiver.secret = new_secret
    at_once = await server.stub.RotateWebhookSecret(
        booking_pb2.RotateWebhookSecretRequest(endpoint_id=endpoint_id, overlap=duration_pb2.Duration(seconds=0))
    )
    assert not at_once.endpoint.HasField("previous_secret_expire_time")


async def test_a_disabled_endpoint_receives_nothing(
    server: Server, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    enabled, disabled = receivers[0], receivers[1]
    await endpoint_for(server, enabled)
    disabled_id = await endpoint_for(server, disabled)
    answer = await server.stub.DisableWebhookEndpoint(
        booking_pb2.DisableWebhookEndpointRequest(endpoint_id=disabled_id)
    )
    assert answer.endpoint.state == booking_pb2.WEBHOOK_ENDPOINT_STATE_DISABLED
    world = await World.create(server.stub, credit_stub)

    first = await world.book(future_hour(3, 10))
    await world.cancel(first.booking_id)
    await received(enabled, first.booking_id, 2)  # the events went out: to the enabled one only
    assert disabled.raw == []
    assert await attempts_of(server, disabled_id) == []

    await server.stub.EnableWebhookEndpoint(booking_pb2.EnableWebhookEndpointRequest(endpoint_id=disabled_id))
    second = await world.book(future_hour(3, 12))
    await received(disabled, second.booking_id, 1)
    assert disabled.of_booking(first.booking_id) == []  # what happened while disabled is not sent later


async def test_a_failing_endpoint_retries_on_its_own_and_holds_back_no_other(
    server: Server, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    healthy, failing = receivers[0], receivers[1]
    await endpoint_for(server, healthy)
    failing_id = await endpoint_for(server, failing)
    failing.fail_next(2, status=503)
    world = await World.create(server.stub, credit_stub)

    booking = await world.book(future_hour(3, 10))
    await received(healthy, booking.booking_id, 1)
    await received(failing, booking.booking_id, 1)  # the third attempt

    log = await logged(server, failing_id, 3)
    assert [(a.http_status, a.succeeded) for a in reversed(log)] == [(503, False), (503, False), (204, True)]
    assert "503" in log[-1].error
    assert len({a.delivery_id for a in log}) == 1 and log[0].delivery_id  # one delivery retried it
    deliveries = await server.stub.ListWebhookDeliveries(
        booking_pb2.ListWebhookDeliveriesRequest(endpoint_id=failing_id)
    )
    (delivery,) = deliveries.deliveries
    assert (delivery.state, delivery.attempts, delivery.delivery_id) == (DELIVERED, 3, log[0].delivery_id)
    assert healthy.deliveries[str(delivery.event_id)] == 1  # the healthy one got it once, at once


async def test_a_dead_delivery_is_the_partners_to_read_and_retry(
    server: Server, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    receiver = receivers[0]
    endpoint_id = await endpoint_for(server, receiver, partner_id=PARTNER)
    receiver.fail_next(1, status=400)  # a 4xx: refused for good, dead at once
    world = await World.create(server.stub, credit_stub)
    booking = await world.book(future_hour(3, 10))
    partner = bearer(token(PARTNER, ["service"]))

    async def dead() -> list[booking_pb2.WebhookDelivery]:
        page = await server.stub.ListWebhookDeliveries(
            booking_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id, state=DEAD), metadata=partner
        )
        return list(page.deliveries)

    (letter,) = await eventually(dead, lambda found: len(found) == 1, timeout_s=SETTLE_TIMEOUT_S)
    assert (letter.attempts, letter.event_type) == (1, "booking.confirmed")
    assert "400" in letter.last_error
    (attempt,) = await attempts_of(server, endpoint_id, metadata=partner)
    assert (attempt.http_status, attempt.succeeded) == (400, False)

    stranger = bearer(token("partner-other", ["service"]))
    for call in (
        server.stub.GetWebhookEndpoint(
            booking_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id), metadata=stranger
        ),
        server.stub.ListWebhookAttempts(
            booking_pb2.ListWebhookAttemptsRequest(endpoint_id=endpoint_id), metadata=stranger
        ),
    ):
        assert (await refusal(call)).reason == "WEBHOOK_ENDPOINT_NOT_FOUND"

    retried = await server.stub.RetryWebhookDelivery(
        booking_pb2.RetryWebhookDeliveryRequest(endpoint_id=endpoint_id, delivery_id=letter.delivery_id),
        metadata=partner,
    )
    assert (retried.delivery.state, retried.delivery.attempts) == (booking_pb2.WEBHOOK_DELIVERY_STATE_PENDING, 0)
    await received(receiver, booking.booking_id, 1)
    again = await refusal(
        server.stub.RetryWebhookDelivery(
            booking_pb2.RetryWebhookDeliveryRequest(endpoint_id=endpoint_id, delivery_id=letter.delivery_id)
        )
    )
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WEBHOOK_DELIVERY_NOT_DEAD")


async def test_endpoints_are_managed_by_admin_rpcs(server: Server, receivers: list[WebhookReceiver]) -> None:
    request = booking_pb2.CreateWebhookEndpointRequest(
        request_id="create-once",
        endpoint=booking_pb2.WebhookEndpoint(
            url=receivers[0].url, event_types=["booking.confirmed"], description="CRM"
        ),
    )
    created = await server.stub.CreateWebhookEndpoint(request)
    repeat = await server.stub.CreateWebhookEndpoint(request)
    assert (repeat.endpoint, repeat.secret) == (created.endpoint, created.secret)
    request.endpoint.url = receivers[1].url
    assert (await refusal(server.stub.CreateWebhookEndpoint(request))).reason == "REQUEST_ID_REUSED"
    endpoint_id = created.endpoint.endpoint_id

    updated = await server.stub.UpdateWebhookEndpoint(
        booking_pb2.UpdateWebhookEndpointRequest(
            endpoint=booking_pb2.WebhookEndpoint(endpoint_id=endpoint_id, event_types=EVERY_EVENT),
            update_mask=field_mask_pb2.FieldMask(paths=["event_types"]),
        )
    )
    assert (list(updated.endpoint.event_types), updated.endpoint.description) == (sorted(EVERY_EVENT), "CRM")
    listed = await server.stub.ListWebhookEndpoints(booking_pb2.ListWebhookEndpointsRequest())
    assert [e.endpoint_id for e in listed.endpoints] == [endpoint_id]
    assert "secret" not in str(listed)

    await server.stub.DeleteWebhookEndpoint(booking_pb2.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id))
    gone = await refusal(server.stub.GetWebhookEndpoint(booking_pb2.GetWebhookEndpointRequest(endpoint_id=endpoint_id)))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND")


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ({"url": "", "event_types": EVERY_EVENT}, "endpoint.url"),
        ({"url": "ftp://example.com/hooks", "event_types": EVERY_EVENT}, "endpoint.url"),
        ({"url": "https://user:pass@example.com/hooks", "event_types": EVERY_EVENT}, "endpoint.url"),
        ({"url": "https://example.com/hooks", "event_types": []}, "endpoint.event_types"),
        ({"url": "https://example.com/hooks", "event_types": ["booking.paid"]}, "endpoint.event_types[0]"),
    ],
)
async def test_a_bad_endpoint_names_its_field(server: Server, endpoint: dict[str, Any], field: str) -> None:
    refused = await refusal(
        server.stub.CreateWebhookEndpoint(
            booking_pb2.CreateWebhookEndpointRequest(
                request_id=str(uuid.uuid4()), endpoint=booking_pb2.WebhookEndpoint(**endpoint)
            )
        )
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.field_violations


async def test_the_number_of_endpoints_is_bounded(server: Server) -> None:
    for index in range(MAX_WEBHOOK_ENDPOINTS):
        await server.stub.CreateWebhookEndpoint(
            booking_pb2.CreateWebhookEndpointRequest(
                request_id=f"bound-{index}",
                endpoint=booking_pb2.WebhookEndpoint(url="https://example.com/hooks", event_types=EVERY_EVENT),
            )
        )
    refused = await refusal(
        server.stub.CreateWebhookEndpoint(
            booking_pb2.CreateWebhookEndpointRequest(
                request_id="one-too-many",
                endpoint=booking_pb2.WebhookEndpoint(url="https://example.com/hooks", event_types=EVERY_EVENT),
            )
        )
    )
    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WEBHOOK_ENDPOINT_LIMIT")


async def test_booking_webhook_url_is_the_endpoint_made_at_the_first_start(
    postgres_server_url: str, credit_address: str, receivers: list[WebhookReceiver], credit_stub: Any
) -> None:
    receiver = receivers[0]  # verifies with tests.support.webhook_receiver.SECRET, the env's secret
    database = await fresh_database(postgres_server_url, "webhook_bootstrap")
    env = {
        "BOOKING_NOTIFICATION_SINK": "webhook",
        "BOOKING_WEBHOOK_URL": receiver.url,
        "BOOKING_WEBHOOK_SECRET": receiver.secret,
    }
    for _ in range(2):  # a restart finds the endpoint and makes no other
        async with booking_server(database, credit_address, **env) as server:
            world = await World.create(server.stub, credit_stub)
            booking = await world.book(future_hour(3, 10))
            await received(receiver, booking.booking_id, 1)
            listed = await server.stub.ListWebhookEndpoints(booking_pb2.ListWebhookEndpointsRequest())
            (endpoint,) = listed.endpoints
            assert (endpoint.url, endpoint.description) == (receiver.url, "BOOKING_WEBHOOK_URL")
    assert receiver.rejected == []


async def test_endpoints_over_http(api_gateway: Gateway) -> None:
    """The operators' routes through the real gateway (the session's shared server: the endpoint
    is disabled at once and deleted at the end, so that it receives nothing)."""
    base = f"{api_gateway.url}/v1/webhook-endpoints"
    created = await request_json(
        "POST",
        base,
        {
            "request_id": str(uuid.uuid4()),
            "endpoint": {"url": "http://127.0.0.1:9/over-http", "event_types": ["booking.rescheduled"]},
        },
    )
    assert created.status == 200, created.text
    endpoint_id = created.json()["endpoint"]["endpoint_id"]
    disabled = await request_json("POST", f"{base}/{endpoint_id}:disable", {})
    assert disabled.json()["endpoint"]["state"] == "WEBHOOK_ENDPOINT_STATE_DISABLED", disabled.text

    rotated = await request_json("POST", f"{base}/{endpoint_id}:rotateSecret", {"overlap": "3600s"})
    assert rotated.status == 200, rotated.text
    assert rotated.json()["secret"] not in (created.json()["secret"], "")
    assert "previous_secret_expire_time" in rotated.json()["endpoint"]
    changed = await request_json(
        "PATCH", f"{base}/{endpoint_id}?update_mask=event_types", {"event_types": ["booking.cancelled"]}
    )
    assert changed.json()["endpoint"]["event_types"] == ["booking.cancelled"], changed.text
    log = await request_json("GET", f"{base}/{endpoint_id}/attempts?page_size=5")
    assert (log.status, log.json()["attempts"]) == (200, [])
    dead = await request_json("GET", f"{base}/{endpoint_id}/deliveries?state=WEBHOOK_DELIVERY_STATE_DEAD")
    assert (dead.status, dead.json()["deliveries"]) == (200, [])

    deleted = await request_json("DELETE", f"{base}/{endpoint_id}")
    assert deleted.status == 200, deleted.text
    assert (await request_json("GET", f"{base}/{endpoint_id}")).status == 404
