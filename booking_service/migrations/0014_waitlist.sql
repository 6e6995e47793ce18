-- The waitlist (docs/design.md, "The waitlist"): a client waits for a start of a session type of
-- a therapist within a window of times; when one is free (a cancellation, a reschedule, or free
-- already), the waitlist worker offers it to the entries in the order they joined, one at a time,
-- with a short exclusive hold: an open offer.
--
-- How a hold coexists with the exclusion constraint: an offer is no session, so the constraint
-- (sessions only) does not see it; the one conflict predicate does. booking.slot_conflicts now
-- also counts an open, unexpired offer on the range, unless the session being placed or moved is
-- the one the offer was accepted for (the offer's booking_id, bound when its client accepts). The
-- pre-check and the locked step use that predicate, so no other request can place a session over
-- a held slot; an offer is made under the therapist's calendar lock after the same predicate
-- found the range free, so it never overlaps a session either. The constraint stays the last line
-- for sessions; an offer past its expiry stops counting even before the worker marks it.
CREATE TABLE booking.waitlist_entries (
    entry_id         uuid PRIMARY KEY,
    request_id       text NOT NULL,
    fingerprint      text NOT NULL,
    client_id        uuid NOT NULL,
    therapist_id     uuid NOT NULL REFERENCES booking.therapists (therapist_id),
    session_type_id  uuid NOT NULL REFERENCES booking.session_types (session_type_id),
    wanted           tstzrange NOT NULL,
    status           text NOT NULL DEFAULT 'waiting',
    booking_id       uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT waitlist_entries_status CHECK (status IN ('waiting', 'offered', 'booked', 'left', 'expired'))
);

CREATE INDEX waitlist_waiting ON booking.waitlist_entries (created_at) WHERE status = 'waiting';
CREATE INDEX waitlist_by_client ON booking.waitlist_entries (client_id, created_at);

CREATE TABLE booking.slot_offers (
    offer_id        uuid PRIMARY KEY,
    entry_id        uuid NOT NULL REFERENCES booking.waitlist_entries (entry_id),
    therapist_id    uuid NOT NULL REFERENCES booking.therapists (therapist_id),
    starts_at       timestamptz NOT NULL,
    blocked         tstzrange NOT NULL,
    expires_at      timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'open',
    booking_id      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT slot_offers_status CHECK (status IN ('open', 'taken', 'expired', 'withdrawn'))
);

CREATE INDEX slot_offers_open ON booking.slot_offers USING gist (therapist_id, blocked) WHERE status = 'open';
CREATE INDEX slot_offers_by_entry ON booking.slot_offers (entry_id, starts_at);

-- The one conflict predicate (0001), with the held slots: used by the pre-check and by the check
-- under the lock.
CREATE OR REPLACE FUNCTION booking.slot_conflicts(p_therapist_id uuid, p_blocked tstzrange, p_ignore_booking_id uuid)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM booking.sessions
         WHERE therapist_id = p_therapist_id
           AND status = 'confirmed'
           AND blocked && p_blocked
           AND booking_id IS DISTINCT FROM p_ignore_booking_id
    ) OR EXISTS (
        SELECT 1 FROM booking.slot_offers
         WHERE therapist_id = p_therapist_id
           AND status = 'open'
           AND expires_at > now()
           AND blocked && p_blocked
           AND booking_id IS DISTINCT FROM p_ignore_booking_id
    )
$$;

-- An offer of a slot to a waiting entry, made under the therapist's calendar lock when the one
-- conflict predicate finds the range free (sessions and other open offers): the offer's id, or
-- NULL when the range is taken or the entry no longer waits (nothing written).
CREATE FUNCTION booking.offer_slot(
    p_offer_id uuid, p_entry_id uuid, p_therapist_id uuid, p_starts_at timestamptz, p_blocked tstzrange,
    p_expires_at timestamptz, p_lock_timeout_ms integer
) RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    PERFORM booking.take_calendar_lock(p_therapist_id, true);
    IF booking.slot_conflicts(p_therapist_id, p_blocked, NULL) THEN
        RETURN NULL;
    END IF;
    UPDATE booking.waitlist_entries SET status = 'offered', updated_at = now()
     WHERE entry_id = p_entry_id AND status = 'waiting';
    IF NOT FOUND THEN
        RETURN NULL;  -- the client left meanwhile
    END IF;
    INSERT INTO booking.slot_offers (offer_id, entry_id, therapist_id, starts_at, blocked, expires_at)
    VALUES (p_offer_id, p_entry_id, p_therapist_id, p_starts_at, p_blocked, p_expires_at);
    RETURN p_offer_id;
END;
$$;
