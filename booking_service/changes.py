"""Changes to a booking (cancel it, move it), and reading bookings.

A reschedule goes through the same locked step as a create (booking.decide, proposing a Move):
the same lock, the same conflict predicate, and the same rule that a request has one answer
(a moved booking, or a refusal, recorded for its request key). A cancellation needs no calendar
lock (it frees a slot, it cannot take one): one transaction locks the session's row, records the
cancellation with its refund and its one outbox event; the refund then happens inline, and what
does not finish there the event row finishes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

import structlog

from booking_service import availability, events
from booking_service.calendar import Calendar
from booking_service.catalogue import Catalogue, checked
from booking_service.decisions import Answered, Changed, Move, Moved, Refusal, Refuse, Stale
from booking_service.domain import (
    Actor,
    Booking,
    BookingNotActive,
    BookingNotFound,
    BookingStatus,
    CalendarBusy,
    CancelReason,
    PaymentStatus,
    Refused,
    SessionAlreadyStarted,
    SlotUnavailable,
)
from booking_service.payments import Payments
from booking_service.practice import OutcomeAlreadyRecorded, Policy
from booking_service.requests import NewStart
from booking_service.rules_cache import BookingRules
from booking_service.store import calendar as store
from booking_service.store import catalogue as catalogue_store
from booking_service.store import outbox as outbox_store
from booking_service.store import series as series_store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction
from service_kit.errors import DomainError
from service_kit.pagination import Page

log = structlog.get_logger()

# Tries of a reschedule whose booking or schedule changes under it (each reads them afresh).
MOVE_ATTEMPTS = 3


class Changes:
    def __init__(
        self,
        database: Database,
        catalogue: Catalogue,
        calendar: Calendar,
        payments: Payments,
        *,
        clock: Callable[[], datetime],
        free_cancellation: timedelta,
    ) -> None:
        self._database = database
        self._catalogue = catalogue
        self._calendar = calendar
        self._payments = payments
        self._clock = clock
        self._free_cancellation = free_cancellation

    async def booking(self, booking_id: uuid.UUID) -> Booking:
        async with self._database.pool.acquire() as connection:
            found = await store.fetch_booking(connection, booking_id)
        if found is None:
            raise BookingNotFound(booking_id)
        return found

    async def list_bookings(
        self,
        *,
        client_id: uuid.UUID | None,
        therapist_id: uuid.UUID | None,
        start_after: datetime | None,
        start_before: datetime | None,
        status: BookingStatus | None,
        after: tuple[datetime, uuid.UUID] | None,
        page_size: int,
    ) -> Page[Booking]:
        async with self._database.pool.acquire() as connection:
            found = await store.list_bookings(
                connection,
                client_id=client_id,
                therapist_id=therapist_id,
                start_after=start_after,
                start_before=start_before,
                status=status,
                after=after,
                limit=page_size + 1,
            )
        return Page.from_rows(found, page_size)

    async def reschedule(self, request: NewStart) -> Booking:
        for _ in range(MOVE_ATTEMPTS):
            current = await self.booking(request.booking_id)
            rules = await self._catalogue.rules(current.therapist_id, current.session_type_id)
            schedule, duration = rules.schedule, rules.session_type.duration
            blocked = checked(partial(availability.session_blocked_interval, schedule, request.start, duration))
            now = self._clock()
            refusal = (
                _unmovable(current, now)
                or rules.therapist_closed()  # a retired session type still moves; an archived therapist not
                or self._outside_rules(rules, request.start, now)
            )
            if refusal is not None:
                proposal: Move | Refuse = Refuse(
                    request.key, request.fingerprint, current.therapist_id, current.booking_id, Refusal.of(refusal)
                )
            else:
                proposal = Move(
                    request_key=request.key,
                    fingerprint=request.fingerprint,
                    booking=current,
                    starts_at=request.start,
                    ends_at=request.start + duration,
                    blocked=blocked,
                    schedule_version=rules.schedule_version,
                    now=now,
                    event=self._moved_event(current, request.start, duration, now),
                    if_taken=Refusal.of(SlotUnavailable(request.start)),
                )
            decision = await self._calendar.decide(proposal)
            if isinstance(decision, Moved):
                log.info("booking_rescheduled", booking_id=str(current.booking_id), start=request.start.isoformat())
                return decision.booking
            if isinstance(decision, Answered):
                return decision.answer.given_to(request.fingerprint, request.request_id)
            assert isinstance(decision, Stale | Changed), decision
            if isinstance(decision, Stale):
                self._catalogue.forget(current.therapist_id)
        raise CalendarBusy("the booking or its therapist's schedule kept changing; retry with the same request_id")

    def _outside_rules(self, rules: BookingRules, start: datetime, now: datetime) -> Refused | None:
        schedule, session_type = rules.schedule, rules.session_type
        try:
            checked(
                lambda: availability.check_bookable(
                    schedule, start, session_type.duration, now, step=session_type.start_step
                )
            )
        except Refused as refusal:
            return refusal
        return None

    def _moved_event(self, booking: Booking, start: datetime, duration: timedelta, now: datetime) -> dict[str, object]:
        moved = replace(booking, starts_at=start, ends_at=start + duration)
        return events.booking_event(events.RESCHEDULED, moved, now, previous_start_time=booking.starts_at.isoformat())

    async def cancel(self, booking_id: uuid.UUID, actor: Actor, reason: CancelReason) -> Booking:
        now = self._clock()

        async def work(connection: Connection) -> list[tuple[Booking, int]]:
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            return [await self._cancel_one(connection, booking, actor, reason, now)]

        ((cancelled, refund),) = await in_transaction(self._database.pool, work)
        return await self._refund(cancelled, refund)

    async def cancel_following(self, booking_id: uuid.UUID, actor: Actor, reason: CancelReason) -> list[Booking]:
        """Cancels an occurrence of a series and every later one (a booking of no series: itself),
        in one transaction, each with the refund its own start gives by the policy; then the
        refunds, each on its own (what does not finish here its event row finishes)."""
        now = self._clock()

        async def work(connection: Connection) -> list[tuple[Booking, int]]:
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            following = [booking]
            if booking.series_id is not None and booking.series_index is not None:
                following = await series_store.occurrences_from(connection, booking.series_id, booking.series_index)
            return [await self._cancel_one(connection, one, actor, reason, now) for one in following]

        cancelled = await in_transaction(self._database.pool, work)
        return list(await asyncio.gather(*(self._refund(booking, refund) for booking, refund in cancelled)))

    async def _cancel_one(
        self, connection: Connection, booking: Booking, actor: Actor, reason: CancelReason, now: datetime
    ) -> tuple[Booking, int]:
        """Records one cancellation (its row locked by the caller) with its refund and its event."""
        if booking.status is BookingStatus.CANCELLED:
            return booking, 0  # cancelling twice returns the first cancellation
        if booking.outcome is not None:
            raise OutcomeAlreadyRecorded(booking.booking_id, booking.outcome)  # it happened: nothing to cancel
        if booking.starts_at <= now and actor is not Actor.ADMIN:
            raise SessionAlreadyStarted(booking.booking_id, booking.starts_at)
        refund = (await self._policy(connection, booking)).cancellation_refund(booking, actor, now)
        cancelled = await store.cancel_booking(
            connection,
            booking.booking_id,
            actor=actor,
            reason=reason,
            refunded_credits=refund,
            payment_status=PaymentStatus.REFUNDING if refund > 0 else booking.payment_status,
        )
        event = events.booking_event(events.CANCELLED, cancelled, now)
        await outbox_store.enqueue(connection, events.BOOKING_EVENT, booking.booking_id, event)
        log.info("booking_cancelled", booking_id=str(booking.booking_id), actor=actor.value, refund=refund)
        return replace(cancelled, video_room=booking.video_room), refund

    async def _policy(self, connection: Connection, booking: Booking) -> Policy:
        """The refund policy of the booking's session type, as it stands now."""
        session_type = await catalogue_store.fetch_session_type(
            connection, booking.therapist_id, booking.session_type_id
        )
        assert session_type is not None, booking  # a session's type is never deleted
        return Policy.of(session_type, self._free_cancellation)

    async def _refund(self, cancelled: Booking, refund: int) -> Booking:
        if refund == 0:
            return cancelled
        try:
            return await self._payments.refund(cancelled.booking_id, refund)
        except DomainError as error:
            log.warning("refund_deferred", booking_id=str(cancelled.booking_id), reason=error.reason)
            return cancelled


def _unmovable(booking: Booking, now: datetime) -> Refused | None:
    if booking.status is BookingStatus.CANCELLED:
        return BookingNotActive(booking.booking_id)
    if booking.starts_at <= now:
        return SessionAlreadyStarted(booking.booking_id, booking.starts_at)
    return None
