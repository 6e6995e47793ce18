"""Moving a booking's credits: what the flow, the changes, the outbox worker and the reconciler
ask of the credit service, and how a booking's payment status follows.

Every call here is idempotent by reservation id (a booking's request key), so each may be
repeated by whoever finds it unfinished: the inline call after a booking or a cancellation, the
outbox worker from the booking's event row (docs/design.md, "Payments that did not settle"), the
reconciler from a stale hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Protocol

import structlog

from booking_service import events
from booking_service.calendar import Calendar
from booking_service.domain import Actor, Booking, BookingNotFound, BookingStatus, CancelReason, PaymentStatus
from booking_service.holds import HeldReservation, HoldRequest, ReservationGone
from booking_service.store import calendar as store
from booking_service.store import outbox as outbox_store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction
from service_kit.errors import DomainError

log = structlog.get_logger()

# A hold that went back to available (expired) or was refunded before: nothing is left to move.
_SETTLED_REFUND_REASONS = ("RESERVATION_EXPIRED", "RESERVATION_ALREADY_REFUNDED")


class Credits(Protocol):
    """What the booking service needs of the credit service (booking_service/credits.py over
    gRPC; a scripted fake in the service tests). Refusals are domain errors: InsufficientCredits,
    NoCreditAccount, HoldReused, ReservationGone; CreditServiceUnavailable and
    CreditServiceTimeout when the answer is unknown."""

    async def reserve(self, reservation_id: uuid.UUID, owner_id: uuid.UUID, amount: int, reference: str) -> None: ...
    async def reserve_all(self, holds: Sequence[HoldRequest]) -> list[DomainError | None]: ...
    async def commit(self, reservation_id: uuid.UUID) -> None: ...
    async def cancel(self, reservation_id: uuid.UUID) -> None: ...
    async def refund(self, reservation_id: uuid.UUID, amount: int) -> None: ...
    async def stale_pending(self, created_before: datetime, limit: int) -> list[HeldReservation]: ...


class Payments:
    def __init__(
        self,
        database: Database,
        credits: Credits,
        calendar: Calendar,
        clock: Callable[[], datetime],
        crash_if: Callable[[str], None],
    ) -> None:
        self._database = database
        self._credits = credits
        self._calendar = calendar
        self._clock = clock
        self._crash_if = crash_if

    async def pay(self, booking: Booking) -> Booking:
        """The inline commit of a booking just placed. The booking as it now stands: PAID, still
        COMMITTING when the credit service did not answer (the booking's event row retries), or
        cancelled when the hold can no longer be committed (it expired)."""
        self._crash_if("before_commit_reservation")
        try:
            await self._credits.commit(booking.booking_id)
        except ReservationGone as gone:
            return await self._cancel_unpaid(booking.booking_id, gone)
        except DomainError as error:
            log.warning("reservation_commit_deferred", booking_id=str(booking.booking_id), reason=error.reason)
            return booking
        try:
            await self._calendar.mark_paid(booking.booking_id)
        except DomainError as error:  # the database: the event row marks it when it settles
            log.warning("payment_mark_deferred", booking_id=str(booking.booking_id), reason=error.reason)
            return booking
        return replace(booking, payment_status=PaymentStatus.PAID)

    async def settle(self, booking: Booking) -> None:
        """Finishes a payment that did not settle inline (the outbox worker, the reconciler):
        commits a COMMITTING booking's hold and marks it PAID, refunds a REFUNDING one. Raises what
        the credit service answered when it did not settle, for the caller to retry."""
        if booking.payment_status is PaymentStatus.COMMITTING:
            try:
                await self._credits.commit(booking.booking_id)
            except ReservationGone as gone:
                await self._cancel_unpaid(booking.booking_id, gone)
                return
            async with self._database.pool.acquire() as connection:
                await store.mark_paid(connection, [booking.booking_id])
        elif booking.payment_status is PaymentStatus.REFUNDING:
            await self.refund(booking.booking_id, booking.refunded_credits)

    async def refund(self, booking_id: uuid.UUID, amount: int) -> Booking:
        """Commits (idempotent: a cancellation may come before the commit) then refunds `amount`,
        and marks the booking REFUNDED."""
        try:
            await self._credits.commit(booking_id)
            await self._credits.refund(booking_id, amount)
        except ReservationGone as gone:
            if gone.reason not in _SETTLED_REFUND_REASONS:
                raise
        async with self._database.pool.acquire() as connection:
            await store.mark_payment(
                connection, booking_id, expected=PaymentStatus.REFUNDING, new=PaymentStatus.REFUNDED
            )
            booking = await store.fetch_booking(connection, booking_id)
        if booking is None:
            raise BookingNotFound(booking_id)
        return booking

    async def release(self, request_key: uuid.UUID) -> None:
        """Releases the hold of a request answered with a refusal. What fails here the reconciler
        finishes: the refusal stands either way."""
        try:
            await self._credits.cancel(request_key)
        except Exception as error:  # noqa: BLE001  # the answer stands; the hold is the reconciler's
            log.warning("hold_release_deferred", booking_id=str(request_key), error=repr(error))

    async def _cancel_unpaid(self, booking_id: uuid.UUID, gone: ReservationGone) -> Booking:
        """A hold that can no longer be committed (it expired) cancels its booking: no session stays
        unpaid, and the credits are back in the client's available balance already."""
        log.error("reservation_lost_before_commit", booking_id=str(booking_id), reason=gone.reason)

        async def work(connection: Connection) -> Booking:
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            already = booking.status is BookingStatus.CANCELLED
            cancelled = await store.cancel_booking(
                connection,
                booking_id,
                actor=booking.cancelled_by or Actor.SYSTEM,  # a cancellation that came first stands
                reason=booking.cancel_reason or CancelReason.PAYMENT_FAILED,
                refunded_credits=booking.refunded_credits if already else 0,
                payment_status=PaymentStatus.REFUNDED,
            )
            if not already:
                event = events.booking_event(events.CANCELLED, cancelled, self._clock())
                await outbox_store.enqueue(connection, events.BOOKING_EVENT, booking_id, event)
            return replace(cancelled, video_room=booking.video_room)

        return await in_transaction(self._database.pool, work)
