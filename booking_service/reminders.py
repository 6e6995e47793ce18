"""Reminders (docs/notifications.md, "Reminders"): an event at each configured offset before a
session's start (BOOKING_REMINDER_OFFSETS_S, by default 24 hours and 1 hour), delivered through
the outbox and the notification path (a webhook, the log) once per reminder.

Nothing is written when a session is booked or moved. Every BOOKING_REMINDER_INTERVAL_S, a pass
records the reminders whose moment has come as sent (migration 0011) and writes one outbox event
for each, in one transaction: a reminder recorded by another replica first is not sent twice. A
cancellation removes pending reminders (the outbox drops a reminder whose booking was cancelled,
marked or moved since), a reschedule moves them (the reminders of the new start are others), and a
session booked or moved inside an offset skips that reminder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import structlog

from booking_service import events
from booking_service.store import calendar as calendar_store
from booking_service.store import outbox as outbox_store
from booking_service.store import reminders as store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction

log = structlog.get_logger()


class Reminders:
    def __init__(
        self, database: Database, *, clock: Callable[[], datetime], offsets_s: Sequence[int], batch_size: int
    ) -> None:
        self._database = database
        self._clock = clock
        self._offsets_s = tuple(offsets_s)
        self._batch_size = batch_size

    async def send_due_once(self) -> bool:
        """Sends up to one batch of due reminders; True when more may be waiting."""
        if not self._offsets_s:
            return False
        now = self._clock()

        async def work(connection: Connection) -> int:
            due = await store.claim_due(connection, now, self._offsets_s, self._batch_size)
            bookings = await calendar_store.fetch_bookings(connection, [reminder.booking_id for reminder in due])
            for reminder in due:
                payload = events.reminder_event(bookings[reminder.booking_id], reminder.offset_s, now)
                await outbox_store.enqueue(connection, events.BOOKING_EVENT, reminder.booking_id, payload)
            return len(due)

        count = await in_transaction(self._database.pool, work)
        if count:
            log.info("reminders_sent", count=count)
        return count == self._batch_size
