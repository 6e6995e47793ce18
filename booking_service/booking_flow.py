"""CreateBooking, from the request to its answer (docs/design.md, "A booking, step by step").

    rules     the therapist's schedule and the session type (from memory) say where the session
              would sit, or refuse it;
    look up   the request's answer, if it has one: every repeat gets that answer again. Else the
              cheap pre-check (is the slot taken?) and the schedule's version, read-only;
    refuse    a refusal of the rules or a taken slot becomes the request's answer, under the lock;
    reserve   the credits, under the request key (the booking id): idempotent, so every copy of
              the request shares one hold. A refusal becomes the request's answer;
    decide    the locked step places the session, or answers with the answer the request already
              has, or with SLOT_UNAVAILABLE: once answered, no copy can commit another answer;
    pay       the inline commit; what does not finish here, the booking's event row finishes.

Each step has a typed outcome; the batching of concurrent requests is out of sight, in
`Calendar` and the credit client. The request key is derived from the caller and the request id
(booking_service/requests.py), so nothing is written before the reserve.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from booking_service import availability, events
from booking_service.calendar import Calendar
from booking_service.catalogue import Catalogue, checked
from booking_service.decisions import Answer, Answered, Place, Placed, Refusal, Refuse, Stale
from booking_service.domain import (
    Booking,
    BookingStatus,
    CalendarBusy,
    InsufficientCredits,
    NoCreditAccount,
    PaymentStatus,
    Refused,
    RequestIdReused,
    SlotUnavailable,
)
from booking_service.holds import HoldReused
from booking_service.payments import Credits, Payments
from booking_service.requests import NewBooking, hold_reference
from booking_service.rules_cache import BookingRules

log = structlog.get_logger()

# Tries of a booking whose therapist's schedule changes under it (each read it afresh).
RULES_ATTEMPTS = 3


@dataclass(frozen=True)
class FlowParts:
    """What the booking flows (a booking, a series) work with."""

    catalogue: Catalogue
    calendar: Calendar
    credits: Credits
    payments: Payments
    clock: Callable[[], datetime]
    crash_if: Callable[[str], None]  # a deliberate death at a protocol step, for fault tests
    video_rooms: bool


class BookingFlow:
    def __init__(self, parts: FlowParts) -> None:
        self._catalogue = parts.catalogue
        self._calendar = parts.calendar
        self._credits = parts.credits
        self._payments = parts.payments
        self._clock = parts.clock
        self._crash_if = parts.crash_if
        self._video_rooms = parts.video_rooms

    async def create(self, request: NewBooking) -> Booking:
        held: int | None = None  # the credits this copy holds for the request (kept if the schedule moves)
        for _ in range(RULES_ATTEMPTS):
            rules = await self._catalogue.rules(request.therapist_id, request.session_type_id)
            blocked, refusal = self._check(rules, request.start)
            found = await self._calendar.look_up(request.key, request.therapist_id, (blocked.start, blocked.end))
            if isinstance(found, Answer):
                return await self._given(found, request, held)  # a repeat: its answer
            if found.schedule_version != rules.schedule_version:
                self._catalogue.forget(request.therapist_id)  # the schedule changed: check it again
                continue
            if refusal is None and found.slot_taken:
                refusal = SlotUnavailable(request.start)
            if refusal is None and held is None:
                refusal = await self._reserve(request, rules)
                held = None if refusal is not None else rules.session_type.credit_cost
            if refusal is not None:
                return await self._given(await self._refuse(request, refusal), request, held)
            assert held is not None
            self._crash_if("after_reserve")
            decision = await self._calendar.decide(self._place(request, rules, blocked, held))
            if isinstance(decision, Placed):
                log.info("booking_confirmed", booking_id=str(request.key), therapist_id=str(request.therapist_id))
                self._crash_if("after_booking_commit")
                return await self._payments.pay(decision.booking)
            if isinstance(decision, Answered):
                return await self._given(decision.answer, request, held)
            assert isinstance(decision, Stale), decision
            self._catalogue.forget(request.therapist_id)
        raise CalendarBusy("the therapist's schedule kept changing during this booking; retry with the same request_id")

    async def _given(self, answer: Answer, request: NewBooking, held: int | None) -> Booking:
        """The request's answer, as this copy gives it. A refusal releases the hold this copy
        made: no session will ever pay with it (a hold another copy made, that copy or the
        reconciler releases)."""
        if held is not None and answer.booking is None:
            await self._payments.release(request.key)
        return answer.given_to(request.fingerprint, request.request_id)

    def _check(self, rules: BookingRules, start: datetime) -> tuple[availability.Interval, Refused | None]:
        """What the session would take from the calendar, and the rules' refusal if they refuse
        it (recorded as the answer). A start that is no valid input is refused at once, recording
        nothing: INVALID_ARGUMENT is no answer to a request that never started."""
        duration = rules.session_type.duration
        blocked = checked(lambda: availability.session_blocked_interval(rules.schedule, start, duration))
        closed = rules.closed()  # an archived therapist, a retired session type
        if closed is not None:
            return blocked, closed
        try:
            step = rules.session_type.start_step
            checked(lambda: availability.check_bookable(rules.schedule, start, duration, self._clock(), step=step))
        except Refused as refusal:
            return blocked, refusal
        return blocked, None

    async def _reserve(self, request: NewBooking, rules: BookingRules) -> Refused | None:
        """Holds the session's credits under the request key; the credit service's refusal, if it
        refuses. When it cannot be reached, the error goes to the caller: the hold may exist, and a
        retry with the same request_id continues with it (or the reconciler releases it)."""
        cost, reference = rules.session_type.credit_cost, hold_reference(request.therapist_id, request.key)
        try:
            await self._credits.reserve(request.key, request.client_id, cost, reference)
        except (InsufficientCredits, NoCreditAccount) as refused:
            return refused
        except HoldReused:
            raise RequestIdReused(request.request_id) from None
        return None

    async def _refuse(self, request: NewBooking, refusal: Refused) -> Answer:
        """Records `refusal` as the request's answer, unless it has one (another copy may have
        placed the session meanwhile): the answer that stands."""
        proposal = Refuse(request.key, request.fingerprint, request.therapist_id, None, Refusal.of(refusal))
        decision = await self._calendar.decide(proposal)
        assert isinstance(decision, Answered), decision
        return decision.answer

    def _place(self, request: NewBooking, rules: BookingRules, blocked: availability.Interval, cost: int) -> Place:
        """The session to place, at the price its credits were held for (a price changed since
        the hold does not apply to this booking)."""
        now = self._clock()
        booking = new_booking(request.key, request.request_id, request.client_id, rules, request.start, now, cost)
        return Place(
            fingerprint=request.fingerprint,
            booking=booking,
            blocked=blocked,
            schedule_version=rules.schedule_version,
            event=events.booking_event(events.CONFIRMED, booking, now),
            video_room_name=events.video_room_name(request.key) if self._video_rooms else None,
            if_taken=Refusal.of(SlotUnavailable(request.start)),
        )


def new_booking(  # a booking's own fields, each once
    booking_id: uuid.UUID,
    request_id: str,
    client_id: uuid.UUID,
    rules: BookingRules,
    start: datetime,
    now: datetime,
    cost: int,
    series_id: uuid.UUID | None = None,
    series_index: int | None = None,
) -> Booking:
    """A booking as the locked step inserts it: confirmed, its payment committing, at `cost` (the
    price its credits were held for)."""
    session_type = rules.session_type
    return Booking(
        booking_id=booking_id,
        request_id=request_id,
        client_id=client_id,
        therapist_id=rules.therapist.therapist_id,
        session_type_id=session_type.session_type_id,
        starts_at=start,
        ends_at=start + session_type.duration,
        time_zone=rules.therapist.time_zone,
        credit_cost=cost,
        status=BookingStatus.CONFIRMED,
        payment_status=PaymentStatus.COMMITTING,
        cancelled_by=None,
        cancel_reason=None,
        refunded_credits=0,
        cancelled_at=None,
        reschedule_count=0,
        created_at=now,
        updated_at=now,
        series_id=series_id,
        series_index=series_index,
    )
