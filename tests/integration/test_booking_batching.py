"""Concurrent bookings coalesced into batches (service_kit/batching.py), and the rules kept in
memory between bookings (booking_service/rules_cache.py), against real servers and PostgreSQL.

What must hold: a batch decides each booking as it would have been decided alone (one booking's
lock timeout refuses that booking only), coalescing really happens under concurrency, and a
schedule changed by anyone (another replica, an operator with SQL) is obeyed by the very next
booking although the rules were in memory.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest
import structlog

from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service.config import BookingSettings
from booking_service.server import start as start_booking
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2_grpc
from service_kit.server import Runtime
from tests.support.auth import authorized_channel
from tests.support.stack import server_environment, wait_serving
from tests.support.world import World, assert_books_consistent, future_hour, outcome, refusal

LOCK_TIMEOUT_MS = 500


def batch_totals(runtime: Runtime, step: str) -> tuple[float, float]:
    """(batches, items) the runtime's coalescer of `step` has sent so far."""
    labels = {"step": step}
    count = runtime.registry.get_sample_value("booking_batch_size_count", labels) or 0.0
    total = runtime.registry.get_sample_value("booking_batch_size_sum", labels) or 0.0
    return count, total


async def test_concurrent_bookings_ride_together_and_each_is_paid_once(
    booking_server: Runtime,
    booking_stub: booking_pb2_grpc.BookingServiceStub,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> None:
    worlds = [await World.create(booking_stub, credit_stub) for _ in range(4)]
    steps = ("look_up", "reserve_credits", "decide", "commit_reservations", "mark_paid")
    before = {step: batch_totals(booking_server, step) for step in steps}
    calls = [world.book(future_hour(4, hour)) for world in worlds for hour in range(8, 14)]

    bookings = await asyncio.gather(*calls)

    assert all(b.payment_status == booking_pb2.PAYMENT_STATUS_PAID for b in bookings)
    assert len({b.booking_id for b in bookings}) == len(calls)
    items = {step: batch_totals(booking_server, step)[1] - before[step][1] for step in steps}
    batches = {step: batch_totals(booking_server, step)[0] - before[step][0] for step in steps}
    # Every booking went through every step once, and fewer batches than bookings carried them.
    assert all(items[step] == len(calls) for step in steps), items
    assert sum(batches.values()) < sum(items.values()), batches
    await assert_books_consistent(
        booking_db,
        credit_db,
        therapist_ids=[w.therapist_id for w in worlds],
        client_ids=[w.client_id for w in worlds],
    )


async def test_a_schedule_changed_behind_the_services_back_is_obeyed_by_the_next_booking(
    world: World, booking_db: asyncpg.Pool
) -> None:
    await world.book(future_hour(3, 10))  # the therapist's rules are now in the service's memory
    therapist = uuid.UUID(world.therapist_id)
    # As another replica (or an operator) would: afternoons only, straight in the database.
    async with booking_db.acquire() as connection, connection.transaction():
        await connection.execute("DELETE FROM booking.weekly_windows WHERE therapist_id = $1", therapist)
        await connection.executemany(
            """INSERT INTO booking.weekly_windows (therapist_id, weekday, start_minute, end_minute)
               VALUES ($1, $2, $3, $4)""",
            [(therapist, day, 12 * 60, 18 * 60) for day in range(1, 8)],
        )

    morning = await refusal(world.booking.CreateBooking(world.booking_request(future_hour(4, 10))))
    assert (morning.code, morning.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OUTSIDE_AVAILABILITY")
    assert (await world.book(future_hour(4, 13))).status == booking_pb2.BOOKING_STATUS_CONFIRMED

    async with booking_db.acquire() as connection:
        await connection.execute(
            "UPDATE booking.therapists SET minimum_notice_minutes = $2 WHERE therapist_id = $1", therapist, 10 * 24 * 60
        )
    soon = await refusal(world.booking.CreateBooking(world.booking_request(future_hour(5, 14))))
    assert (soon.code, soon.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_NOTICE")


@pytest.fixture
async def patient_booking(
    booking_database_url: str, credit_address: str, booking_server: Runtime
) -> AsyncIterator[booking_pb2_grpc.BookingServiceStub]:
    """A second booking replica on the same database: one batch in flight at a time, and a short
    lock timeout, so that bookings queued behind a booking stuck on a lock leave as one batch."""
    settings = BookingSettings.from_environment(
        server_environment(
            "BOOKING",
            booking_database_url,
            BOOKING_CREDIT_TARGET=credit_address,
            BOOKING_VIDEO_PROVIDER="none",
            BOOKING_BATCH_MAX_IN_FLIGHT="1",
            BOOKING_LOCK_TIMEOUT_MS=str(LOCK_TIMEOUT_MS),
        )
    )
    runtime = await start_booking(settings)
    try:
        await wait_serving(f"127.0.0.1:{runtime.port}", BOOKING_SERVICE_NAME)
        async with authorized_channel(f"127.0.0.1:{runtime.port}") as channel:
            yield booking_pb2_grpc.BookingServiceStub(channel)
    finally:
        await runtime.stop()


async def test_a_therapist_locked_elsewhere_holds_up_only_its_own_bookings_in_a_batch(
    patient_booking: booking_pb2_grpc.BookingServiceStub,
    credit_stub: credit_pb2_grpc.CreditServiceStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> None:
    stuck, free = await World.create(patient_booking, credit_stub), await World.create(patient_booking, credit_stub)
    start = future_hour(6, 9)
    async with booking_db.acquire() as holder:
        lock = holder.transaction()
        await lock.start()
        # Someone holds the stuck therapist's calendar lock (a long reschedule, say).
        await holder.execute(
            "SELECT pg_advisory_xact_lock(booking.calendar_lock_key($1))",
            uuid.UUID(stuck.therapist_id),
        )
        stuck_requests = [stuck.booking_request(start), stuck.booking_request(start + timedelta(hours=1))]
        with structlog.testing.capture_logs() as logs:
            first = asyncio.ensure_future(outcome(stuck.booking.CreateBooking(stuck_requests[0])))
            await asyncio.sleep(LOCK_TIMEOUT_MS / 1000 / 4)  # its decide batch now waits for the lock
            second = asyncio.ensure_future(outcome(stuck.booking.CreateBooking(stuck_requests[1])))
            third = asyncio.ensure_future(outcome(free.booking.CreateBooking(free.booking_request(start))))
            answers = await asyncio.gather(first, second, third)
        await lock.rollback()

    for refused in answers[:2]:
        assert not isinstance(refused, booking_pb2.CreateBookingResponse), refused
        assert (refused.code, refused.reason) == (grpc.StatusCode.ABORTED, "CALENDAR_BUSY")
    booked = answers[2]
    assert isinstance(booked, booking_pb2.CreateBookingResponse), booked
    assert booked.booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    # The second and third bookings queued behind the stuck one and left together; that batch
    # did not wait for the held lock: the free therapist's booking was decided in it, and the
    # stuck one's again alone, waiting for the lock until its timeout.
    assert [(e["size"], e["busy"]) for e in logs if e["event"] == "decide_batch_busy"] == [(2, 1)], logs
    # A busy calendar is no answer: the requests kept their holds, and a retry with the same
    # request id, once the calendar is free, books with them.
    assert (await stuck.balance()).held == 2 * stuck.credit_cost
    for request in stuck_requests:
        retried = await stuck.booking.CreateBooking(request)
        assert retried.booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    await assert_books_consistent(
        booking_db,
        credit_db,
        therapist_ids=[stuck.therapist_id, free.therapist_id],
        client_ids=[stuck.client_id, free.client_id],
    )
    balance = await stuck.balance()
    assert (balance.available, balance.held, balance.spent) == (100 - 2 * stuck.credit_cost, 0, 2 * stuck.credit_cost)
