"""Session outcomes (docs/design.md, "Outcomes and policies"): once a session started, its
therapist or an admin records COMPLETED or NO_SHOW; a no-show refunds the session type's
no-show percentage through the credit service's partial refund. Sessions nobody marked within
BOOKING_OUTCOME_SWEEP_AFTER_S of their end are COMPLETED by the sweeper, so the books close.

Recording is one transaction (the session's row locked, the outcome, its refund and one outbox
event); the refund follows inline, and what does not finish there the event row finishes, as for
a cancellation. Idempotent: the same outcome again returns the session as it stands; another
outcome is refused (OUTCOME_ALREADY_RECORDED). The refund is the reservation's one refund.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

import structlog

from booking_service import events
from booking_service.domain import (
    Actor,
    Booking,
    BookingNotActive,
    BookingNotFound,
    BookingStatus,
    PaymentStatus,
    SessionOutcome,
)
from booking_service.payments import Payments
from booking_service.practice import OutcomeAlreadyRecorded, Policy, SessionNotStarted
from booking_service.store import calendar as calendar_store
from booking_service.store import catalogue as catalogue_store
from booking_service.store import outbox as outbox_store
from booking_service.store import outcomes as store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction
from service_kit.errors import DomainError

log = structlog.get_logger()

_EVENT_TYPES = {SessionOutcome.COMPLETED: events.COMPLETED, SessionOutcome.NO_SHOW: events.NO_SHOW}


class Outcomes:
    def __init__(
        self,
        database: Database,
        payments: Payments,
        *,
        clock: Callable[[], datetime],
        free_cancellation: timedelta,
        sweep_after: timedelta,
        batch_size: int,
    ) -> None:
        self._database = database
        self._payments = payments
        self._clock = clock
        self._free_cancellation = free_cancellation
        self._sweep_after = sweep_after
        self._batch_size = batch_size

    async def record(self, booking_id: uuid.UUID, outcome: SessionOutcome, actor: Actor) -> Booking:
        now = self._clock()

        async def work(connection: Connection) -> tuple[Booking, int]:
            booking = await calendar_store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            if booking.outcome is not None:
                if booking.outcome is not outcome:
                    raise OutcomeAlreadyRecorded(booking_id, booking.outcome)
                return booking, 0  # recorded before: the same answer
            if booking.status is BookingStatus.CANCELLED:
                raise BookingNotActive(booking_id)
            if now < booking.starts_at:
                raise SessionNotStarted(booking_id, booking.starts_at)
            session_type = await catalogue_store.fetch_session_type(
                connection, booking.therapist_id, booking.session_type_id
            )
            assert session_type is not None, booking  # a session's type is never deleted
            refund = Policy.of(session_type, self._free_cancellation).outcome_refund(booking, outcome)
            marked = await store.record_outcome(
                connection,
                booking_id,
                outcome,
                actor=actor,
                at=now,
                refunded_credits=refund,
                payment_status=PaymentStatus.REFUNDING if refund > 0 else booking.payment_status,
            )
            await self._event(connection, marked, now)
            log.info("session_outcome_recorded", booking_id=str(booking_id), outcome=outcome.value, refund=refund)
            return replace(marked, video_room=booking.video_room), refund

        marked, refund = await in_transaction(self._database.pool, work)
        if refund == 0:
            return marked
        try:
            return await self._payments.refund(booking_id, refund)
        except DomainError as error:
            log.warning("refund_deferred", booking_id=str(booking_id), reason=error.reason)
            return marked

    async def sweep_once(self) -> bool:
        """Completes up to one batch of sessions nobody marked; True when more may be waiting."""
        now = self._clock()

        async def work(connection: Connection) -> int:
            completed = await store.complete_unmarked(connection, now - self._sweep_after, now, self._batch_size)
            for booking in completed:
                await self._event(connection, booking, now)
            return len(completed)

        count = await in_transaction(self._database.pool, work)
        if count:
            log.info("sessions_completed_by_sweeper", count=count)
        return count == self._batch_size

    async def _event(self, connection: Connection, booking: Booking, now: datetime) -> None:
        assert booking.outcome is not None, booking
        payload = events.notification_only(events.booking_event(_EVENT_TYPES[booking.outcome], booking, now))
        await outbox_store.enqueue(connection, events.BOOKING_EVENT, booking.booking_id, payload)
