"""Weekly series through the public API: one request id for N occurrences at the same local time
in the therapist's zone, all or nothing (or book what is free), paid per occurrence, refused as a
whole with each refused occurrence named and nothing held; repeats get the same answer; cancel
one or this and the following; concurrent overlapping series of one therapist never overlap and
stay whole."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest

from booking.v1 import booking_pb2
from tests.support.world import World, assert_books_consistent, outcome, refusal, ts

pytestmark = pytest.mark.timeout(60)

LONDON = "Europe/London"
EVENING = time(18, 0)


def dst_crossing_start(zone_name: str, weeks: int) -> datetime:
    """A start at 18:00 local, a few days ahead, such that a DST change falls within the next
    `weeks` weeks (the first date from which 18:00 `weeks` weeks later has another UTC offset)."""
    zone = ZoneInfo(zone_name)
    day = datetime.now(UTC).date() + timedelta(days=3)
    for _ in range(400):
        first = datetime.combine(day, EVENING, zone)
        last = datetime.combine(day + timedelta(weeks=weeks - 1), EVENING, zone)
        if first.utcoffset() != last.utcoffset():
            return first.astimezone(UTC)
        day += timedelta(days=1)
    raise AssertionError(f"no DST change in {zone_name} within a year")


def series_request(
    world: World,
    start: datetime,
    occurrences: int,
    *,
    client_id: str | None = None,
    request_id: str | None = None,
    interval_weeks: int = 1,
    skip_unavailable: bool = False,
) -> booking_pb2.CreateBookingSeriesRequest:
    return booking_pb2.CreateBookingSeriesRequest(
        request_id=request_id or str(uuid.uuid4()),
        client_id=client_id or world.client_id,
        therapist_id=world.therapist_id,
        session_type_id=world.session_type_id,
        start_time=ts(start),
        occurrences=occurrences,
        interval_weeks=interval_weeks,
        skip_unavailable=skip_unavailable,
    )


async def pending_holds(credit_db: asyncpg.Pool, client_id: str) -> int:
    count = await credit_db.fetchval(
        "SELECT count(*) FROM credit.reservations WHERE owner_id = $1 AND status = 'pending'", uuid.UUID(client_id)
    )
    return int(count)


async def test_a_four_week_series_across_a_dst_change_keeps_its_local_time_and_charges_each_occurrence(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    london = await World.create(world.booking, world.credit, time_zone=LONDON)
    start = dst_crossing_start(LONDON, 4)
    series = await london.booking.CreateBookingSeries(series_request(london, start, 4))

    assert [b.series_index for b in series.bookings] == [0, 1, 2, 3]
    assert {b.series_id for b in series.bookings} == {series.series_id}
    assert all(b.local_start[11:19] == "18:00:00" for b in series.bookings), [b.local_start for b in series.bookings]
    offsets = {b.local_start[19:] for b in series.bookings}
    assert len(offsets) == 2, f"the series should cross a DST change: {offsets}"
    days = [date.fromisoformat(b.local_start[:10]) for b in series.bookings]
    assert [(later - earlier).days for earlier, later in itertools.pairwise(days)] == [7, 7, 7]
    balance = await london.balance()
    assert (balance.available, balance.held) == (100 - 4 * london.credit_cost, 0)
    listed = await london.booking.ListBookings(booking_pb2.ListBookingsRequest(client_id=london.client_id))
    assert {b.series_id for b in listed.bookings} == {series.series_id}
    got = await london.get(series.bookings[2].booking_id)
    assert (got.series_id, got.series_index) == (series.series_id, 2)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[london.therapist_id], client_ids=[london.client_id]
    )


async def test_a_series_with_one_taken_occurrence_is_refused_whole_naming_it_and_holds_nothing(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=3), time(9), UTC)
    other = await world.new_client()
    await world.book(start + timedelta(weeks=2), client_id=other)
    before = await world.balance()
    request = series_request(world, start, 4)

    error = await refusal(world.booking.CreateBookingSeries(request))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "SLOT_UNAVAILABLE"
    assert error.metadata == {"occurrence_2": "SLOT_UNAVAILABLE"}
    assert "occurrence 2" in error.message
    after = await world.balance()
    assert (after.available, after.held) == (before.available, before.held)
    assert await pending_holds(credit_db, world.client_id) == 0
    series_rows = await booking_db.fetchval(
        "SELECT count(*) FROM booking.sessions WHERE client_id = $1", uuid.UUID(world.client_id)
    )
    assert series_rows == 0
    again = await refusal(world.booking.CreateBookingSeries(request))  # a refusal is final for its request id
    assert (again.reason, again.metadata) == (error.reason, error.metadata)


async def test_credits_for_three_of_four_occurrences_refuse_the_series_with_nothing_held(
    world: World, credit_db: asyncpg.Pool
) -> None:
    client = await world.new_client(credits=3 * world.credit_cost)
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=3), time(11), UTC)

    error = await refusal(world.booking.CreateBookingSeries(series_request(world, start, 4, client_id=client)))

    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS")
    assert list(error.metadata.values()) == ["INSUFFICIENT_CREDITS"], error.metadata
    balance = await world.balance(client)
    assert (balance.available, balance.held) == (3 * world.credit_cost, 0)
    assert await pending_holds(credit_db, client) == 0


async def test_book_what_is_free_books_the_free_occurrences_and_reports_the_others(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=3), time(13), UTC)
    other = await world.new_client()
    await world.book(start + timedelta(weeks=1), client_id=other)
    request = series_request(world, start, 3, skip_unavailable=True)

    series = await world.booking.CreateBookingSeries(request)

    assert [b.series_index for b in series.bookings] == [0, 2]
    assert [(s.series_index, s.reason) for s in series.skipped] == [(1, "SLOT_UNAVAILABLE")]
    assert series.skipped[0].start_time.ToDatetime(tzinfo=UTC) == start + timedelta(weeks=1)
    assert (await world.balance()).available == 100 - 2 * world.credit_cost
    repeated = await world.booking.CreateBookingSeries(request)
    assert [b.booking_id for b in repeated.bookings] == [b.booking_id for b in series.bookings]
    assert [(s.series_index, s.reason) for s in repeated.skipped] == [(1, "SLOT_UNAVAILABLE")]
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_a_repeated_series_request_gets_the_same_series_and_is_charged_once(world: World) -> None:
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=4), time(8), UTC)
    request = series_request(world, start, 3, interval_weeks=2)

    first, second = await asyncio.gather(
        world.booking.CreateBookingSeries(request), world.booking.CreateBookingSeries(request)
    )
    third = await world.booking.CreateBookingSeries(request)

    assert first.series_id == second.series_id == third.series_id
    assert [b.booking_id for b in first.bookings] == [b.booking_id for b in third.bookings]
    starts = [b.start_time.ToDatetime(tzinfo=UTC) for b in first.bookings]
    assert starts == [start, start + timedelta(weeks=2), start + timedelta(weeks=4)]
    assert (await world.balance()).available == 100 - 3 * world.credit_cost
    reused = booking_pb2.CreateBookingSeriesRequest()
    reused.CopyFrom(request)
    reused.occurrences = 4
    assert (await refusal(world.booking.CreateBookingSeries(reused))).reason == "REQUEST_ID_REUSED"
    single = world.booking_request(start, request_id=request.request_id)
    assert (await refusal(world.booking.CreateBooking(single))).reason == "REQUEST_ID_REUSED"


async def test_cancel_following_cancels_this_and_every_later_occurrence_each_refunded_by_policy(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    # The first occurrence is 3 hours away: inside the 24-hour free cancellation window.
    start = (datetime.now(UTC) + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    series = await world.booking.CreateBookingSeries(series_request(world, start, 4))
    cancel = booking_pb2.CancelFollowingBookingsRequest(
        booking_id=series.bookings[0].booking_id,
        actor=booking_pb2.CANCELLATION_ACTOR_CLIENT,
        reason=booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
    )
    alone = await world.cancel(series.bookings[3].booking_id)  # one occurrence alone, first

    cancelled = (await world.booking.CancelFollowingBookings(cancel)).bookings

    assert [b.series_index for b in cancelled] == [0, 1, 2, 3]
    assert all(b.status == booking_pb2.BOOKING_STATUS_CANCELLED for b in cancelled)
    refunds = [b.cancellation.refunded_credits for b in cancelled]
    assert refunds == [0, world.credit_cost, world.credit_cost, world.credit_cost]  # late, then in time
    assert alone.cancellation.refunded_credits == world.credit_cost
    assert cancelled[3].cancellation.cancel_time == alone.cancellation.cancel_time  # cancelled once
    again = (await world.booking.CancelFollowingBookings(cancel)).bookings
    assert [b.cancellation.refunded_credits for b in again] == refunds
    balance = await eventually_balance(world, 100 - world.credit_cost)
    assert balance == 100 - world.credit_cost
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def eventually_balance(world: World, expected: int) -> int:
    for _ in range(100):
        available = (await world.balance()).available
        if available == expected:
            return available
        await asyncio.sleep(0.05)
    return available


async def test_overlapping_series_of_two_clients_at_once_never_overlap_and_each_is_whole(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    """Pairs of clients book series of one therapist at the same moment; each pair's series share
    one occurrence's slot (their first starts are a week apart), so at most one of each pair wins,
    whole, and the loser holds nothing."""
    clients = [await world.new_client() for _ in range(8)]
    day = datetime.now(UTC).date() + timedelta(days=3)
    requests = []
    for pair in range(4):
        start = datetime.combine(day, time(6 + 2 * pair), UTC)
        requests.append(series_request(world, start, 3, client_id=clients[2 * pair]))
        requests.append(series_request(world, start + timedelta(weeks=1), 3, client_id=clients[2 * pair + 1]))

    answers = await asyncio.gather(*(outcome(world.booking.CreateBookingSeries(r)) for r in requests))

    for pair in range(4):
        won = [a for a in answers[2 * pair : 2 * pair + 2] if isinstance(a, booking_pb2.CreateBookingSeriesResponse)]
        assert len(won) == 1, answers[2 * pair : 2 * pair + 2]
        assert len(won[0].bookings) == 3
    refused = [a for a in answers if not isinstance(a, booking_pb2.CreateBookingSeriesResponse)]
    assert {a.reason for a in refused} == {"SLOT_UNAVAILABLE"}
    counts = await booking_db.fetch(
        "SELECT series_id, count(*) AS n FROM booking.sessions WHERE therapist_id = $1 GROUP BY series_id",
        uuid.UUID(world.therapist_id),
    )
    assert sorted(row["n"] for row in counts) == [3, 3, 3, 3]
    await assert_books_consistent(booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=clients)


async def test_a_retired_session_type_takes_no_series_and_no_waitlist_entry(
    world: World, credit_db: asyncpg.Pool
) -> None:
    """A series and a waitlist keep the rules of a single booking: a retired type (or an archived
    therapist) refuses every occurrence, with its own reason, and nothing is held."""
    await world.booking.RetireSessionType(
        booking_pb2.RetireSessionTypeRequest(therapist_id=world.therapist_id, session_type_id=world.session_type_id)
    )
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=3), time(9), UTC)
    before = await world.balance()

    for skip_unavailable in (False, True):
        error = await refusal(
            world.booking.CreateBookingSeries(series_request(world, start, 3, skip_unavailable=skip_unavailable))
        )
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_TYPE_RETIRED"), error
        assert error.metadata == {f"occurrence_{index}": "SESSION_TYPE_RETIRED" for index in range(3)}
    joined = await refusal(
        world.booking.JoinWaitlist(
            booking_pb2.JoinWaitlistRequest(
                request_id=str(uuid.uuid4()),
                client_id=world.client_id,
                therapist_id=world.therapist_id,
                session_type_id=world.session_type_id,
                window_start=booking_pb2.LocalDateTime(date_time=f"{start:%Y-%m-%d}T09:00", time_zone="UTC"),
                window_end=booking_pb2.LocalDateTime(date_time=f"{start:%Y-%m-%d}T12:00", time_zone="UTC"),
            )
        )
    )
    assert (joined.code, joined.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_TYPE_RETIRED")
    after = await world.balance()
    assert (after.available, after.held) == (before.available, before.held)
    assert await pending_holds(credit_db, world.client_id) == 0
