"""Every branch of the booking protocol, driven in-process (docs/design.md, "A booking, step by
step"): the credit service refusing, timing out or failing to commit; a conflict found at the
lock; the lock not had in time; the reconciler giving a request up while its booking waits; the
schedule changing under a booking; copies of one request running at once; reschedules. Each test
checks the answer, what a repeat of the request gets, and what the rows and the holds say."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from booking_service.domain import (
    Actor,
    BookingAborted,
    BookingStatus,
    CalendarBusy,
    CancelReason,
    InsufficientCredits,
    OutsideSchedule,
    PaymentStatus,
    SlotUnavailable,
    WeeklyWindowMinutes,
)
from booking_service.holds import CreditServiceTimeout, ReservationGone
from booking_service.requests import NewStart
from service_kit.errors import DomainError
from tests.service.conftest import CALLER, COST, GRANTED, Practice, PracticeFactory, future_hour
from tests.support.fake_credits import HoldState, unavailable


async def answer(practice: Practice, request: object) -> str:
    """A create's answer in words: "booked <id>" or the refusal's reason."""
    try:
        booking = await practice.service.bookings.create(request)  # type: ignore[arg-type]
    except DomainError as error:
        return error.reason
    return f"booked {booking.booking_id}"


async def answers_of(practice: Practice, key: uuid.UUID) -> tuple[int, str | None]:
    """(sessions, recorded refusal) under a request key."""
    sessions = await practice.sql("SELECT 1 FROM booking.sessions WHERE booking_id = $1", key)
    refusals = await practice.sql("SELECT refusal_reason FROM booking.request_answers WHERE request_key = $1", key)
    return len(sessions), refusals[0]["refusal_reason"] if refusals else None


async def test_a_booking_is_placed_paid_and_its_hold_committed(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    request = practice.request(future_hour(3, 10))

    booking = await practice.service.bookings.create(request)

    assert booking.booking_id == request.key
    assert (booking.status, booking.payment_status) == (BookingStatus.CONFIRMED, PaymentStatus.PAID)
    assert practice.credits.holds[request.key].state is HoldState.COMMITTED
    assert practice.credits.calls == [("reserve", request.key), ("commit", request.key)]
    assert await answers_of(practice, request.key) == (1, None)
    # A repeat gets the booking again, and touches no credit.
    assert await practice.service.bookings.create(request) == booking
    assert len(practice.credits.calls) == 2


async def test_a_reserve_refused_is_the_answer_and_holds_nothing(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    poor = practice.new_client(COST - 1)
    request = practice.request(future_hour(3, 10), client_id=poor)

    with pytest.raises(InsufficientCredits) as refused:
        await practice.service.bookings.create(request)

    assert refused.value.metadata == {"available": str(COST - 1), "requested": str(COST)}
    assert await answers_of(practice, request.key) == (0, "INSUFFICIENT_CREDITS")
    assert practice.credits.holds == {}
    # Final for this request id: the same refusal, with its metadata, even once the client can pay;
    # and nothing asked of the credit service again.
    practice.credits.grant(poor, GRANTED)
    with pytest.raises(InsufficientCredits) as again:
        await practice.service.bookings.create(request)
    assert (again.value.message, again.value.metadata) == (refused.value.message, refused.value.metadata)
    assert [call for call, _ in practice.credits.calls] == ["reserve"]


async def test_a_reserve_whose_answer_is_lost_records_nothing_and_a_retry_books_with_the_same_hold(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    practice.credits.reserve_lost_answer = 1  # the hold is made, the answer never arrives
    request = practice.request(future_hour(3, 11))

    with pytest.raises(CreditServiceTimeout):
        await practice.service.bookings.create(request)
    assert await answers_of(practice, request.key) == (0, None)
    assert practice.credits.held(practice.client_id) == COST

    booking = await practice.service.bookings.create(request)
    assert booking.payment_status is PaymentStatus.PAID
    assert list(practice.credits.holds) == [request.key]  # one hold, made once, used by the retry
    assert practice.credits.available(practice.client_id) == GRANTED - COST


async def test_a_commit_that_fails_leaves_the_booking_committing_and_its_event_settles_it(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    practice.credits.commit_failures.append(unavailable())
    request = practice.request(future_hour(3, 12))

    booking = await practice.service.bookings.create(request)

    assert (booking.status, booking.payment_status) == (BookingStatus.CONFIRMED, PaymentStatus.COMMITTING)
    assert practice.credits.holds[request.key].state is HoldState.PENDING
    # The booking's one event row carries the retry (BOOKING_COMMIT_RETRY_AFTER_S is 0 here).
    await practice.service.outbox.deliver_once()
    assert practice.credits.holds[request.key].state is HoldState.COMMITTED
    rows = await practice.sql("SELECT payment_status FROM booking.sessions WHERE booking_id = $1", request.key)
    assert rows[0]["payment_status"] == "paid"
    events = await practice.sql("SELECT kind, status FROM booking.outbox WHERE booking_id = $1", request.key)
    assert [(e["kind"], e["status"]) for e in events] == [("booking_event", "delivered")]


async def test_a_hold_that_can_no_longer_be_committed_cancels_its_booking(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    practice.credits.commit_failures.append(ReservationGone("RESERVATION_EXPIRED", "the reservation expired"))
    request = practice.request(future_hour(3, 13))

    booking = await practice.service.bookings.create(request)

    assert booking.status is BookingStatus.CANCELLED
    assert (booking.cancelled_by, booking.cancel_reason) == (Actor.SYSTEM, CancelReason.PAYMENT_FAILED)
    assert booking.payment_status is PaymentStatus.REFUNDED
    events = await practice.sql(
        "SELECT payload->>'type' AS type FROM booking.outbox WHERE booking_id = $1", request.key
    )
    assert sorted(e["type"] for e in events) == ["booking.cancelled", "booking.confirmed"]


async def test_a_slot_taken_while_the_booking_reserves_is_its_answer_and_the_hold_is_released(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    start = future_hour(3, 14)
    request = practice.request(start)
    rival = practice.request(start, client_id=practice.new_client())

    async def rival_books(reservation_id: uuid.UUID) -> None:
        if reservation_id == request.key:  # once, inside our reserve
            await practice.service.bookings.create(rival)

    practice.credits.before_reserve = rival_books
    with pytest.raises(SlotUnavailable):
        await practice.service.bookings.create(request)

    assert await answers_of(practice, request.key) == (0, "SLOT_UNAVAILABLE")
    assert practice.credits.holds[request.key].state is HoldState.RELEASED
    assert practice.credits.available(practice.client_id) == GRANTED
    assert practice.credits.holds[rival.key].state is HoldState.COMMITTED
    # The rival cancels; the refusal stands for this request id all the same.
    await practice.service.changes.cancel(rival.key, Actor.CLIENT, CancelReason.OTHER)
    with pytest.raises(SlotUnavailable):
        await practice.service.bookings.create(request)


async def test_a_calendar_locked_too_long_is_no_answer_and_the_retry_books_with_the_hold(
    practice_factory: PracticeFactory,
) -> None:
    practice = await practice_factory()
    request = practice.request(future_hour(3, 15))
    async with practice.database.pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock(booking.calendar_lock_key($1))", practice.therapist_id)
        with pytest.raises(CalendarBusy):
            await practice.service.bookings.create(request)
        await transaction.rollback()

    assert await answers_of(practice, request.key) == (0, None)
    assert practice.credits.holds[request.key].state is HoldState.PENDING  # kept for the retry
    booking = await practice.service.bookings.create(request)
    assert booking.payment_status is PaymentStatus.PAID
    assert practice.credits.holds[request.key].state is HoldState.COMMITTED


async def test_the_reconciler_giving_a_request_up_wins_over_its_slow_booking(practice_factory: PracticeFactory) -> None:
    # The reconciler acts on any pending hold at once here.
    practice = await practice_factory(BOOKING_RECONCILE_AFTER_S="0")
    request = practice.request(future_hour(3, 16))

    async def reconciler_runs(reservation_id: uuid.UUID) -> None:
        await practice.service.reconciler.reconcile_once()

    practice.credits.after_reserve = reconciler_runs  # the booking is slow between reserve and decide
    with pytest.raises(BookingAborted):
        await practice.service.bookings.create(request)

    assert await answers_of(practice, request.key) == (0, "BOOKING_ABORTED")
    assert practice.credits.holds[request.key].state is HoldState.RELEASED
    assert practice.credits.available(practice.client_id) == GRANTED
    practice.credits.after_reserve = None
    with pytest.raises(BookingAborted):  # the request's answer, for good
        await practice.service.bookings.create(request)


async def test_a_schedule_changed_while_the_booking_reserves_is_obeyed(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    start = future_hour(3, 10)
    request = practice.request(start)

    async def close_the_mornings(reservation_id: uuid.UUID) -> None:
        afternoons = [WeeklyWindowMinutes(day, 12 * 60, 24 * 60) for day in range(1, 8)]
        await practice.service.catalogue.set_weekly_schedule(practice.therapist_id, afternoons)

    practice.credits.after_reserve = close_the_mornings
    with pytest.raises(OutsideSchedule) as refused:
        await practice.service.bookings.create(request)

    assert refused.value.reason == "OUTSIDE_AVAILABILITY"
    assert await answers_of(practice, request.key) == (0, "OUTSIDE_AVAILABILITY")
    assert practice.credits.holds[request.key].state is HoldState.RELEASED


async def test_copies_of_one_request_at_once_make_one_booking_and_one_hold(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    request = practice.request(future_hour(4, 10))

    async def interleave(reservation_id: uuid.UUID) -> None:
        await asyncio.sleep(0)

    practice.credits.before_reserve = interleave
    answered = await asyncio.gather(*(answer(practice, request) for _ in range(5)))

    assert answered == [f"booked {request.key}"] * 5
    assert list(practice.credits.holds) == [request.key]
    assert practice.credits.available(practice.client_id) == GRANTED - COST
    assert await answers_of(practice, request.key) == (1, None)


async def test_a_copy_refused_while_another_waits_on_its_reserve_gives_both_the_one_answer(
    practice_factory: PracticeFactory,
) -> None:
    """The outside tester's finding, in-process: the first copy waits on a stalled reserve; the
    slot is taken; a second copy is refused; the slot is freed; the first copy then finds the
    refusal at the lock instead of booking, and releases its hold."""
    practice = await practice_factory()
    start = future_hour(4, 12)
    request = practice.request(start)
    rival = practice.request(start, client_id=practice.new_client())
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def stall(reservation_id: uuid.UUID) -> None:
        if reservation_id == request.key and not stalled.is_set():
            stalled.set()
            await resume.wait()

    practice.credits.before_reserve = stall
    first = asyncio.ensure_future(answer(practice, request))
    await stalled.wait()
    await practice.service.bookings.create(rival)
    second = await answer(practice, request)
    await practice.service.changes.cancel(rival.key, Actor.CLIENT, CancelReason.OTHER)
    resume.set()

    assert [second, await first] == ["SLOT_UNAVAILABLE", "SLOT_UNAVAILABLE"]
    assert await answer(practice, request) == "SLOT_UNAVAILABLE"
    assert practice.credits.holds[request.key].state is HoldState.RELEASED
    assert practice.credits.available(practice.client_id) == GRANTED


async def test_a_reschedule_has_one_answer_moved_or_refused(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    booking = await practice.service.bookings.create(practice.request(future_hour(5, 9)))
    other = await practice.service.bookings.create(
        practice.request(future_hour(5, 14), client_id=practice.new_client())
    )
    move = NewStart(CALLER, str(uuid.uuid4()), booking.booking_id, future_hour(5, 11))

    moved = await practice.service.changes.reschedule(move)
    assert (moved.starts_at, moved.reschedule_count) == (move.start, 1)
    assert await practice.service.changes.reschedule(move) == moved  # a repeat: the same answer

    onto_other = NewStart(CALLER, str(uuid.uuid4()), booking.booking_id, other.starts_at)
    with pytest.raises(SlotUnavailable):
        await practice.service.changes.reschedule(onto_other)
    await practice.service.changes.cancel(other.booking_id, Actor.CLIENT, CancelReason.OTHER)
    with pytest.raises(SlotUnavailable):  # refused for good, though the slot is free now
        await practice.service.changes.reschedule(onto_other)
    assert (await practice.service.changes.booking(booking.booking_id)).starts_at == move.start


async def test_a_booking_cancelled_while_it_is_being_moved_refuses_the_move(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    booking = await practice.service.bookings.create(practice.request(future_hour(5, 9)))
    await practice.service.changes.cancel(booking.booking_id, Actor.CLIENT, CancelReason.OTHER)
    move = NewStart(CALLER, str(uuid.uuid4()), booking.booking_id, future_hour(5, 16))

    with pytest.raises(DomainError) as refused:
        await practice.service.changes.reschedule(move)

    assert refused.value.reason == "BOOKING_CANCELLED"
    rows = await practice.sql("SELECT refusal_reason FROM booking.request_answers WHERE request_key = $1", move.key)
    assert [r["refusal_reason"] for r in rows] == ["BOOKING_CANCELLED"]


async def test_a_started_session_cannot_move_by_the_services_clock(practice_factory: PracticeFactory) -> None:
    practice = await practice_factory()
    booking = await practice.service.bookings.create(practice.request(future_hour(2, 9)))
    practice.clock.offset = timedelta(days=3)  # the session is in the past now

    with pytest.raises(DomainError) as refused:
        await practice.service.changes.reschedule(
            NewStart(CALLER, str(uuid.uuid4()), booking.booking_id, future_hour(9, 9))
        )

    assert refused.value.reason == "SESSION_ALREADY_STARTED"
