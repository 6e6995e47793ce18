"""The reconciler: every credit hold left PENDING longer than BOOKING_RECONCILE_AFTER_S (by a
crash, a timeout, a caller who never came back) is resolved from what the calendar says.

For a hold of this protocol the reconciler proposes the refusal BOOKING_ABORTED to the locked
step, on the calendar named in the hold's reference: if the request already has a session (it
committed), the hold is committed and the booking marked paid; otherwise the abort is recorded as
the request's answer (no copy still in flight can commit any more) and the hold is released.
The abort's fingerprint is unknown (NULL), so it answers every copy of the request, whatever it
asked. Holds of the previous version ("booking:<id>") are resolved through its decision log.
Every step is idempotent, so several replicas reconciling at once do no harm.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from booking_service.calendar import Calendar
from booking_service.decisions import Answered, Refusal, Refuse
from booking_service.domain import Booking, BookingAborted
from booking_service.metrics import BookingMetrics
from booking_service.payments import Credits, Payments
from booking_service.requests import HoldOwner, LegacyHold, SeriesHold, hold_of
from booking_service.store import calendar as store
from service_kit.database import Database
from service_kit.errors import DomainError

log = structlog.get_logger()


class Reconciler:
    def __init__(
        self,
        database: Database,
        calendar: Calendar,
        credits: Credits,
        payments: Payments,
        metrics: BookingMetrics,
        *,
        clock: Callable[[], datetime],
        reconcile_after_s: float,
        batch_size: int,
    ) -> None:
        self._database = database
        self._calendar = calendar
        self._credits = credits
        self._payments = payments
        self._metrics = metrics
        self._clock = clock
        self._reconcile_after = timedelta(seconds=reconcile_after_s)
        self._batch_size = batch_size

    async def reconcile_once(self) -> bool:
        """Resolves up to one batch of stale PENDING holds; True when more may be waiting."""
        try:
            held = await self._credits.stale_pending(self._clock() - self._reconcile_after, self._batch_size)
        except DomainError as error:
            # The credit service is down or slow: expected during an outage; the next pass retries.
            log.warning("reconcile_pass_skipped", reason=error.reason)
            return False
        for hold in held:
            owner = hold_of(hold.reference)
            if owner is None:
                continue  # not a booking's hold
            try:
                await self._resolve(owner)
            except DomainError as error:
                log.warning("reconcile_deferred", reservation_id=str(hold.reservation_id), reason=error.reason)
                self._metrics.reconciler_action("deferred")
        return len(held) == self._batch_size

    async def _resolve(self, owner: HoldOwner | SeriesHold | LegacyHold) -> None:
        if isinstance(owner, HoldOwner):
            booking = await self._abandon(owner)
        elif isinstance(owner, SeriesHold):
            booking = await self._abandon_series(owner)
        else:
            booking = await self._abandon_legacy(owner)
        if booking is not None:
            await self._payments.settle(booking)
            log.info("reconciler_committed", reservation_id=str(owner.booking_id))
            self._metrics.reconciler_action("committed")
        else:
            await self._credits.cancel(owner.booking_id)
            log.info("reconciler_released", reservation_id=str(owner.booking_id))
            self._metrics.reconciler_action("released")

    async def _abandon(self, owner: HoldOwner) -> Booking | None:
        """The request's session if it committed; else None, with BOOKING_ABORTED now its answer."""
        proposal = Refuse(owner.booking_id, None, owner.therapist_id, None, Refusal.of(BookingAborted()))
        decision = await self._calendar.decide(proposal)
        assert isinstance(decision, Answered), decision
        return decision.answer.booking

    async def _abandon_series(self, owner: SeriesHold) -> Booking | None:
        """The occurrence's session if its series committed with it; else None, with BOOKING_ABORTED
        now the answer of the whole series when it had none: the abort is proposed for the series
        key, so no copy of the series can place any occurrence any more (an all-or-nothing series
        is never left half placed), and every other hold of the series is released in its turn."""
        proposal = Refuse(owner.series_id, None, owner.therapist_id, None, Refusal.of(BookingAborted()))
        decision = await self._calendar.decide(proposal)
        assert isinstance(decision, Answered), decision
        if decision.answer.booking is None:
            return None  # refused: no occurrence has a session
        async with self._database.pool.acquire() as connection:
            booking = await store.fetch_booking(connection, owner.booking_id)
        return booking if booking is not None and booking.series_id == owner.series_id else None

    async def _abandon_legacy(self, owner: LegacyHold) -> Booking | None:
        async with self._database.pool.acquire() as connection:
            # No decision yet means the booking transaction never committed (or is still running and
            # will now fail to insert its `commit`: the decision row is unique).
            decision = await store.record_legacy_abort(connection, owner.booking_id)
            return await store.fetch_booking(connection, owner.booking_id) if decision == "commit" else None
