"""The outbox worker: the side effects of booking events, and the payments that did not settle
inline (docs/notifications.md, docs/design.md). At least once, with backoff, dead letters.

A change to a booking writes one `booking_event` row. The worker delivers its notification and
brings its video room to the booking's state; an effect that fails is retried alone from the same
row (the payload's `pending_effects`). Once the effects are out, a booking whose payment is still
COMMITTING or REFUNDING is left to the inline call until the row is
BOOKING_COMMIT_RETRY_AFTER_S old, then settled from the row (the commit retry row of the previous
design, written only when needed: never, when the inline call finished). Rows of the previous
version's kinds are delivered as that version did.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from booking_service import events
from booking_service.config import BookingSettings
from booking_service.delivery import PermanentFailure, RetryLater
from booking_service.domain import Booking, BookingStatus, DeadLetterNotFound, PaymentStatus, VideoRoomState
from booking_service.payments import Payments
from booking_service.side_effects import Notifier, VideoProvider
from booking_service.store import calendar as calendar_store
from booking_service.store import outbox as store
from service_kit.database import Database
from service_kit.pagination import Page

log = structlog.get_logger()

_UNSETTLED = (PaymentStatus.COMMITTING, PaymentStatus.REFUNDING)


@dataclass(frozen=True)
class Failure:
    """How one attempt at an effect failed: retry after `delay_s` (None: backoff), or never."""

    reason: str
    delay_s: float | None = None
    permanent: bool = False


@dataclass
class Pass:
    """What one pass did, written back in one statement at its end."""

    delivered: list[uuid.UUID] = field(default_factory=list)
    deferred: list[store.Deferred] = field(default_factory=list)
    # The rooms' new states, by booking: the last event of a booking decides.
    rooms: dict[uuid.UUID, tuple[VideoRoomState, str | None]] = field(default_factory=dict)
    synced: list[tuple[uuid.UUID, str, VideoRoomState]] = field(default_factory=list)


class Outbox:
    def __init__(
        self,
        database: Database,
        payments: Payments,
        settings: BookingSettings,
        notifier: Notifier,
        video: VideoProvider | None,
    ) -> None:
        self._database = database
        self._payments = payments
        self._settings = settings
        self._notifier = notifier
        self._video = video  # None: no video rooms (BOOKING_VIDEO_PROVIDER=none)

    async def deliver_once(self) -> bool:
        """Delivers up to one batch of due events; True when the batch was full. Events of
        different bookings go out concurrently, those of one booking in order (a room is never
        moved or deleted by two deliveries of this process at once). The bookings are read once
        for the batch; the pass is written back in one statement at the end: a worker that dies
        before that leaves its events to be delivered again when their lease runs out."""
        async with self._database.pool.acquire() as connection:
            leased = await store.lease_due_events(
                connection, self._settings.outbox_batch_size, self._settings.outbox_lease_s
            )
            bookings = await calendar_store.fetch_bookings(connection, list({e.booking_id for e in leased}))
        by_booking: dict[uuid.UUID, list[store.OutboxEvent]] = {}
        for event in leased:
            by_booking.setdefault(event.booking_id, []).append(event)
        done = Pass()
        await asyncio.gather(
            *(self._deliver_in_order(group, bookings.get(booking_id), done) for booking_id, group in by_booking.items())
        )
        if done.delivered or done.deferred:
            async with self._database.pool.acquire() as connection:
                await store.finish_events(
                    connection, done.delivered, done.deferred, done.rooms, defer_s=self._settings.commit_retry_after_s
                )
            for booking_id, kind, state in done.synced:
                log.debug("video_room_synced", booking_id=str(booking_id), kind=kind, state=state.value)
        return len(leased) == self._settings.outbox_batch_size

    async def _deliver_in_order(self, group: list[store.OutboxEvent], booking: Booking | None, done: Pass) -> None:
        for event in group:
            await self._deliver(event, booking, done)

    async def _deliver(self, event: store.OutboxEvent, booking: Booking | None, done: Pass) -> None:
        if event.payload.get("type") == events.REMINDER and not events.reminder_still_due(event.payload, booking):
            done.delivered.append(event.event_id)  # cancelled, marked or moved since: never sent
            log.info("reminder_dropped", event_id=str(event.event_id), booking_id=str(event.booking_id))
            return
        if event.kind == events.BOOKING_EVENT:
            failed, failure = await self._effects(event, booking, done)
            if failure is not None:
                await self._failed(event, failure, pending_effects=failed)
                return
        else:
            failure = await self._attempt(self._legacy(event, booking, done))
            if failure is not None:
                await self._failed(event, failure)
                return
        if event.kind == events.BOOKING_EVENT and booking is not None and booking.payment_status in _UNSETTLED:
            if event.age_s < self._settings.commit_retry_after_s:
                done.deferred.append(store.Deferred(event.event_id))  # the inline call may still settle it
                return
            failure = await self._attempt(self._payments.settle(booking))
            if failure is not None:
                await self._failed(event, failure, pending_effects=())
                return
        done.delivered.append(event.event_id)

    async def _effects(
        self, event: store.OutboxEvent, booking: Booking | None, done: Pass
    ) -> tuple[list[str], Failure | None]:
        """Delivers the event's pending effects; those that failed, and how (the worst of them)."""
        failed: list[str] = []
        worst: Failure | None = None
        for effect in events.pending_effects(event.payload):
            if effect == events.NOTIFICATION:
                failure = await self._attempt(self._notify(event))
            else:
                failure = await self._attempt(self._sync_video_room(event, booking, done))
            if failure is not None:
                failed.append(effect)
                if worst is None or failure.permanent or (not worst.permanent and failure.delay_s is not None):
                    worst = failure
        return failed, worst

    async def _legacy(self, event: store.OutboxEvent, booking: Booking | None, done: Pass) -> None:
        """The kinds the previous version writes: one effect or one payment per row."""
        if event.kind in (events.COMMIT_RESERVATION, events.REFUND_RESERVATION):
            if booking is not None and booking.payment_status in _UNSETTLED:
                await self._payments.settle(booking)
        elif event.kind == events.NOTIFICATION:
            await self._notify(event)
        elif event.kind in events.LEGACY_VIDEO_ROOM_KINDS:
            await self._sync_video_room(event, booking, done)
        else:
            raise PermanentFailure(f"unknown outbox event kind {event.kind!r}")

    async def _attempt(self, delivery: Awaitable[object]) -> Failure | None:
        """Awaits one delivery; None when it succeeded, else how it failed."""
        try:
            await delivery
        except RetryLater as later:
            return Failure(later.reason, delay_s=later.delay_s)
        except PermanentFailure as failure:
            return Failure(failure.reason, permanent=True)
        except Exception as error:  # noqa: BLE001  # any failure counts as an attempt, so a poison event dead-letters
            return Failure(repr(error))
        return None

    def _backoff_s(self, attempts: int) -> float:
        """Exponential backoff with jitter (half to all of the doubled delay), bounded."""
        base_s = self._settings.outbox_base_delay_s * float(2 ** min(attempts, 30))
        return min(self._settings.outbox_max_delay_s, base_s) * random.uniform(0.5, 1.0)  # jitter, not crypto

    async def _failed(
        self, event: store.OutboxEvent, failure: Failure, *, pending_effects: list[str] | tuple[()] | None = None
    ) -> None:
        attempts = event.attempts + 1
        dead = failure.permanent or attempts >= self._settings.outbox_max_attempts
        delay_s = failure.delay_s if failure.delay_s is not None else self._backoff_s(event.attempts)
        delay_s = 0.0 if failure.permanent else min(self._settings.outbox_max_delay_s, delay_s)
        room_failed = dead and (
            event.kind in events.LEGACY_VIDEO_ROOM_KINDS or events.VIDEO_ROOM in (pending_effects or ())
        )
        async with self._database.pool.acquire() as connection, connection.transaction():
            await store.retry_event(
                connection, event.event_id, delay_s, failure.reason, dead=dead, pending_effects=pending_effects
            )
            if room_failed:
                await calendar_store.set_video_room(
                    connection, event.booking_id, VideoRoomState.FAILED, failure_reason=failure.reason
                )
        level = log.error if dead else log.warning
        level(
            "outbox_delivery_failed",
            event_id=str(event.event_id),
            kind=event.kind,
            attempts=attempts,
            dead=dead,
            retry_in_s=None if dead else round(delay_s, 3),
            error=failure.reason,
        )

    async def _notify(self, event: store.OutboxEvent) -> None:
        # Serialized the same way on every attempt, so a retry carries the same bytes.
        body = json.dumps(
            events.notification_body(event.event_id, event.payload), sort_keys=True, separators=(",", ":")
        )
        await self._notifier.send(str(event.event_id), str(event.payload.get("type")), body.encode())

    async def _sync_video_room(self, event: store.OutboxEvent, booking: Booking | None, done: Pass) -> None:
        """Brings the room to the booking's state as read for this pass, whatever the event: events
        of one booking may be delivered late or retried out of order, the booking row is the truth.
        The room's new state is written with the event's delivery."""
        if booking is None or booking.video_room is None:
            return  # no room is kept for this booking
        state, url = VideoRoomState.DELETED, None
        if self._video is not None:
            name = events.video_room_name(booking.booking_id)
            if booking.status is BookingStatus.CANCELLED:
                await self._video.delete_room(name)
            else:
                opens_at, expires_at = events.video_room_window(
                    booking, self._settings.video_opens_before_s, self._settings.video_expires_after_s
                )
                room = await self._video.ensure_room(name, opens_at, expires_at)
                state, url = VideoRoomState.READY, room.url
        done.rooms[booking.booking_id] = (state, url)
        done.synced.append((booking.booking_id, event.kind, state))

    # --- dead letters (admin) ---

    async def dead_letters(self, after: tuple[datetime, uuid.UUID] | None, page_size: int) -> Page[store.DeadLetter]:
        async with self._database.pool.acquire() as connection:
            found = await store.dead_letters(connection, after, page_size + 1)
        return Page.from_rows(found, page_size)

    async def retry_dead_letter(self, event_id: uuid.UUID) -> store.DeadLetter:
        """Makes a dead event due again with fresh attempts (after the cause is fixed)."""
        async with self._database.pool.acquire() as connection, connection.transaction():
            revived = await store.revive_dead_letter(connection, event_id)
            if revived is None:
                raise DeadLetterNotFound(event_id)
            await store.room_pending_again(connection, revived.booking_id)
        log.info("dead_letter_retried", event_id=str(event_id), kind=revived.kind)
        return revived
