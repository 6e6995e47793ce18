"""RescheduleBooking over real gRPC: a move changes the session and nothing about the credits,
frees the old slot, is refused onto an occupied one without changing anything, and is idempotent
by request_id. (Concurrent moves onto one slot: test_booking_concurrency.py.)"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from booking.v1 import booking_pb2
from tests.support.world import World, assert_books_consistent, future_hour, refusal

SESSION = timedelta(minutes=50)
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def utc(message: booking_pb2.Booking, field: str = "start_time") -> datetime:
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


async def test_a_move_changes_the_session_and_not_the_credits(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    await world.update_therapist(buffer_before_minutes=5, buffer_after_minutes=5)
    old_start, new_start = future_hour(3, 10), future_hour(4, 15)
    booking = await world.book(old_start)
    balance_before, ledger_before = await world.balance(), await world.ledger()

    moved = await world.reschedule(booking.booking_id, new_start)

    assert (moved.booking_id, moved.request_id, moved.client_id) == (
        booking.booking_id,
        booking.request_id,
        booking.client_id,
    )
    assert (utc(moved), utc(moved, "end_time")) == (new_start, new_start + SESSION)
    assert moved.local_start == new_start.isoformat()
    assert moved.reschedule_count == 1
    assert (moved.status, moved.payment_status) == (
        booking_pb2.BOOKING_STATUS_CONFIRMED,
        booking_pb2.PAYMENT_STATUS_PAID,
    )
    assert await world.get(booking.booking_id) == moved
    assert await world.balance() == balance_before  # not a credit moved, not even update_time
    assert await world.ledger() == ledger_before
    async with booking_db.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT starts_at, ends_at, blocked, reschedule_count FROM booking.sessions WHERE booking_id = $1",
            uuid.UUID(booking.booking_id),
        )
    assert row is not None
    assert (row["starts_at"], row["ends_at"], row["reschedule_count"]) == (new_start, new_start + SESSION, 1)
    assert (row["blocked"].lower, row["blocked"].upper) == (
        new_start - timedelta(minutes=5),
        new_start + SESSION + timedelta(minutes=5),
    )

    # The old slot is free for someone else.
    other = await world.new_client()
    taken = await world.book(old_start, client_id=other)
    assert taken.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_a_move_may_overlap_the_booking_s_own_old_time(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(3, 10)
    booking = await world.book(start)

    moved = await world.reschedule(booking.booking_id, start + timedelta(minutes=20))

    assert utc(moved) == start + timedelta(minutes=20)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_move_onto_an_occupied_slot_is_refused_and_changes_nothing(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    other = await world.new_client()
    mine = await world.book(future_hour(3, 10))
    theirs = await world.book(future_hour(3, 14), client_id=other)

    for target in (
        future_hour(3, 14),
        future_hour(3, 14) + timedelta(minutes=30),
        future_hour(3, 13) + timedelta(minutes=20),
    ):
        error = await refusal(world.reschedule(mine.booking_id, target))
        assert (error.code, error.reason) == (PRECONDITION, "SLOT_UNAVAILABLE"), target

    assert await world.get(mine.booking_id) == mine
    assert await world.get(theirs.booking_id) == theirs
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_a_move_outside_the_therapist_s_hours_is_refused(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    await world.update_therapist(minimum_notice_minutes=600, booking_horizon_days=20)
    booking = await world.book(future_hour(3, 10))

    too_soon = await refusal(world.reschedule(booking.booking_id, datetime.now(UTC) + timedelta(hours=1)))
    too_far = await refusal(world.reschedule(booking.booking_id, future_hour(25, 10)))

    assert (too_soon.code, too_soon.reason) == (PRECONDITION, "INSUFFICIENT_NOTICE")
    assert (too_far.code, too_far.reason) == (PRECONDITION, "BEYOND_BOOKING_HORIZON")
    assert await world.get(booking.booking_id) == booking
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_repeated_move_returns_the_same_booking_without_moving_twice(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(3, 10))
    request_id = str(uuid.uuid4())

    moved = await world.reschedule(booking.booking_id, future_hour(3, 12), request_id=request_id)
    again = await world.reschedule(booking.booking_id, future_hour(3, 12), request_id=request_id)

    assert again == moved
    assert again.reschedule_count == 1

    # A late repeat of an old move does not move the booking back.
    later = await world.reschedule(booking.booking_id, future_hour(3, 16))
    stale = await world.reschedule(booking.booking_id, future_hour(3, 12), request_id=request_id)
    assert stale == later
    assert (utc(stale), stale.reschedule_count) == (future_hour(3, 16), 2)

    reused = await refusal(world.reschedule(booking.booking_id, future_hour(3, 18), request_id=request_id))
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await world.get(booking.booking_id) == later
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_cancelled_booking_cannot_be_moved(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(3, 10))
    cancelled = await world.cancel(booking.booking_id)

    error = await refusal(world.reschedule(booking.booking_id, future_hour(3, 14)))

    assert (error.code, error.reason) == (PRECONDITION, "BOOKING_CANCELLED")
    assert error.metadata["booking_id"] == booking.booking_id
    assert await world.get(booking.booking_id) == cancelled
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_moving_an_unknown_or_malformed_booking_is_refused(world: World) -> None:
    unknown = await refusal(world.reschedule(str(uuid.uuid4()), future_hour(3, 10)))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "BOOKING_NOT_FOUND")

    bad = await refusal(
        world.booking.RescheduleBooking(booking_pb2.RescheduleBookingRequest(booking_id="b-1", request_id=""))
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.field_violations) == {"booking_id", "request_id", "start_time"}
