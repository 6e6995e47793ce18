"""Side effects never fail a booking (DESIGN.md failure classes 10 and 12): video rooms through a
real local server speaking Daily.co's API, notifications to a real local webhook receiver, the
outbox's retries, Retry-After, dead letters, and two outbox workers on one database.

Each test starts booking servers of its own, on a fresh database, so that no other server's
outbox worker takes its events (and its failing provider touches no other test).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from structlog.testing import capture_logs

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2_grpc
from tests.support.booking_server import booking_server
from tests.support.fake_daily import API_KEY, Answer, FakeDaily, running_fake_daily
from tests.support.stack import fresh_database
from tests.support.webhook_receiver import SECRET, WebhookReceiver, running_webhook_receiver
from tests.support.world import SETTLE_TIMEOUT_S, World, eventually, future_hour

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.slow

READY = booking_pb2.VIDEO_ROOM_STATE_READY
PENDING = booking_pb2.VIDEO_ROOM_STATE_PENDING
FAILED = booking_pb2.VIDEO_ROOM_STATE_FAILED
DELETED = booking_pb2.VIDEO_ROOM_STATE_DELETED


def daily_env(fake: FakeDaily) -> dict[str, str]:
    return {"BOOKING_VIDEO_PROVIDER": "daily", "BOOKING_DAILY_API_URL": fake.url, "BOOKING_DAILY_API_KEY": API_KEY}


def webhook_env(receiver: WebhookReceiver) -> dict[str, str]:
    return {
        "BOOKING_NOTIFICATION_SINK": "webhook",
        "BOOKING_WEBHOOK_URL": receiver.url,
        "BOOKING_WEBHOOK_SECRET": SECRET,
    }


async def room_of(world: World, booking_id: str) -> booking_pb2.VideoRoom:
    return (await world.get(booking_id)).video_room


async def room_state(world: World, booking_id: str, state: int) -> booking_pb2.VideoRoom:
    return await eventually(lambda: room_of(world, booking_id), lambda room: room.state == state, timeout_s=15)


@pytest.fixture
async def fake_daily() -> AsyncIterator[FakeDaily]:
    async with running_fake_daily() as fake:
        yield fake


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_webhook_receiver() as running:
        yield running


async def test_a_room_follows_its_booking_and_every_change_is_notified(
    postgres_server_url: str,
    credit_address: str,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    fake_daily: FakeDaily,
    receiver: WebhookReceiver,
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    async with booking_server(database, credit_address, **daily_env(fake_daily), **webhook_env(receiver)) as server:
        world = await World.create(server.stub, credit_stub)
        start = future_hour(5, 10)
        booking = await world.book(start)
        assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
        assert booking.video_room.state == PENDING  # the booking did not wait for the room

        room = await room_state(world, booking.booking_id, READY)
        name = f"booking-{uuid.UUID(booking.booking_id).hex}"
        assert room.url == f"https://fake.daily.test/{name}"
        config = fake_daily.rooms[name]["config"]
        assert config["nbf"] == int((start - timedelta(seconds=600)).timestamp())
        assert config["exp"] == int((start + timedelta(minutes=50, seconds=3600)).timestamp())

        new_start = future_hour(6, 12)
        moved = await world.reschedule(booking.booking_id, new_start)
        assert moved.video_room.state == PENDING
        await room_state(world, booking.booking_id, READY)
        assert fake_daily.rooms[name]["config"]["nbf"] == int((new_start - timedelta(seconds=600)).timestamp())

        await world.cancel(booking.booking_id)
        await room_state(world, booking.booking_id, DELETED)
        assert name not in fake_daily.rooms

        events = await eventually(
            lambda: _async(receiver.of_booking(booking.booking_id)), lambda found: len(found) == 3
        )
        assert sorted(event["type"] for event in events) == [
            "booking.cancelled",
            "booking.confirmed",
            "booking.rescheduled",
        ]
        rescheduled = next(event for event in events if event["type"] == "booking.rescheduled")
        assert rescheduled["data"]["start_time"] == new_start.isoformat()
        assert rescheduled["data"]["previous_start_time"] == start.isoformat()
        assert receiver.rejected == []


async def _async(value: Any) -> Any:
    return value


async def test_a_provider_answering_500_then_200_ends_ready(
    postgres_server_url: str, credit_address: str, credit_stub: credit_pb2_grpc.CreditServiceStub, fake_daily: FakeDaily
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    async with booking_server(database, credit_address, **daily_env(fake_daily)) as server:
        world = await World.create(server.stub, credit_stub)
        fake_daily.fail_next(Answer(500, {"error": "server-error"}))
        booking = await world.book(future_hour(5, 10))
        room = await room_state(world, booking.booking_id, READY)
        assert room.url.startswith("https://fake.daily.test/")
        assert len(fake_daily.seen("POST", "/v1/rooms")) == 2


async def test_a_429_with_retry_after_waits_that_long(
    postgres_server_url: str, credit_address: str, credit_stub: credit_pb2_grpc.CreditServiceStub, fake_daily: FakeDaily
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    async with booking_server(database, credit_address, **daily_env(fake_daily)) as server:
        world = await World.create(server.stub, credit_stub)
        fake_daily.fail_next(Answer(429, {"error": "rate-limit"}, {"Retry-After": "2"}))
        booking = await world.book(future_hour(5, 10))
        await room_state(world, booking.booking_id, READY)
        first, second = fake_daily.seen("POST", "/v1/rooms")
        # Without Retry-After the backoff would have retried after 0.05 to 0.1 s.
        assert second.at_s - first.at_s >= 1.9


async def test_a_400_fails_the_room_with_its_reason_and_an_operator_can_retry_it(
    postgres_server_url: str,
    credit_address: str,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    fake_daily: FakeDaily,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    with capture_logs() as logs:
        async with booking_server(database, credit_address, **daily_env(fake_daily)) as server:
            world = await World.create(server.stub, credit_stub)
            fake_daily.fail_next(Answer(400, {"error": "invalid-request-error", "info": "exp is in the past"}))
            booking = await world.book(future_hour(5, 10))

            room = await room_state(world, booking.booking_id, FAILED)
            assert "400" in room.failure_reason and "exp is in the past" in room.failure_reason
            current = await world.get(booking.booking_id)
            assert current.status == booking_pb2.BOOKING_STATUS_CONFIRMED
            assert current.payment_status == booking_pb2.PAYMENT_STATUS_PAID
            assert len(fake_daily.seen("POST", "/v1/rooms")) == 1  # no retry of a 4xx

            listed = await server.stub.ListDeadLetters(booking_pb2.ListDeadLettersRequest())
            (letter,) = [d for d in listed.dead_letters if d.booking_id == booking.booking_id]
            assert (letter.kind, letter.attempts) == ("booking_event", 1)
            assert "exp is in the past" in letter.last_error

            retried = await server.stub.RetryDeadLetter(booking_pb2.RetryDeadLetterRequest(event_id=letter.event_id))
            assert retried.dead_letter.attempts == 0
            await room_state(world, booking.booking_id, READY)
            after = await server.stub.ListDeadLetters(booking_pb2.ListDeadLettersRequest())
            assert all(d.event_id != letter.event_id for d in after.dead_letters)

            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await server.stub.RetryDeadLetter(booking_pb2.RetryDeadLetterRequest(event_id=letter.event_id))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # The API key never reaches a log line, structlog's or the standard library's (httpx).
    assert logs and API_KEY not in repr(logs)
    assert API_KEY not in caplog.text


async def test_dead_letters_are_listed_in_pages(
    postgres_server_url: str, credit_address: str, fake_daily: FakeDaily
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    async with booking_server(database, credit_address, **daily_env(fake_daily)) as server:
        connection = await asyncpg.connect(database)
        try:
            await connection.executemany(
                """INSERT INTO booking.outbox (event_id, kind, booking_id, status, attempts)
                   VALUES ($1, $2, $3, 'dead', 12)""",
                [(uuid.uuid4(), "notification", uuid.uuid4()) for _ in range(5)],
            )
        finally:
            await connection.close()
        seen: list[str] = []
        token = ""
        for _ in range(5):
            page = await server.stub.ListDeadLetters(booking_pb2.ListDeadLettersRequest(page_size=2, page_token=token))
            seen += [letter.event_id for letter in page.dead_letters]
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)) == 5


@asynccontextmanager
async def hanging_server() -> AsyncIterator[str]:
    """A provider that accepts connections and never answers: the worst a provider can do."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # kept open, never answered, until the test ends

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_provider_that_hangs_throughout_leaves_bookings_confirmed_and_never_waited_for(
    postgres_server_url: str, credit_address: str, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    """Each call to the hanging provider takes its whole timeout (2 s), so a booking that waited
    for it even once would take that long. None does: the slowest booking stays far below it. The
    medians of both servers are printed (a figure, not a bound: the machine's load moves them)."""
    provider_timeout_s = 2.0
    async with AsyncExitStack() as stack:
        hanging_url = await stack.enter_async_context(hanging_server())
        down = await stack.enter_async_context(
            booking_server(
                await fresh_database(postgres_server_url, "side_effects"),
                credit_address,
                BOOKING_VIDEO_PROVIDER="daily",
                BOOKING_DAILY_API_URL=hanging_url,
                BOOKING_DAILY_API_KEY=API_KEY,
                BOOKING_SIDE_EFFECT_HTTP_TIMEOUT_S=str(provider_timeout_s),
            )
        )
        local = await stack.enter_async_context(
            booking_server(
                await fresh_database(postgres_server_url, "side_effects"),
                credit_address,
                BOOKING_VIDEO_PROVIDER="local",
            )
        )
        worlds = {
            "down": await World.create(down.stub, credit_stub, credits=1000),
            "local": await World.create(local.stub, credit_stub, credits=1000),
        }
        latencies_s: dict[str, list[float]] = {"down": [], "local": []}
        booked: dict[str, list[str]] = {"down": [], "local": []}
        for index in range(20):
            # Interleaved, each first in turn, so both see the same machine load.
            for name in ("down", "local") if index % 2 else ("local", "down"):
                world = worlds[name]
                began = time.perf_counter()
                booking = await world.book(future_hour(3 + index // 10, 1 + index % 10))
                latencies_s[name].append(time.perf_counter() - began)
                booked[name].append(booking.booking_id)
                assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID

        print(
            "create_booking_median_s",
            {name: statistics.median(values) for name, values in latencies_s.items()},
        )
        assert max(latencies_s["down"]) < provider_timeout_s / 2, latencies_s["down"]

        for booking_id in booked["down"]:
            booking = await worlds["down"].get(booking_id)
            assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
            assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
            assert booking.video_room.state == PENDING  # still retrying, with backoff
        for booking_id in booked["local"]:
            await room_state(worlds["local"], booking_id, READY)


async def test_two_outbox_workers_deliver_200_events_exactly_once(
    postgres_server_url: str, credit_address: str, receiver: WebhookReceiver
) -> None:
    database = await fresh_database(postgres_server_url, "side_effects")
    # The schema first (one server), then 200 events, then a second worker on the same database.
    async with booking_server(database, credit_address, BOOKING_OUTBOX_INTERVAL_S="600"):
        pass
    connection = await asyncpg.connect(database)
    try:
        rows = [
            (
                uuid.uuid4(),
                "notification",
                uuid.uuid4(),
                json.dumps({"type": "booking.confirmed", "occurred_at": "2030-01-01T00:00:00+00:00", "data": {"n": n}}),
            )
            for n in range(200)
        ]
        await connection.executemany(
            "INSERT INTO booking.outbox (event_id, kind, booking_id, payload) VALUES ($1, $2, $3, $4::jsonb)", rows
        )
        env = {**webhook_env(receiver), "BOOKING_OUTBOX_BATCH_SIZE": "10"}
        async with booking_server(database, credit_address, **env), booking_server(database, credit_address, **env):
            await eventually(
                lambda: _async(len(receiver.deliveries)), lambda count: count == 200, timeout_s=SETTLE_TIMEOUT_S
            )
            await asyncio.sleep(0.5)  # room for a duplicate to show up
        assert len(receiver.deliveries) == 200
        assert set(receiver.deliveries.values()) == {1}
        assert set(receiver.deliveries) == {str(row[0]) for row in rows}
        statuses = await connection.fetch(
            "SELECT status, count(*) FROM booking.outbox WHERE event_id = ANY($1::uuid[]) GROUP BY status",
            [row[0] for row in rows],
        )
        assert [(row["status"], row["count"]) for row in statuses] == [("delivered", 200)]
    finally:
        await connection.close()
