"""CancelBooking over real gRPC: the refund policy (a client cancelling at least 24 hours ahead,
the default free-cancellation window, gets everything back; later, nothing; a therapist always
refunds in full), idempotency, the slot freed, and the refusals.

The credit side is read back through the credit service's own API (balance, reservation, ledger)
and through SQL (the invariants, and that the two sides agree).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from tests.support.world import World, assert_books_consistent, future_hour, refusal

CLIENT = booking_pb2.CANCELLATION_ACTOR_CLIENT
THERAPIST = booking_pb2.CANCELLATION_ACTOR_THERAPIST
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def soon(hours: float) -> datetime:
    """A start on the session type's grid (5 minutes) about `hours` ahead (no notice needed)."""
    start = (datetime.now(UTC) + timedelta(hours=hours)).replace(second=0, microsecond=0)
    return start - timedelta(minutes=start.minute % 5)


async def refund_entries(world: World, booking_id: str) -> list[credit_pb2.LedgerEntry]:
    return [
        e
        for e in await world.ledger()
        if e.kind == credit_pb2.LEDGER_ENTRY_KIND_REFUND and e.reservation_id == booking_id
    ]


async def test_a_client_cancelling_two_days_ahead_gets_a_full_refund(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(soon(49))

    cancelled = await world.cancel(booking.booking_id, CLIENT, booking_pb2.CANCELLATION_REASON_ILLNESS)

    assert cancelled.status == booking_pb2.BOOKING_STATUS_CANCELLED
    assert cancelled.payment_status == booking_pb2.PAYMENT_STATUS_REFUNDED
    assert cancelled.cancellation.actor == CLIENT
    assert cancelled.cancellation.reason == booking_pb2.CANCELLATION_REASON_ILLNESS
    assert cancelled.cancellation.refunded_credits == 10
    assert abs(cancelled.cancellation.cancel_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    assert (cancelled.start_time, cancelled.booking_id) == (booking.start_time, booking.booking_id)
    assert await world.get(booking.booking_id) == cancelled

    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent, balance.granted) == (100, 0, 0, 100)
    reservation = await world.reservation(booking.booking_id)
    assert reservation.status == credit_pb2.RESERVATION_STATUS_REFUNDED
    assert (reservation.committed_amount, reservation.refunded_amount) == (10, 10)
    assert [(e.available_delta, e.spent_delta) for e in await refund_entries(world, booking.booking_id)] == [(10, -10)]
    async with booking_db.acquire() as connection:
        row = await connection.fetchrow(
            """SELECT status, payment_status, cancelled_by, cancel_reason, refunded_credits, cancelled_at
                 FROM booking.sessions WHERE booking_id = $1""",
            uuid.UUID(booking.booking_id),
        )
    assert row is not None
    assert (
        row["status"],
        row["payment_status"],
        row["cancelled_by"],
        row["cancel_reason"],
        row["refunded_credits"],
    ) == (
        "cancelled",
        "refunded",
        "client",
        "illness",
        10,
    )
    assert row["cancelled_at"] is not None
    # The cancellation's event id is made by the service, time-ordered (UUIDv7: docs/performance.md).
    async with booking_db.acquire() as connection:
        event_ids = await connection.fetch(
            "SELECT event_id FROM booking.outbox WHERE booking_id = $1 AND payload->>'type' = 'booking.cancelled'",
            uuid.UUID(booking.booking_id),
        )
    assert [row["event_id"].version for row in event_ids] == [7]
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_client_cancelling_within_a_day_gets_nothing_back(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(soon(2))

    cancelled = await world.cancel(booking.booking_id, CLIENT)

    assert cancelled.status == booking_pb2.BOOKING_STATUS_CANCELLED
    assert cancelled.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    assert cancelled.cancellation.refunded_credits == 0
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (90, 0, 10)
    assert (await world.reservation(booking.booking_id)).status == credit_pb2.RESERVATION_STATUS_COMMITTED
    assert await refund_entries(world, booking.booking_id) == []
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_therapist_cancelling_late_refunds_in_full(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(soon(2))

    cancelled = await world.cancel(booking.booking_id, THERAPIST, booking_pb2.CANCELLATION_REASON_THERAPIST_UNAVAILABLE)

    assert cancelled.payment_status == booking_pb2.PAYMENT_STATUS_REFUNDED
    assert (cancelled.cancellation.actor, cancelled.cancellation.refunded_credits) == (THERAPIST, 10)
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (100, 0, 0)
    assert (await world.reservation(booking.booking_id)).status == credit_pb2.RESERVATION_STATUS_REFUNDED
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_cancelling_twice_returns_the_first_cancellation_and_refunds_once(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(4, 10))
    first = await world.cancel(booking.booking_id, CLIENT, booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT)

    again = await world.cancel(booking.booking_id, THERAPIST, booking_pb2.CANCELLATION_REASON_OTHER)

    assert again == first
    assert (again.cancellation.actor, again.cancellation.reason) == (
        CLIENT,
        booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
    )
    assert len(await refund_entries(world, booking.booking_id)) == 1
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (100, 0, 0)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_cancelled_slot_can_be_booked_again(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(4, 10)
    window = (start - timedelta(hours=3), start + timedelta(hours=3))
    free = await world.slots(*window)
    booking = await world.book(start)
    while_booked = await world.slots(*window)
    other = await world.new_client()

    await world.cancel(booking.booking_id)
    after_cancel = await world.slots(*window)
    rebooked = await world.book(start, client_id=other)

    assert len(while_booked) < len(free)
    assert after_cancel == free
    assert rebooked.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    assert rebooked.booking_id != booking.booking_id
    assert (await world.balance(other)).spent == 10
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_a_cancellation_by_the_system_or_for_payment_failure_is_not_for_clients(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(4, 10))
    requests = {
        "actor": booking_pb2.CancelBookingRequest(
            booking_id=booking.booking_id,
            actor=booking_pb2.CANCELLATION_ACTOR_SYSTEM,
            reason=booking_pb2.CANCELLATION_REASON_OTHER,
        ),
        "reason": booking_pb2.CancelBookingRequest(
            booking_id=booking.booking_id, actor=CLIENT, reason=booking_pb2.CANCELLATION_REASON_PAYMENT_FAILED
        ),
    }
    for field, request in requests.items():
        error = await refusal(world.booking.CancelBooking(request))
        assert error.code == INVALID
        assert list(error.field_violations) == [field]

    missing = await refusal(
        world.booking.CancelBooking(booking_pb2.CancelBookingRequest(booking_id=booking.booking_id))
    )
    assert missing.code == INVALID
    assert set(missing.field_violations) == {"actor", "reason"}
    assert await world.get(booking.booking_id) == booking
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_cancelling_an_unknown_booking_is_not_found(world: World) -> None:
    unknown = str(uuid.uuid4())
    error = await refusal(world.cancel(unknown))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "BOOKING_NOT_FOUND")
    assert error.metadata["booking_id"] == unknown

    malformed = await refusal(world.cancel("booking-1"))
    assert malformed.code == INVALID
    assert list(malformed.field_violations) == ["booking_id"]
