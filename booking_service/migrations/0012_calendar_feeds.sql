-- iCalendar feeds (docs/calendars.md): one per therapist and per client, fetched by calendar
-- apps at a URL carrying a feed token (they cannot send bearer tokens). Only the token's SHA-256
-- is kept: a copy of the database does not open anyone's feed. Rotating replaces it, and the old
-- URL stops working at once.
CREATE TABLE booking.calendar_feeds (
    owner_kind text NOT NULL,
    owner_id   uuid NOT NULL,
    token_hash bytea NOT NULL UNIQUE,
    rotated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_kind, owner_id),
    CONSTRAINT calendar_feeds_owner_kind CHECK (owner_kind IN ('therapist', 'client')),
    CONSTRAINT calendar_feeds_token_hash_length CHECK (length(token_hash) = 32)
);
