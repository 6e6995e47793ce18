"""The outbox worker: the side effects of booking events, and the payments that did not settle
inline (docs/notifications.md, docs/design.md). At least once, with backoff, dead letters.

A change to a booking writes one `booking_event` row. The worker delivers its notification (to
the log sink, and to every webhook endpoint subscribed to it: webhook_delivery.py) and brings its
video room to the booking's state; an effect that fails is retried alone from the same row (the
payload's `pending_effects`). A webhook endpoint that fails is retried on its own delivery row,
not from the event's. Once the effects are out, a booking whose payment is still
COMMITTING or REFUNDING is left to the inline call until the row is
BOOKING_COMMIT_RETRY_AFTER_S old, then settled from the row (the commit retry row of the previous
design, written only when needed: never, when the inline call finished). Rows of the previous
version's kinds are delivered as that version did.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from booking_service import events
from booking_service.config import BookingSettings
from booking_service.delivery import Failure, PermanentFailure, RetryPolicy, attempt
from booking_service.domain import Booking, BookingStatus, DeadLetterNotFound, PaymentStatus, VideoRoomState
from booking_service.payments import Payments
from booking_service.side_effects import Notifier, VideoProvider
from booking_service.store import calendar as calendar_store
from booking_service.store import outbox as store
from booking_service.store.webhook_endpoints import SigningEndpoint
from booking_service.webhook_delivery import FanOut, WebhookDelivery
from service_kit.connection import Connection
from service_kit.database import Database
from service_kit.pagination import Page

log = structlog.get_logger()

_UNSETTLED = (PaymentStatus.COMMITTING, PaymentStatus.REFUNDING)


@dataclass
class Pass:
    """What one pass did, written back in one transaction at its end."""

    # The enabled webhook endpoints, as read at the start of the pass.
    endpoints: list[SigningEndpoint]
    delivered: list[uuid.UUID] = field(default_factory=list)
    deferred: list[store.Deferred] = field(default_factory=list)
    # The rooms' new states, by booking: the last event of a booking decides.
    rooms: dict[uuid.UUID, tuple[VideoRoomState, str | None]] = field(default_factory=dict)
    synced: list[tuple[uuid.UUID, str, VideoRoomState]] = field(default_factory=list)
    # What each event's webhook fan-out left to write, by event: written with the event's outcome.
    webhooks: dict[uuid.UUID, FanOut] = field(default_factory=dict)


class Outbox:
    def __init__(
        self,
        database: Database,
        payments: Payments,
        settings: BookingSettings,
        notifier: Notifier,
        video: VideoProvider | None,
        webhooks: WebhookDelivery,
    ) -> None:
        self._database = database
        self._payments = payments
        self._settings = settings
        self._notifier = notifier
        self._video = video  # None: no video rooms (BOOKING_VIDEO_PROVIDER=none)
        self._webhooks = webhooks
        self._policy = RetryPolicy(
            settings.outbox_base_delay_s, settings.outbox_max_delay_s, settings.outbox_max_attempts
        )

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
            if not leased:
                return False
            bookings = await calendar_store.fetch_bookings(connection, list({e.booking_id for e in leased}))
            endpoints = await self._webhooks.endpoints(connection)
        by_booking: dict[uuid.UUID, list[store.OutboxEvent]] = {}
        for event in leased:
            by_booking.setdefault(event.booking_id, []).append(event)
        done = Pass(endpoints)
        await asyncio.gather(
            *(self._deliver_in_order(group, bookings.get(booking_id), done) for booking_id, group in by_booking.items())
        )
        if done.delivered or done.deferred or done.webhooks:
            fan_outs = FanOut()
            for fan_out in done.webhooks.values():
                fan_outs.extend(fan_out)
            async with self._database.pool.acquire() as connection, connection.transaction():
                await store.finish_events(
                    connection, done.delivered, done.deferred, done.rooms, defer_s=self._settings.commit_retry_after_s
                )
                await self._webhooks.record(connection, fan_outs)
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
                await self._failed(event, failure, done, pending_effects=failed)
                return
        else:
            failure = await attempt(self._legacy(event, booking, done))
            if failure is not None:
                await self._failed(event, failure, done)
                return
        if event.kind == events.BOOKING_EVENT and booking is not None and booking.payment_status in _UNSETTLED:
            if event.age_s < self._settings.commit_retry_after_s:
                done.deferred.append(store.Deferred(event.event_id))  # the inline call may still settle it
                return
            failure = await attempt(self._payments.settle(booking))
            if failure is not None:
                await self._failed(event, failure, done, pending_effects=())
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
                failure = await attempt(self._notify(event, done))
            else:
                failure = await attempt(self._sync_video_room(event, booking, done))
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
            await self._notify(event, done)
        elif event.kind in events.LEGACY_VIDEO_ROOM_KINDS:
            await self._sync_video_room(event, booking, done)
        else:
            raise PermanentFailure(f"unknown outbox event kind {event.kind!r}")

    async def _failed(
        self,
        event: store.OutboxEvent,
        failure: Failure,
        done: Pass,
        *,
        pending_effects: list[str] | tuple[()] | None = None,
    ) -> None:
        attempts = event.attempts + 1
        dead, delay_s = self._policy.after_failure(failure, attempts)
        room_failed = dead and (
            event.kind in events.LEGACY_VIDEO_ROOM_KINDS or events.VIDEO_ROOM in (pending_effects or ())
        )
        async with self._database.pool.acquire() as connection, connection.transaction():
            await store.retry_event(
                connection, event.event_id, delay_s, failure.reason, dead=dead, pending_effects=pending_effects
            )
            # The webhook deliveries this attempt left go with it: the notification is done.
            await self._record_webhooks(connection, done.webhooks.pop(event.event_id, None))
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

    async def _record_webhooks(self, connection: Connection, fan_out: FanOut | None) -> None:
        if fan_out is not None:
            await self._webhooks.record(connection, fan_out)

    async def _notify(self, event: store.OutboxEvent, done: Pass) -> None:
        """The notification: to the log sink (BOOKING_NOTIFICATION_SINK=log), and to every webhook
        endpoint subscribed to its type. An endpoint's failure is its own delivery's to retry."""
        # Serialized the same way on every attempt, so a retry carries the same bytes.
        body = json.dumps(
            events.notification_body(event.event_id, event.payload), sort_keys=True, separators=(",", ":")
        ).encode()
        event_type = str(event.payload.get("type"))
        await self._notifier.send(str(event.event_id), event_type, body)
        done.webhooks[event.event_id] = await self._webhooks.fan_out(event.event_id, event_type, body, done.endpoints)

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
