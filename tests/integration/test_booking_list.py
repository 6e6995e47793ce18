"""ListBookings over real gRPC: by client or by therapist, filtered by time and status, paged with
opaque tokens that visit every booking exactly once and refuse tampering."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest

from booking.v1 import booking_pb2
from tests.support.world import World, assert_books_consistent, future_hour, refusal, ts

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CONFIRMED = booking_pb2.BOOKING_STATUS_CONFIRMED
CANCELLED = booking_pb2.BOOKING_STATUS_CANCELLED


@dataclass
class Diary:
    """One client's seven bookings with the `world` therapist (two cancelled), one booking of
    another client with that therapist, and one of the client with a second therapist at the
    same instant as one of the first (a tie that only the booking id orders)."""

    world: World
    other_client: str
    second_therapist: World
    mine: list[booking_pb2.Booking]  # by start time
    theirs: booking_pb2.Booking
    elsewhere: booking_pb2.Booking


@pytest.fixture
async def diary(
    world: World,
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> AsyncIterator[Diary]:
    mine = [await world.book(future_hour(3, 8) + timedelta(hours=2 * n)) for n in range(7)]
    for index in (1, 4):
        mine[index] = await world.cancel(mine[index].booking_id)
    other = await world.new_client()
    theirs = await world.book(future_hour(3, 7), client_id=other)
    second = await World.create(booking_stub, credit_stub, credits=0)
    elsewhere = await second.book(future_hour(3, 12), client_id=world.client_id)
    yield Diary(world, other, second, mine, theirs, elsewhere)
    await assert_books_consistent(
        booking_db,
        credit_db,
        therapist_ids=[world.therapist_id, second.therapist_id],
        client_ids=[world.client_id, other],
    )


async def listing(world: World, **filters: object) -> booking_pb2.ListBookingsResponse:
    return await world.booking.ListBookings(booking_pb2.ListBookingsRequest(**filters))  # type: ignore[arg-type]


async def all_pages(world: World, page_size: int, **filters: object) -> tuple[list[booking_pb2.Booking], int]:
    """Every booking through the pages, and how many pages it took."""
    found: list[booking_pb2.Booking] = []
    token, pages = "", 0
    while True:
        response = await listing(world, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(response.bookings) <= page_size
        found.extend(response.bookings)
        token = response.next_page_token
        if not token:
            return found, pages
        assert pages < 20, "paging does not end"


def ids(bookings: list[booking_pb2.Booking]) -> list[str]:
    return [b.booking_id for b in bookings]


def by_time(bookings: list[booking_pb2.Booking]) -> list[str]:
    ordered = sorted(bookings, key=lambda b: (b.start_time.ToDatetime(), b.booking_id))
    return ids(ordered)


async def test_a_client_s_bookings_are_listed_by_start_time(diary: Diary) -> None:
    response = await listing(diary.world, client_id=diary.world.client_id)

    assert ids(list(response.bookings)) == by_time([*diary.mine, diary.elsewhere])
    assert response.next_page_token == ""
    assert response.bookings[0] == diary.mine[0]


async def test_a_therapist_s_bookings_include_every_client(diary: Diary) -> None:
    response = await listing(diary.world, therapist_id=diary.world.therapist_id)

    assert ids(list(response.bookings)) == by_time([*diary.mine, diary.theirs])
    assert diary.elsewhere.booking_id not in ids(list(response.bookings))


async def test_time_range_and_status_filters(diary: Diary) -> None:
    world, mine = diary.world, diary.mine
    after, before = mine[2].start_time, mine[5].start_time

    in_range = await listing(world, therapist_id=world.therapist_id, start_after=after, start_before=before)
    confirmed = await listing(world, client_id=world.client_id, status=CONFIRMED)
    cancelled = await listing(world, client_id=world.client_id, status=CANCELLED)
    cancelled_late = await listing(
        world, therapist_id=world.therapist_id, status=CANCELLED, start_after=mine[3].start_time
    )

    assert ids(list(in_range.bookings)) == ids(mine[2:5])  # start_after inclusive, start_before exclusive
    assert ids(list(confirmed.bookings)) == by_time([b for b in [*mine, diary.elsewhere] if b.status == CONFIRMED])
    assert ids(list(cancelled.bookings)) == ids([mine[1], mine[4]])
    assert ids(list(cancelled_late.bookings)) == [mine[4].booking_id]


@pytest.mark.parametrize("page_size", [1, 3, 8, 9])
async def test_pages_visit_every_booking_exactly_once(diary: Diary, page_size: int) -> None:
    expected = by_time([*diary.mine, diary.elsewhere])  # 8, with a tie at 12:00

    found, pages = await all_pages(diary.world, page_size, client_id=diary.world.client_id)

    assert ids(found) == expected
    assert pages == -(-len(expected) // page_size)  # no empty last page, even when the pages come out even


async def test_pages_keep_their_filters(diary: Diary) -> None:
    world = diary.world
    confirmed = by_time([b for b in [*diary.mine, diary.theirs] if b.status == CONFIRMED])

    found, _ = await all_pages(world, 2, therapist_id=world.therapist_id, status=CONFIRMED)

    assert ids(found) == confirmed


async def test_a_tampered_or_foreign_page_token_is_refused(diary: Diary) -> None:
    world = diary.world
    first = await listing(world, client_id=world.client_id, page_size=2)
    token = first.next_page_token
    assert token
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    forged_cursor = dict(payload, c=["yesterday", "not-a-uuid"])
    forged_filters = dict(payload, f="0" * 16)

    tampered = [
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        "!!not base64!!",
        base64.urlsafe_b64encode(json.dumps(forged_cursor).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(forged_filters).encode()).decode(),
        "x" * 2000,
    ]
    for bad in tampered:
        error = await refusal(listing(world, client_id=world.client_id, page_size=2, page_token=bad))
        assert error.code == INVALID, bad
        assert list(error.field_violations) == ["page_token"], bad

    # A good token used with other filters is refused too, rather than silently skipping bookings.
    for filters in (
        {"client_id": diary.other_client},
        {"therapist_id": world.therapist_id},
        {"client_id": world.client_id, "status": CONFIRMED},
    ):
        error = await refusal(listing(world, page_size=2, page_token=token, **filters))
        assert (error.code, list(error.field_violations)) == (INVALID, ["page_token"]), filters


async def test_exactly_one_of_client_and_therapist_is_required(diary: Diary) -> None:
    world = diary.world
    neither = await refusal(listing(world))
    both = await refusal(listing(world, client_id=world.client_id, therapist_id=world.therapist_id))
    malformed = await refusal(listing(world, client_id="me", start_after=ts(future_hour(3, 8))))

    for error in (neither, both):
        assert error.code == INVALID
        assert "client_id" in error.field_violations
    assert (malformed.code, list(malformed.field_violations)) == (INVALID, ["client_id"])


async def test_a_client_with_no_bookings_gets_an_empty_list(world: World) -> None:
    response = await listing(world, client_id=await world.new_client(credits=0))
    assert list(response.bookings) == []
    assert response.next_page_token == ""
