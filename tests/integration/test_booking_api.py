"""CreateBooking over real gRPC against real PostgreSQL and a real credit service: the paid path,
the refusals (credits, bad input, unknown ids), idempotency by request_id, and slot overlaps.

Every test makes its own therapist and clients with random ids (`world`), reads refusals the way a
client does (code, ErrorInfo reason and metadata, BadRequest field violations), and checks from
outside through SQL that the credit books hold and agree with the sessions.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc

from booking.v1 import booking_pb2
from booking_service.requests import request_key
from credit.v1 import credit_pb2
from tests.support.auth import OPERATOR_ID
from tests.support.world import (
    World,
    assert_books_consistent,
    eventually,
    future_hour,
    refusal,
    ts,
)

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

BOOKING_DOMAIN = "booking.v1.BookingService"
NIL_UUID = "00000000-0000-0000-0000-000000000000"
SESSION = timedelta(minutes=50)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def instant(message: booking_pb2.Booking | booking_pb2.Slot, field: str = "start_time") -> datetime:
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


async def reservation_count(credit_db: asyncpg.Pool, owner_id: str) -> int:
    async with credit_db.acquire() as connection:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM credit.reservations WHERE owner_id = $1", uuid.UUID(owner_id)
        )
    return count


async def client_bookings(world: World, client_id: str) -> list[booking_pb2.Booking]:
    response = await world.booking.ListBookings(booking_pb2.ListBookingsRequest(client_id=client_id))
    return list(response.bookings)


async def paid(world: World, booking_id: str) -> booking_pb2.Booking:
    """The booking once a read shows it PAID: the mark of payment is written just behind the answer."""
    return await eventually(
        lambda: world.get(booking_id), lambda booking: booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    )


async def assert_untouched(world: World, credit_db: asyncpg.Pool, client_id: str, credits: int) -> None:
    """A refused booking held nothing and made nothing: the balance is whole, no reservation and no
    session exist for the client."""
    balance = await world.balance(client_id)
    assert (balance.available, balance.held, balance.spent, balance.granted) == (credits, 0, 0, credits)
    assert await reservation_count(credit_db, client_id) == 0
    assert await client_bookings(world, client_id) == []


# --- The paid path ---


async def test_booking_with_enough_credits_is_confirmed_paid_and_stored(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    await world.update_therapist(buffer_before_minutes=15, buffer_after_minutes=10)
    start = future_hour(3, 10)
    request = world.booking_request(start)

    booking = (await world.booking.CreateBooking(request)).booking

    assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    # The booking id is the request key: derived from the caller (here the admin who booked) and
    # the request id, so that every copy of the request finds it.
    assert uuid.UUID(booking.booking_id) == request_key(OPERATOR_ID, request.request_id)
    assert (booking.request_id, booking.client_id, booking.therapist_id, booking.session_type_id) == (
        request.request_id,
        world.client_id,
        world.therapist_id,
        world.session_type_id,
    )
    assert (instant(booking), instant(booking, "end_time")) == (start, start + SESSION)
    assert booking.time_zone == "UTC"
    assert booking.local_start == start.isoformat()  # e.g. 2026-11-28T10:00:00+00:00
    assert booking.credit_cost == 10
    assert booking.reschedule_count == 0
    assert not booking.HasField("cancellation")
    # A read shows it PAID once the mark, written behind the answer, is in (at once, or shortly).
    assert (await paid(world, booking.booking_id)) == booking

    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent, balance.granted) == (90, 0, 10, 100)

    # The credits moved through the reservation protocol, keyed by the booking's id.
    entries = [e for e in await world.ledger() if e.reservation_id == booking.booking_id]
    moves = sorted((e.kind, e.available_delta, e.held_delta, e.spent_delta, e.granted_delta) for e in entries)
    assert moves == [
        (credit_pb2.LEDGER_ENTRY_KIND_RESERVE, -10, 10, 0, 0),
        (credit_pb2.LEDGER_ENTRY_KIND_COMMIT, 0, -10, 10, 0),
    ]
    reservation = await world.reservation(booking.booking_id)
    assert reservation.status == credit_pb2.RESERVATION_STATUS_COMMITTED
    assert (reservation.owner_id, reservation.amount, reservation.committed_amount) == (world.client_id, 10, 10)
    assert reservation.reference == f"therapist:{world.therapist_id}/booking:{booking.booking_id}"

    async with booking_db.acquire() as connection:
        row = await connection.fetchrow(
            """SELECT request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, blocked,
                      time_zone, credit_cost, status, payment_status, refunded_credits, cancelled_at
                 FROM booking.sessions WHERE booking_id = $1""",
            uuid.UUID(booking.booking_id),
        )
        # The session is the commit decision: no decision row, no binding row, no answer row.
        bookkeeping = await connection.fetchval(
            """SELECT (SELECT count(*) FROM booking.decisions WHERE reservation_id = $1)
                    + (SELECT count(*) FROM booking.booking_attempts WHERE booking_id = $1)
                    + (SELECT count(*) FROM booking.request_answers WHERE request_key = $1)""",
            uuid.UUID(booking.booking_id),
        )
    assert row is not None
    assert row["request_id"] == request.request_id
    assert (str(row["client_id"]), str(row["therapist_id"]), str(row["session_type_id"])) == (
        world.client_id,
        world.therapist_id,
        world.session_type_id,
    )
    assert (row["starts_at"], row["ends_at"]) == (start, start + SESSION)
    # The calendar is blocked for the session plus the therapist's buffers, half-open.
    blocked = row["blocked"]
    assert (blocked.lower, blocked.upper) == (start - timedelta(minutes=15), start + SESSION + timedelta(minutes=10))
    assert (blocked.lower_inc, blocked.upper_inc) == (True, False)
    assert (row["time_zone"], row["credit_cost"], row["status"], row["payment_status"]) == (
        "UTC",
        10,
        "confirmed",
        "paid",
    )
    assert (row["refunded_credits"], row["cancelled_at"]) == (0, None)
    assert bookkeeping == 0
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_booking_made_by_wall_clock_time_is_the_same_instant(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(4, 15)
    response = await world.booking.CreateBooking(world.local_booking_request(start.strftime("%Y-%m-%dT%H:%M")))
    assert instant(response.booking) == start
    assert response.booking.local_start == start.isoformat()
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


# --- Refusals about credits ---


async def test_too_few_credits_is_refused_and_holds_nothing(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    poor = await world.new_client(credits=5)
    request = world.booking_request(future_hour(3, 10), client_id=poor)

    error = await refusal(world.booking.CreateBooking(request))

    assert (error.code, error.reason, error.domain) == (PRECONDITION, "INSUFFICIENT_CREDITS", BOOKING_DOMAIN)
    assert error.metadata["requested"] == "10"
    assert error.metadata["available"] == "5"
    await assert_untouched(world, credit_db, poor, 5)
    async with booking_db.acquire() as connection:
        answer = await connection.fetchval(
            "SELECT refusal_reason FROM booking.request_answers WHERE request_key = $1",
            request_key(OPERATOR_ID, request.request_id),
        )
        sessions = await connection.fetchval(
            "SELECT count(*) FROM booking.sessions WHERE client_id = $1", uuid.UUID(poor)
        )
    # The refusal is the request's answer, recorded: a retry gets it again (see test_request_ids.py).
    assert (answer, sessions) == ("INSUFFICIENT_CREDITS", 0)
    # The slot stays free for someone who can pay.
    assert (await world.book(future_hour(3, 10))).status == booking_pb2.BOOKING_STATUS_CONFIRMED
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[poor, world.client_id]
    )


async def test_a_client_without_a_credit_account_is_refused_clearly(world: World, credit_db: asyncpg.Pool) -> None:
    stranger = str(uuid.uuid4())

    error = await refusal(world.booking.CreateBooking(world.booking_request(future_hour(3, 10), client_id=stranger)))

    assert (error.code, error.reason, error.domain) == (PRECONDITION, "ACCOUNT_NOT_FOUND", BOOKING_DOMAIN)
    assert await reservation_count(credit_db, stranger) == 0
    assert await client_bookings(world, stranger) == []


# --- Bad input and unknown ids ---


async def test_a_malformed_therapist_id_is_invalid_and_named(world: World, credit_db: asyncpg.Pool) -> None:
    request = world.booking_request(future_hour(3, 10))
    request.therapist_id = "therapist-42"

    error = await refusal(world.booking.CreateBooking(request))

    assert error.code == INVALID
    assert list(error.field_violations) == ["therapist_id"]
    assert "UUID" in error.field_violations["therapist_id"]
    await assert_untouched(world, credit_db, world.client_id, 100)


async def test_an_unknown_therapist_is_not_found(world: World, credit_db: asyncpg.Pool) -> None:
    request = world.booking_request(future_hour(3, 10))
    request.therapist_id = str(uuid.uuid4())

    error = await refusal(world.booking.CreateBooking(request))

    assert (error.code, error.reason) == (NOT_FOUND, "THERAPIST_NOT_FOUND")
    assert error.metadata["therapist_id"] == request.therapist_id
    await assert_untouched(world, credit_db, world.client_id, 100)


async def test_an_unknown_session_type_is_not_found(world: World, credit_db: asyncpg.Pool) -> None:
    unknown = str(uuid.uuid4())

    error = await refusal(
        world.booking.CreateBooking(world.booking_request(future_hour(3, 10), session_type_id=unknown))
    )

    assert (error.code, error.reason) == (NOT_FOUND, "SESSION_TYPE_NOT_FOUND")
    assert error.metadata["session_type_id"] == unknown
    await assert_untouched(world, credit_db, world.client_id, 100)


async def test_a_session_type_of_another_therapist_is_not_found(
    world: World, booking_stub: BookingServiceAsyncStub, credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    other = await World.create(booking_stub, credit_stub, credits=0)

    error = await refusal(
        world.booking.CreateBooking(world.booking_request(future_hour(3, 10), session_type_id=other.session_type_id))
    )

    assert (error.code, error.reason) == (NOT_FOUND, "SESSION_TYPE_NOT_FOUND")
    assert error.metadata["session_type_id"] == other.session_type_id
    await assert_untouched(world, credit_db, world.client_id, 100)


async def test_a_missing_start_is_invalid(world: World, credit_db: asyncpg.Pool) -> None:
    request = world.booking_request(future_hour(3, 10))
    request.ClearField("start_time")

    error = await refusal(world.booking.CreateBooking(request))

    assert error.code == INVALID
    assert list(error.field_violations) == ["start_time"]
    await assert_untouched(world, credit_db, world.client_id, 100)


async def test_a_malformed_local_start_is_invalid(world: World) -> None:
    request = world.local_booking_request("2027-03-28 10:00")  # a space, not "T"

    error = await refusal(world.booking.CreateBooking(request))

    assert error.code == INVALID
    assert list(error.field_violations) == ["local_start.date_time"]


async def test_every_bad_field_is_named_at_once(world: World) -> None:
    request = booking_pb2.CreateBookingRequest(
        request_id="",
        client_id="client",
        therapist_id="",
        session_type_id=NIL_UUID,
    )

    error = await refusal(world.booking.CreateBooking(request))

    assert error.code == INVALID
    assert set(error.field_violations) == {"request_id", "client_id", "therapist_id", "session_type_id", "start_time"}
    assert "nil" in error.field_violations["session_type_id"]


async def test_a_start_outside_the_accepted_years_is_invalid(world: World) -> None:
    request = world.booking_request(datetime(2150, 1, 1, tzinfo=UTC))

    error = await refusal(world.booking.CreateBooking(request))

    assert error.code == INVALID
    assert list(error.field_violations) == ["start_time"]


# --- Idempotency by request_id ---


async def test_a_repeated_request_returns_the_first_booking_and_pays_once(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    request = world.booking_request(future_hour(3, 10))

    first = (await world.booking.CreateBooking(request)).booking
    await paid(world, first.booking_id)
    again = (await world.booking.CreateBooking(request)).booking

    assert again == first
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (90, 0, 10)
    async with booking_db.acquire() as connection:
        sessions = await connection.fetchval(
            "SELECT count(*) FROM booking.sessions WHERE request_id = $1", request.request_id
        )
    assert sessions == 1
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_request_id_reused_with_other_values_is_refused(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    request = world.booking_request(future_hour(3, 10))
    first = (await world.booking.CreateBooking(request)).booking
    other_start = world.booking_request(future_hour(3, 14), request_id=request.request_id)
    other_type = world.booking_request(
        future_hour(3, 10), request_id=request.request_id, session_type_id=await world.add_session_type(30)
    )

    for changed in (other_start, other_type):
        error = await refusal(world.booking.CreateBooking(changed))
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
        assert error.metadata["request_id"] == request.request_id

    assert (await paid(world, first.booking_id)) == first
    assert [b.booking_id for b in await client_bookings(world, world.client_id)] == [first.booking_id]
    assert (await world.balance()).spent == 10
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_refusal_for_credits_is_the_requests_answer_and_a_new_request_books_after_a_top_up(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    poor = await world.new_client(credits=5)
    request = world.booking_request(future_hour(3, 10), client_id=poor)
    error = await refusal(world.booking.CreateBooking(request))
    assert error.reason == "INSUFFICIENT_CREDITS"

    await world.credit.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()), owner_id=poor, amount=20, kind=credit_pb2.GRANT_KIND_PURCHASE
        )
    )
    # A request has one answer: the same request id is refused again, with the same refusal...
    again = await refusal(world.booking.CreateBooking(request))
    assert (again.code, again.reason, again.message, again.metadata) == (
        error.code,
        error.reason,
        error.message,
        error.metadata,
    )
    # ...and a new request books.
    retried = world.booking_request(future_hour(3, 10), client_id=poor)
    booking = (await world.booking.CreateBooking(retried)).booking

    assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
    assert booking.request_id == retried.request_id
    balance = await world.balance(poor)
    assert (balance.available, balance.held, balance.spent, balance.granted) == (15, 0, 10, 25)
    await assert_books_consistent(booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[poor])


# --- Overlaps ---


async def test_the_same_or_an_overlapping_slot_is_refused_without_holding_credits(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(3, 10)
    await world.book(start)
    long_type = await world.add_session_type(120)
    other = await world.new_client()

    attempts = [
        world.booking_request(start, client_id=other),
        world.booking_request(start + timedelta(minutes=15), client_id=other),  # starts inside
        world.booking_request(start - timedelta(minutes=15), client_id=other),  # ends inside
        world.booking_request(start + timedelta(minutes=45), client_id=other),  # five minutes of overlap
        world.booking_request(start - timedelta(minutes=30), client_id=other, session_type_id=long_type),  # covers
    ]
    for request in attempts:
        error = await refusal(world.booking.CreateBooking(request))
        assert (error.code, error.reason) == (PRECONDITION, "SLOT_UNAVAILABLE"), request.start_time
        assert error.metadata["start_time"] == request.start_time.ToDatetime(tzinfo=UTC).isoformat()

    await assert_untouched(world, credit_db, other, 100)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_back_to_back_sessions_are_allowed_without_buffers(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(3, 10)
    middle = await world.book(start)
    after = await world.book(start + SESSION)
    before = await world.book(start - SESSION)

    assert instant(after) == instant(middle, "end_time")
    assert instant(before, "end_time") == instant(middle)
    assert (await world.balance()).spent == 30
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_buffers_keep_sessions_apart_by_before_plus_after(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    await world.update_therapist(buffer_before_minutes=10, buffer_after_minutes=15)
    start = future_hour(3, 10)
    await world.book(start)
    gap = timedelta(minutes=10 + 15)

    for too_close in (
        start + SESSION,
        start + SESSION + gap - timedelta(minutes=5),  # the grid's step (5 minutes) too close
        start - SESSION - gap + timedelta(minutes=5),
    ):
        error = await refusal(world.booking.CreateBooking(world.booking_request(too_close)))
        assert error.reason == "SLOT_UNAVAILABLE", too_close
    assert (await world.balance()).spent == 10

    after = await world.book(start + SESSION + gap)
    before = await world.book(start - SESSION - gap)
    assert after.status == before.status == booking_pb2.BOOKING_STATUS_CONFIRMED

    # The slots offered never reach into a booked session's buffers.
    slots = await world.slots(start - timedelta(hours=4), start + timedelta(hours=4))
    assert slots
    blocked = [
        (instant(b) - timedelta(minutes=10), instant(b, "end_time") + timedelta(minutes=15)) for b in (after, before)
    ]
    blocked.append((start - timedelta(minutes=10), start + SESSION + timedelta(minutes=15)))
    for slot in slots:
        slot_blocked = (instant(slot) - timedelta(minutes=10), instant(slot, "end_time") + timedelta(minutes=15))
        assert all(slot_blocked[1] <= low or high <= slot_blocked[0] for low, high in blocked), slot
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_slots_list_a_booked_slot_until_it_is_taken(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = future_hour(5, 10)
    window = (start - timedelta(hours=2), start + timedelta(hours=2))
    offered = [instant(s) for s in await world.slots(*window)]
    assert start in offered or any(s < start < s + SESSION for s in offered)

    booking = await world.book(start)

    after = await world.slots(*window)
    assert all(instant(s, "end_time") <= instant(booking) or instant(booking, "end_time") <= instant(s) for s in after)
    assert len(after) < len(offered)
    assert ts(start) not in [s.start_time for s in after]
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )
