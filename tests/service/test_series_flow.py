"""A weekly series through each branch that matters, in-process on a real PostgreSQL with the
scripted credit service (tests/service/conftest.py): the credit service losing its answer after
some holds (a retry continues with the same holds), the reconciler giving the series up while a
copy is between its holds and its decision (the abort is the whole series' answer, every hold
released), and credits refused for one occurrence (nothing held, the refusal names it)."""

from __future__ import annotations

import uuid

import pytest

from booking_service.domain import BookingAborted, InsufficientCredits
from booking_service.holds import CreditServiceTimeout
from booking_service.requests import NewSeries, occurrence_id, request_key
from tests.service.conftest import CALLER, COST, GRANTED, Practice, PracticeFactory, future_hour
from tests.support.fake_credits import HoldState

OCCURRENCES = 3


def series(practice: Practice, hour: int, *, client_id: uuid.UUID | None = None) -> NewSeries:
    return NewSeries(
        CALLER,
        str(uuid.uuid4()),
        client_id or practice.client_id,
        practice.therapist_id,
        practice.session_type_id,
        future_hour(3, hour),
        OCCURRENCES,
        1,
        False,
    )


def hold_ids(request: NewSeries) -> list[uuid.UUID]:
    key = request_key(CALLER, request.request_id)
    return [occurrence_id(key, index) for index in range(OCCURRENCES)]


async def sessions_of(practice: Practice, request: NewSeries) -> int:
    rows = await practice.sql("SELECT count(*) AS n FROM booking.sessions WHERE series_id = $1", request.key)
    return int(rows[0]["n"])


async def test_a_lost_answer_after_some_holds_records_nothing_and_a_retry_books_with_the_same_holds(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    request = series(practice, 9)
    practice.credits.reserve_lost_answer = 1  # the first hold is made, its answer lost

    with pytest.raises(CreditServiceTimeout):
        await practice.service.series.create(request)
    assert await sessions_of(practice, request) == 0
    assert [practice.credits.holds[h].state for h in hold_ids(request)[:1]] == [HoldState.PENDING]

    booked = await practice.service.series.create(request)

    assert [b.booking_id for b in booked.bookings] == hold_ids(request)
    assert {practice.credits.holds[h].state for h in hold_ids(request)} == {HoldState.COMMITTED}
    assert practice.credits.available(practice.client_id) == GRANTED - OCCURRENCES * COST
    assert len(practice.credits.holds) == OCCURRENCES


async def test_the_reconciler_giving_a_series_up_wins_over_its_slow_copy_and_releases_every_hold(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory(BOOKING_RECONCILE_AFTER_S="0")
    request = series(practice, 12)
    last = hold_ids(request)[-1]

    async def reconciler_runs(reservation_id: uuid.UUID) -> None:
        if reservation_id == last:  # every hold made, the decision not yet
            await practice.service.reconciler.reconcile_once()

    practice.credits.after_reserve = reconciler_runs
    with pytest.raises(BookingAborted):
        await practice.service.series.create(request)

    assert await sessions_of(practice, request) == 0
    assert {practice.credits.holds[h].state for h in hold_ids(request)} == {HoldState.RELEASED}
    assert practice.credits.available(practice.client_id) == GRANTED
    practice.credits.after_reserve = None
    with pytest.raises(BookingAborted):  # the series' answer, for good
        await practice.service.series.create(request)
    assert await sessions_of(practice, request) == 0


async def test_credits_for_two_of_three_refuse_the_series_naming_the_occurrence_and_hold_nothing(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    poor = practice.new_client(credits=2 * COST)
    request = series(practice, 15, client_id=poor)

    with pytest.raises(InsufficientCredits) as refused:
        await practice.service.series.create(request)

    assert len(refused.value.metadata) == 1 and set(refused.value.metadata.values()) == {"INSUFFICIENT_CREDITS"}
    assert practice.credits.available(poor) == 2 * COST
    assert {hold.state for hold in practice.credits.holds.values() if hold.owner_id == poor} == {HoldState.RELEASED}
    assert await sessions_of(practice, request) == 0
