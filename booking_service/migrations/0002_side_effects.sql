-- Side effects of a booking that must never fail it (DESIGN.md failure classes 10 and 12):
-- the video room of each session, and dead letters of the outbox that operators list and retry.

-- One video room per session, converged by the outbox (create, move its window, delete). The
-- booking never waits for it: a client reads its state here (pending, ready, failed, deleted).
CREATE TABLE booking.video_rooms (
    booking_id     uuid PRIMARY KEY REFERENCES booking.sessions (booking_id),
    room_name      text NOT NULL,
    state          text NOT NULL DEFAULT 'pending',
    url            text,
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT video_rooms_state_known CHECK (state IN ('pending', 'ready', 'failed', 'deleted')),
    CONSTRAINT video_rooms_ready_has_url CHECK (state <> 'ready' OR url IS NOT NULL),
    CONSTRAINT video_rooms_failure_reason_length CHECK (length(failure_reason) <= 1000)
);

-- Dead letters, newest first, for ListDeadLetters (keyset pages on (updated_at, event_id)) and
-- for the dead-letter gauge, which no longer reads the whole table.
CREATE INDEX outbox_dead_letters ON booking.outbox (updated_at DESC, event_id DESC) WHERE status = 'dead';
