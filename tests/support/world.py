"""Test data through the public RPCs: a therapist with a schedule and a session type, a client
with credits. Random ids throughout, so tests never collide.

Also the few things every booking test reads back the way a client does (`refusal`), polls for
(`eventually`), or checks from outside through SQL (`assert_books_consistent`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar, cast

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from booking.v1 import booking_pb2, booking_pb2_grpc
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.errors import ErrorDetails, error_details
from tests.support.invariants import credit_invariant_violations

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

T = TypeVar("T")

ALL_WEEK = [
    booking_pb2.WeeklyWindow(
        day_of_week=day,  # type: ignore[arg-type]  # DayOfWeek numbers 1..7
        window=booking_pb2.TimeWindow(start_time="00:00", end_time="24:00"),
    )
    for day in range(1, 8)
]
SESSION_MINUTES = 50
# How long a test waits for work the service finishes after answering (a deferred cancel, the
# outbox): generous against a loaded CI machine, still far below the test timeout.
SETTLE_TIMEOUT_S = 10.0


def ts(instant: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(instant)
    return message


def future_hour(days_ahead: int = 3, hour: int = 10) -> datetime:
    """A whole hour some days ahead, in UTC."""
    day = datetime.now(UTC).date() + timedelta(days=days_ahead)
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def every_day(*windows: tuple[str, str]) -> list[booking_pb2.WeeklyWindow]:
    """The same wall-clock windows ("HH:MM", "HH:MM") on all seven days."""
    return [
        booking_pb2.WeeklyWindow(
            day_of_week=day,  # type: ignore[arg-type]  # DayOfWeek numbers 1..7
            window=booking_pb2.TimeWindow(start_time=start, end_time=end),
        )
        for day in range(1, 8)
        for start, end in windows
    ]


@dataclass
class World:
    booking: BookingServiceAsyncStub
    credit: CreditServiceAsyncStub
    therapist_id: str
    session_type_id: str
    client_id: str
    credit_cost: int
    time_zone: str = "UTC"

    @classmethod
    async def create(
        cls,
        booking: booking_pb2_grpc.BookingServiceStub,
        credit: credit_pb2_grpc.CreditServiceStub,
        *,
        credits: int = 100,
        credit_cost: int = 10,
        time_zone: str = "UTC",
        buffer_minutes: int = 0,
        weekly: list[booking_pb2.WeeklyWindow] | None = None,
        notice_minutes: int = 0,
        horizon_days: int = 365,
        duration_minutes: int = SESSION_MINUTES,
        start_step_minutes: int = 5,
    ) -> World:
        # The fixtures hand over stubs built on aio channels; their calls are awaitable.
        booking_stub = cast("BookingServiceAsyncStub", booking)
        credit_stub = cast("CreditServiceAsyncStub", credit)
        therapist = await booking_stub.CreateTherapist(
            booking_pb2.CreateTherapistRequest(
                request_id=str(uuid.uuid4()),
                therapist=booking_pb2.Therapist(
                    display_name="Dr. Test",
                    time_zone=time_zone,
                    buffer_before_minutes=buffer_minutes,
                    buffer_after_minutes=buffer_minutes,
                    minimum_notice_minutes=notice_minutes,
                    booking_horizon_days=horizon_days,
                ),
            )
        )
        therapist_id = therapist.therapist.therapist_id
        await booking_stub.SetWeeklySchedule(
            booking_pb2.SetWeeklyScheduleRequest(therapist_id=therapist_id, windows=weekly or ALL_WEEK)
        )
        session_type_id = await _create_session_type(
            booking_stub, therapist_id, duration_minutes, credit_cost, start_step_minutes
        )
        client_id = str(uuid.uuid4())
        if credits:
            await grant(credit_stub, client_id, credits)
        return cls(booking_stub, credit_stub, therapist_id, session_type_id, client_id, credit_cost, time_zone)

    async def add_session_type(self, duration_minutes: int, credit_cost: int | None = None) -> str:
        """Another session type of this therapist; its id."""
        cost = self.credit_cost if credit_cost is None else credit_cost
        return await _create_session_type(self.booking, self.therapist_id, duration_minutes, cost)

    async def new_client(self, credits: int = 100) -> str:
        """Another client, with `credits` (0: no credit account at all)."""
        client_id = str(uuid.uuid4())
        if credits:
            await grant(self.credit, client_id, credits)
        return client_id

    def booking_request(
        self,
        start: datetime,
        *,
        client_id: str | None = None,
        request_id: str | None = None,
        session_type_id: str | None = None,
    ) -> booking_pb2.CreateBookingRequest:
        return booking_pb2.CreateBookingRequest(
            request_id=request_id or str(uuid.uuid4()),
            client_id=client_id or self.client_id,
            therapist_id=self.therapist_id,
            session_type_id=session_type_id or self.session_type_id,
            start_time=ts(start),
        )

    def local_booking_request(
        self,
        date_time: str,
        *,
        disambiguation: booking_pb2.Disambiguation.ValueType = booking_pb2.DISAMBIGUATION_UNSPECIFIED,
        client_id: str | None = None,
        session_type_id: str | None = None,
    ) -> booking_pb2.CreateBookingRequest:
        """A booking at a wall-clock time ("YYYY-MM-DDTHH:MM") in the therapist's zone."""
        return booking_pb2.CreateBookingRequest(
            request_id=str(uuid.uuid4()),
            client_id=client_id or self.client_id,
            therapist_id=self.therapist_id,
            session_type_id=session_type_id or self.session_type_id,
            local_start=booking_pb2.LocalDateTime(
                date_time=date_time, time_zone=self.time_zone, disambiguation=disambiguation
            ),
        )

    async def book(self, start: datetime, **kwargs: str) -> booking_pb2.Booking:
        response = await self.booking.CreateBooking(self.booking_request(start, **kwargs))
        return response.booking

    async def get(self, booking_id: str) -> booking_pb2.Booking:
        response = await self.booking.GetBooking(booking_pb2.GetBookingRequest(booking_id=booking_id))
        return response.booking

    async def cancel(
        self,
        booking_id: str,
        actor: booking_pb2.CancellationActor.ValueType = booking_pb2.CANCELLATION_ACTOR_CLIENT,
        reason: booking_pb2.CancellationReason.ValueType = booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
    ) -> booking_pb2.Booking:
        response = await self.booking.CancelBooking(
            booking_pb2.CancelBookingRequest(booking_id=booking_id, actor=actor, reason=reason)
        )
        return response.booking

    async def reschedule(
        self, booking_id: str, start: datetime, *, request_id: str | None = None
    ) -> booking_pb2.Booking:
        response = await self.booking.RescheduleBooking(
            booking_pb2.RescheduleBookingRequest(
                booking_id=booking_id, request_id=request_id or str(uuid.uuid4()), start_time=ts(start)
            )
        )
        return response.booking

    async def slots(
        self, start: datetime, end: datetime, *, session_type_id: str | None = None, time_zone: str = ""
    ) -> list[booking_pb2.Slot]:
        response = await self.booking.ListAvailableSlots(
            booking_pb2.ListAvailableSlotsRequest(
                therapist_id=self.therapist_id,
                session_type_id=session_type_id or self.session_type_id,
                start_time=ts(start),
                end_time=ts(end),
                time_zone=time_zone,
            )
        )
        return list(response.slots)

    async def balance(self, owner_id: str | None = None) -> credit_pb2.Balance:
        response = await self.credit.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner_id or self.client_id))
        return response.balance

    async def ledger(self, owner_id: str | None = None) -> list[credit_pb2.LedgerEntry]:
        """All of an account's ledger entries, newest first (one page of up to 500 is plenty here)."""
        response = await self.credit.ListLedgerEntries(
            credit_pb2.ListLedgerEntriesRequest(owner_id=owner_id or self.client_id, page_size=500)
        )
        assert not response.next_page_token, "more than one page of ledger entries in a test"
        return list(response.entries)

    async def reservation(self, reservation_id: str) -> credit_pb2.Reservation:
        response = await self.credit.GetReservation(credit_pb2.GetReservationRequest(reservation_id=reservation_id))
        return response.reservation

    async def update_therapist(self, **fields: int | str) -> None:
        await self.booking.UpdateTherapist(
            booking_pb2.UpdateTherapistRequest(
                therapist=booking_pb2.Therapist(therapist_id=self.therapist_id, **fields),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            )
        )


async def _create_session_type(
    booking: BookingServiceAsyncStub,
    therapist_id: str,
    duration_minutes: int,
    credit_cost: int,
    start_step_minutes: int = 5,
) -> str:
    response = await booking.CreateSessionType(
        booking_pb2.CreateSessionTypeRequest(
            therapist_id=therapist_id,
            request_id=str(uuid.uuid4()),
            # Starts every 5 minutes of local time unless asked: the tests' sessions sit back to
            # back or a few minutes apart; the default grid (15 minutes) has tests of its own.
            session_type=booking_pb2.SessionType(
                name=f"Session {duration_minutes} min",
                duration_minutes=duration_minutes,
                credit_cost=credit_cost,
                start_step_minutes=start_step_minutes,
            ),
        )
    )
    return response.session_type.session_type_id


async def grant(credit: credit_pb2_grpc.CreditServiceStub, owner_id: str, amount: int) -> credit_pb2.Balance:
    response = await cast("CreditServiceAsyncStub", credit).GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()), owner_id=owner_id, amount=amount, kind=credit_pb2.GRANT_KIND_PURCHASE
        )
    )
    return response.balance


# --- Reading outcomes ---


async def refusal(call: Awaitable[object]) -> ErrorDetails:
    """The error a call fails with, as a client reads it; fails the test when the call succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return error_details(raised.value)


async def outcome(call: Awaitable[T]) -> T | ErrorDetails:
    """The answer of a call, or the error it failed with: for calls fired together."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error_details(error)


async def eventually(check: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *, timeout_s: float = 5.0) -> T:
    """Polls `check` until `accept` holds for its value, then returns that value; after
    `timeout_s` returns the last value anyway, so the caller's assertion shows what was wrong."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if accept(value) or asyncio.get_running_loop().time() >= deadline:
            return value
        await asyncio.sleep(0.05)


# --- Checking the books from outside, through SQL ---

_OVERLAPPING_SESSIONS_SQL = """
SELECT a.booking_id AS first, b.booking_id AS second
  FROM booking.sessions a
  JOIN booking.sessions b
    ON a.therapist_id = b.therapist_id AND a.booking_id < b.booking_id AND a.blocked && b.blocked
 WHERE a.therapist_id = ANY($1::uuid[]) AND a.status = 'confirmed' AND b.status = 'confirmed'
"""
_SESSIONS_SQL = """
SELECT s.booking_id, s.client_id, s.credit_cost, s.status, s.payment_status, s.refunded_credits,
       s.starts_at, s.ends_at, s.blocked, a.refusal_reason AS refused
  FROM booking.sessions s LEFT JOIN booking.request_answers a ON a.request_key = s.booking_id
 WHERE s.therapist_id = ANY($1::uuid[]) OR s.client_id = ANY($2::uuid[])
"""
_CLIENT_RESERVATIONS_SQL = """
SELECT reservation_id, owner_id, amount, committed_amount, refunded_amount, status, release_reason, reference
  FROM credit.reservations
 WHERE owner_id = ANY($1::uuid[]) OR reservation_id = ANY($2::uuid[])
"""
# A booking's hold names its calendar ("therapist:<id>/booking:<id>"; the previous version's holds
# were "booking:<id>").
_BOOKING_HOLD_PREFIXES = ("therapist:", "booking:")


async def booking_violations(
    booking_db: asyncpg.Pool, credit_db: asyncpg.Pool, therapist_ids: Collection[str], client_ids: Collection[str]
) -> list[str]:
    """Everything that disagrees between the booking side and the credit side, in words, for the
    sessions of these therapists and the bookings' holds of these clients, once all in-flight work
    is done: no two confirmed sessions overlap; no session's request was also answered with a
    refusal; every session has a reservation of its cost from its client whose state matches its
    payment status; and every booking hold without a session was released, never spent."""
    therapists = [uuid.UUID(t) for t in therapist_ids]
    clients = [uuid.UUID(c) for c in client_ids]
    async with booking_db.acquire() as connection:
        overlaps = await connection.fetch(_OVERLAPPING_SESSIONS_SQL, therapists)
        sessions = {row["booking_id"]: row for row in await connection.fetch(_SESSIONS_SQL, therapists, clients)}
    async with credit_db.acquire() as connection:
        reservations = {
            row["reservation_id"]: row
            for row in await connection.fetch(_CLIENT_RESERVATIONS_SQL, clients, list(sessions))
        }
    orphans = [
        rid
        for rid, row in reservations.items()
        if rid not in sessions and row["reference"].startswith(_BOOKING_HOLD_PREFIXES)
    ]
    found = [f"confirmed sessions {row['first']} and {row['second']} overlap" for row in overlaps]
    for booking_id, session in sessions.items():
        found.extend(_session_violations(session, reservations.get(booking_id)))
    for reservation_id in orphans:
        row = reservations[reservation_id]
        if row["status"] != "released":
            found.append(f"hold {reservation_id} has no session but is {row['status']}, not released")
    return found


def _session_violations(session: asyncpg.Record, reservation: asyncpg.Record | None) -> list[str]:
    booking_id = session["booking_id"]
    found = []
    if session["refused"] is not None:
        found.append(f"session {booking_id}: its request was also answered with the refusal {session['refused']}")
    if session["blocked"].lower > session["starts_at"] or session["blocked"].upper < session["ends_at"]:
        found.append(f"session {booking_id}: blocked range {session['blocked']} does not cover the session")
    if reservation is None:
        return [*found, f"session {booking_id} has no credit reservation"]
    if reservation["owner_id"] != session["client_id"] or reservation["amount"] != session["credit_cost"]:
        found.append(
            f"session {booking_id} (client {session['client_id']}, cost {session['credit_cost']}) is paid by "
            f"reservation of {reservation['owner_id']} for {reservation['amount']}"
        )
    payment, status = session["payment_status"], reservation["status"]
    refunded = session["refunded_credits"]
    expected = {
        "paid": ("committed", session["credit_cost"], 0),
        "refunded": ("refunded", session["credit_cost"], refunded),
    }.get(payment)
    if expected is None:
        found.append(f"session {booking_id} is still {payment}")
    elif refunded == 0 and payment == "refunded":
        # Cancelled unpaid (the hold expired before its commit): nothing was ever spent.
        if status != "released":
            found.append(f"session {booking_id} was cancelled unpaid but its reservation is {status}")
    elif (status, reservation["committed_amount"], reservation["refunded_amount"]) != expected:
        found.append(
            f"session {booking_id} is {session['status']}/{payment} (refunded {refunded}) but its reservation is "
            f"{status} (committed {reservation['committed_amount']}, refunded {reservation['refunded_amount']})"
        )
    return found


async def assert_books_consistent(
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
    *,
    therapist_ids: Sequence[str] = (),
    client_ids: Sequence[str] = (),
    timeout_s: float = SETTLE_TIMEOUT_S,
) -> None:
    """The credit invariants hold for these clients, and the booking and credit sides agree
    (`booking_violations`), once the service's deferred work has had `timeout_s` to finish."""
    owners = [uuid.UUID(c) for c in client_ids]

    async def violations() -> list[str]:
        async with credit_db.acquire() as connection:
            credit = await credit_invariant_violations(connection, owners)
        return credit + await booking_violations(booking_db, credit_db, therapist_ids, client_ids)

    found = await eventually(violations, lambda found: not found, timeout_s=timeout_s)
    assert not found, "\n".join(found)


async def scene_rows(booking_db: asyncpg.Pool, credit_db: asyncpg.Pool, world: World) -> tuple[object, ...]:
    """Every row that belongs to the scene, as text: equal snapshots mean nothing changed."""
    therapist, client = uuid.UUID(world.therapist_id), uuid.UUID(world.client_id)
    booking_tables = ("therapists", "weekly_windows", "date_overrides", "session_types", "sessions")
    found: list[object] = []
    for table in booking_tables:
        found.append(
            await booking_db.fetchval(
                f"SELECT string_agg(t::text, '|' ORDER BY t::text) FROM booking.{table} t WHERE therapist_id = $1",
                therapist,
            )
        )
    found.append(await booking_db.fetchval("SELECT count(*) FROM booking.therapists"))
    found.append(await booking_db.fetchval("SELECT count(*) FROM booking.therapists WHERE archived_at IS NOT NULL"))
    found.append(await booking_db.fetchval("SELECT count(*) FROM booking.session_types WHERE retired_at IS NOT NULL"))
    found.append(
        await booking_db.fetchval(
            "SELECT string_agg(e::text, '|' ORDER BY e.endpoint_id) FROM booking.webhook_endpoints e"
        )
    )
    for table in ("accounts", "reservations", "ledger_entries"):
        found.append(
            await credit_db.fetchval(
                f"SELECT string_agg(t::text, '|' ORDER BY t::text) FROM credit.{table} t WHERE owner_id = $1", client
            )
        )
    found.append(await credit_db.fetchval("SELECT count(*) FROM credit.reservations"))
    return tuple(found)
