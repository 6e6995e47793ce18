-- Reminders (docs/notifications.md, "Reminders"): an event at each of BOOKING_REMINDER_OFFSETS_S
-- before a session's start, through the outbox. Nothing is written when a session is booked or
-- moved: the reminder worker finds the confirmed sessions whose reminder moment has come (the
-- sessions_open index, by start) and records each reminder it sends here, with its one outbox
-- event, in one transaction. The key names the session's version (its reschedule_count): a moved
-- session is reminded again for its new start; a reminder whose moment came before the session
-- got its start (booked or moved inside the offset) is skipped; a cancelled, moved or marked
-- session's pending reminder is dropped by the outbox worker instead of sent.
CREATE TABLE booking.reminders_sent (
    booking_id uuid NOT NULL REFERENCES booking.sessions (booking_id),
    offset_s   integer NOT NULL,
    version    integer NOT NULL,
    sent_at    timestamptz NOT NULL,
    PRIMARY KEY (booking_id, offset_s, version),
    CONSTRAINT reminders_sent_offset_positive CHECK (offset_s > 0)
);
