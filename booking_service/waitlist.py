"""The waitlist (docs/design.md, "The waitlist"): a client waits for a start of a session type of
a therapist within a window of times. Every BOOKING_WAITLIST_INTERVAL_S a pass expires the offers
past their hold (their entries wait again) and the entries whose window passed, then takes the
waiting entries in the order they joined and offers each the first free start in its window that
it was not offered before and that no other open offer holds: an offer holds the slot for
BOOKING_WAITLIST_OFFER_HOLD_S (the one conflict predicate counts it; see migration 0014), and its
client is told through the outbox (`waitlist.offered`). The first entry gets a freed slot first;
when its hold expires untaken, the next entry gets it.

Accepting binds the offer to the booking the client's request makes (its request key) and books
the slot through the ordinary booking flow, which the hold lets through for that booking only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial

import structlog

from booking_service import availability, events
from booking_service.booking_flow import BookingFlow
from booking_service.catalogue import Catalogue, checked
from booking_service.domain import Booking, RequestIdReused
from booking_service.practice import (
    OfferNotFound,
    OfferNotOpen,
    WaitlistEntry,
    WaitlistEntryNotFound,
    WaitlistStatus,
)
from booking_service.requests import NewBooking, NewWaitlistEntry, request_key
from booking_service.store import outbox as outbox_store
from booking_service.store import waitlist as store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction

log = structlog.get_logger()

OFFERED = events.WAITLIST_OFFERED
# How far a pass looks into one entry's window for a free start.
MAX_SEARCH = timedelta(days=31)


class Waitlist:
    def __init__(
        self,
        database: Database,
        catalogue: Catalogue,
        bookings: BookingFlow,
        *,
        clock: Callable[[], datetime],
        offer_hold: timedelta,
        lock_timeout_ms: int,
        batch_size: int,
    ) -> None:
        self._database = database
        self._catalogue = catalogue
        self._bookings = bookings
        self._clock = clock
        self._offer_hold = offer_hold
        self._lock_timeout_ms = lock_timeout_ms
        self._batch_size = batch_size

    async def join(self, request: NewWaitlistEntry) -> WaitlistEntry:
        rules = await self._catalogue.rules(request.therapist_id, request.session_type_id)  # both exist, and match
        closed = rules.closed()
        if closed is not None:
            raise closed  # no start of an archived therapist or a retired session type will be offered
        entry = WaitlistEntry(
            request.key,
            request.request_id,
            request.fingerprint,
            request.client_id,
            request.therapist_id,
            request.session_type_id,
            request.wanted_from,
            request.wanted_until,
            WaitlistStatus.WAITING,
            None,
            self._clock(),
        )
        async with self._database.pool.acquire() as connection:
            stored = await store.insert_entry(connection, entry)
        if stored.fingerprint != request.fingerprint:
            raise RequestIdReused(request.request_id)
        return stored

    async def entry(self, entry_id: uuid.UUID) -> WaitlistEntry:
        async with self._database.pool.acquire() as connection:
            found = await store.fetch_entry(connection, entry_id)
        if found is None:
            raise WaitlistEntryNotFound(entry_id)
        return found

    async def leave(self, entry_id: uuid.UUID) -> WaitlistEntry:
        async def work(connection: Connection) -> WaitlistEntry:
            await store.leave(connection, entry_id)
            found = await store.fetch_entry(connection, entry_id)
            if found is None:
                raise WaitlistEntryNotFound(entry_id)
            return found

        return await in_transaction(self._database.pool, work)

    async def entry_of_offer(self, offer_id: uuid.UUID) -> WaitlistEntry:
        async with self._database.pool.acquire() as connection:
            found = await store.fetch_offer(connection, offer_id)
            entry = None if found is None else await store.fetch_entry(connection, found[0].entry_id)
        if entry is None:
            raise OfferNotFound(offer_id)
        return entry

    async def accept(self, offer_id: uuid.UUID, caller: str, request_id: str) -> Booking:
        """Books the offered slot for the entry's client, under the caller's request id."""
        booking_id = request_key(caller, request_id)
        async with self._database.pool.acquire() as connection:
            found = await store.fetch_offer(connection, offer_id)
            if found is None:
                raise OfferNotFound(offer_id)
            offer, bound = found
            entry = await store.fetch_entry(connection, offer.entry_id)
            assert entry is not None
            repeat = offer.status == "taken" and bound == booking_id
            if not repeat and not await store.bind_offer(connection, offer_id, booking_id, self._clock()):
                raise OfferNotOpen(offer_id, "expired" if offer.status == "open" else offer.status)
        booking = await self._bookings.create(
            NewBooking(caller, request_id, entry.client_id, entry.therapist_id, entry.session_type_id, offer.starts_at)
        )
        async with self._database.pool.acquire() as connection:
            await store.mark_taken(connection, offer_id, booking.booking_id)
        log.info("waitlist_offer_taken", offer_id=str(offer_id), booking_id=str(booking.booking_id))
        return booking

    async def offer_once(self) -> bool:
        """One pass: expiries, then an offer for each waiting entry that has a free start."""
        now = self._clock()
        async with self._database.pool.acquire() as connection:
            await store.expire(connection, now)
            entries = await store.waiting(connection, self._batch_size)
        for entry in entries:
            await self._offer(entry, now)
        return len(entries) == self._batch_size

    async def _offer(self, entry: WaitlistEntry, now: datetime) -> None:
        start, end = max(entry.wanted_from, now), min(entry.wanted_until, max(entry.wanted_from, now) + MAX_SEARCH)
        if start >= end:
            return
        rules = await self._catalogue.rules(entry.therapist_id, entry.session_type_id)
        if rules.closed() is not None:
            return  # archived or retired since the entry joined: nothing to offer (and no error per pass)
        _, slots = await self._catalogue.available_slots(entry.therapist_id, entry.session_type_id, start, end)
        duration = rules.session_type.duration
        async with self._database.pool.acquire() as connection:
            before = await store.offered_before(connection, entry.entry_id)
            held = [
                availability.Interval(low, high)
                for low, high in await store.open_offer_ranges(connection, entry.therapist_id)
            ]
        for slot in slots:
            blocked = checked(partial(availability.session_blocked_interval, rules.schedule, slot.start, duration))
            if slot.start in before or any(blocked.overlaps(other) for other in held):
                continue
            if await self._make_offer(entry, slot.start, blocked, now):
                return

    async def _make_offer(
        self, entry: WaitlistEntry, start: datetime, blocked: availability.Interval, now: datetime
    ) -> bool:
        offer_id, expires_at = uuid.uuid4(), now + self._offer_hold

        async def work(connection: Connection) -> bool:
            made = await store.offer_slot(
                connection,
                offer_id,
                entry.entry_id,
                entry.therapist_id,
                start,
                (blocked.start, blocked.end),
                expires_at,
                lock_timeout_ms=self._lock_timeout_ms,
            )
            if made:
                payload = events.notification_only(
                    {
                        "type": OFFERED,
                        "occurred_at": now.isoformat(),
                        "data": {
                            "offer_id": str(offer_id),
                            "entry_id": str(entry.entry_id),
                            "client_id": str(entry.client_id),
                            "therapist_id": str(entry.therapist_id),
                            "session_type_id": str(entry.session_type_id),
                            "start_time": start.isoformat(),
                            "expire_time": expires_at.isoformat(),
                        },
                    }
                )
                await outbox_store.enqueue(connection, events.BOOKING_EVENT, offer_id, payload)
            return made

        made = await in_transaction(self._database.pool, work)
        if made:
            log.info(
                "waitlist_offer_made", offer_id=str(offer_id), entry_id=str(entry.entry_id), start=start.isoformat()
            )
        return made
