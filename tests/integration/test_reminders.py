"""Reminders through the outbox at the configured offsets (24 hours and 1 hour here): sent once
each when their moment comes, moved by a reschedule, removed by a cancellation, skipped for a
session booked inside an offset. Time moves by the service's clock (tests/support/clocked.py);
the outbox delivers to a recording notifier."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from booking_service.domain import Actor, Booking, CancelReason
from booking_service.requests import NewStart
from credit.v1 import credit_pb2_grpc
from tests.support.clocked import Clocked, clocked_service, new_booking, therapist_with_type, whole_hour_after
from tests.support.world import grant

pytestmark = pytest.mark.timeout(60)

DAY, HOUR = 86_400, 3_600


@pytest.fixture
async def clocked(postgres_server_url: str, credit_address: str) -> AsyncIterator[Clocked]:
    """A service of its own per test: reminders scan every session of their database."""
    async with clocked_service(
        postgres_server_url, credit_address, BOOKING_REMINDER_OFFSETS_S=f"{DAY},{HOUR}"
    ) as started:
        yield started


async def book_in(clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub, hours: int) -> Booking:
    therapist, session_type = await therapist_with_type(clocked.service)
    client = uuid.uuid4()
    await grant(credit_stub, str(client), 100)
    start = whole_hour_after(clocked.clock.now, hours)
    return await clocked.service.bookings.create(new_booking(therapist, session_type, client, start))


async def pass_at(clocked: Clocked, instant: datetime) -> list[tuple[str, int, str]]:
    """Moves the clock, runs a reminder pass and an outbox pass; the reminders delivered by them,
    as (booking id, offset in seconds, start time)."""
    clocked.clock.move_to(instant)
    before = len(clocked.notifier.sent)
    await clocked.service.reminders.send_due_once()
    await clocked.service.outbox.deliver_once()
    delivered = []
    for sent in clocked.notifier.sent[before:]:
        body = json.loads(sent.body)
        if body["type"] == "booking.reminder":
            data = body["data"]
            delivered.append((data["booking_id"], data["reminder_offset_s"], data["start_time"]))
    return delivered


async def test_each_reminder_is_sent_once_when_its_moment_comes(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    booking = await book_in(clocked, credit_stub, 30)
    day_before = booking.starts_at - timedelta(seconds=DAY)
    booked = (str(booking.booking_id), DAY, booking.starts_at.isoformat())

    assert await pass_at(clocked, day_before - timedelta(seconds=1)) == []
    assert await pass_at(clocked, day_before) == [booked]
    assert await pass_at(clocked, day_before + timedelta(minutes=5)) == []  # once
    assert await pass_at(clocked, booking.starts_at - timedelta(seconds=HOUR)) == [
        (str(booking.booking_id), HOUR, booking.starts_at.isoformat())
    ]
    assert await pass_at(clocked, booking.starts_at + timedelta(minutes=1)) == []


async def test_a_reschedule_moves_the_reminders_and_a_cancellation_removes_them(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    booking = await book_in(clocked, credit_stub, 30)
    assert [offset for _, offset, _ in await pass_at(clocked, booking.starts_at - timedelta(seconds=DAY))] == [DAY]
    new_start = booking.starts_at + timedelta(hours=20)
    moved = await clocked.service.changes.reschedule(
        NewStart("clocked-test", str(uuid.uuid4()), booking.booking_id, new_start)
    )
    assert moved.starts_at == new_start

    # The old start's hour-before reminder never comes; the new start's day-before one has come.
    assert await pass_at(clocked, booking.starts_at - timedelta(seconds=HOUR)) == [
        (str(booking.booking_id), DAY, new_start.isoformat())
    ]
    assert await pass_at(clocked, booking.starts_at) == []  # once
    # The hour-before reminder written, then the booking cancelled before the outbox delivered it:
    # dropped, never sent.
    clocked.clock.move_to(new_start - timedelta(seconds=HOUR))
    await clocked.service.reminders.send_due_once()
    await clocked.service.changes.cancel(booking.booking_id, Actor.CLIENT, CancelReason.NO_LONGER_NEEDED)
    assert await pass_at(clocked, new_start - timedelta(seconds=HOUR - 60)) == []
    reminders = [json.loads(n.body) for n in clocked.notifier.of_type("booking.reminder")]
    assert [r["data"]["reminder_offset_s"] for r in reminders] == [DAY, DAY]


async def test_a_session_booked_inside_an_offset_skips_that_reminder(
    clocked: Clocked, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    booking = await book_in(clocked, credit_stub, 10)  # the day-before moment has passed already

    assert await pass_at(clocked, booking.starts_at - timedelta(hours=5)) == []
    assert await pass_at(clocked, booking.starts_at - timedelta(seconds=HOUR)) == [
        (str(booking.booking_id), HOUR, booking.starts_at.isoformat())
    ]
