-- Therapists, their availability, sessions, and the coordinator's durable state: booking
-- attempts (request_id -> booking_id), the decision log of the two-phase reservation, and the
-- transactional outbox.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE booking.therapists (
    therapist_id           uuid PRIMARY KEY,
    request_id             text NOT NULL UNIQUE,
    display_name           text NOT NULL,
    time_zone              text NOT NULL,
    buffer_before_minutes  integer NOT NULL DEFAULT 0,
    buffer_after_minutes   integer NOT NULL DEFAULT 0,
    minimum_notice_minutes integer NOT NULL DEFAULT 0,
    booking_horizon_days   integer NOT NULL DEFAULT 90,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT therapists_display_name_length CHECK (length(display_name) BETWEEN 1 AND 200),
    CONSTRAINT therapists_buffers_bounded CHECK (buffer_before_minutes BETWEEN 0 AND 240
                                                AND buffer_after_minutes BETWEEN 0 AND 240),
    CONSTRAINT therapists_notice_bounded CHECK (minimum_notice_minutes BETWEEN 0 AND 43200),
    CONSTRAINT therapists_horizon_bounded CHECK (booking_horizon_days BETWEEN 1 AND 730)
);

-- Wall-clock windows in the therapist's zone, minutes after local midnight; ISO weekday 1..7.
CREATE TABLE booking.weekly_windows (
    therapist_id uuid NOT NULL REFERENCES booking.therapists (therapist_id) ON DELETE CASCADE,
    weekday      smallint NOT NULL,
    start_minute integer NOT NULL,
    end_minute   integer NOT NULL,
    PRIMARY KEY (therapist_id, weekday, start_minute),
    CONSTRAINT weekly_windows_weekday CHECK (weekday BETWEEN 1 AND 7),
    CONSTRAINT weekly_windows_order CHECK (0 <= start_minute AND start_minute < end_minute AND end_minute <= 1440)
);

-- One date's hours replacing the weekly ones; an empty array is a day off.
CREATE TABLE booking.date_overrides (
    therapist_id uuid NOT NULL REFERENCES booking.therapists (therapist_id) ON DELETE CASCADE,
    local_date   date NOT NULL,
    windows      int4range[] NOT NULL,
    PRIMARY KEY (therapist_id, local_date)
);

CREATE TABLE booking.session_types (
    session_type_id  uuid PRIMARY KEY,
    therapist_id     uuid NOT NULL REFERENCES booking.therapists (therapist_id),
    request_id       text NOT NULL UNIQUE,
    name             text NOT NULL,
    duration_minutes integer NOT NULL,
    credit_cost      bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT session_types_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT session_types_duration CHECK (duration_minutes BETWEEN 5 AND 480),
    CONSTRAINT session_types_cost CHECK (credit_cost BETWEEN 1 AND 10000)
);

CREATE INDEX session_types_by_therapist ON booking.session_types (therapist_id, created_at);

-- A booked session. `blocked` is what it takes from the therapist's calendar: the session plus
-- the therapist's buffers. The exclusion constraint is the last line against double booking.
CREATE TABLE booking.sessions (
    booking_id         uuid PRIMARY KEY,
    request_id         text NOT NULL UNIQUE,
    client_id          uuid NOT NULL,
    therapist_id       uuid NOT NULL REFERENCES booking.therapists (therapist_id),
    session_type_id    uuid NOT NULL REFERENCES booking.session_types (session_type_id),
    starts_at          timestamptz NOT NULL,
    ends_at            timestamptz NOT NULL,
    blocked            tstzrange NOT NULL,
    time_zone          text NOT NULL,
    credit_cost        bigint NOT NULL,
    status             text NOT NULL DEFAULT 'confirmed',
    payment_status     text NOT NULL DEFAULT 'committing',
    cancelled_by       text,
    cancel_reason      text,
    refunded_credits   bigint NOT NULL DEFAULT 0,
    cancelled_at       timestamptz,
    reschedule_count   integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_status_known CHECK (status IN ('confirmed', 'cancelled')),
    CONSTRAINT sessions_payment_status_known CHECK (payment_status IN ('committing', 'paid', 'refunding', 'refunded')),
    CONSTRAINT sessions_times_ordered CHECK (starts_at < ends_at),
    CONSTRAINT sessions_blocked_covers_session CHECK (blocked @> tstzrange(starts_at, ends_at, '[)')),
    CONSTRAINT sessions_cost_positive CHECK (credit_cost > 0),
    CONSTRAINT sessions_refund_bounded CHECK (refunded_credits BETWEEN 0 AND credit_cost),
    CONSTRAINT sessions_cancellation_shape CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
    CONSTRAINT sessions_no_overlap EXCLUDE USING gist (therapist_id WITH =, blocked WITH &&)
        WHERE (status = 'confirmed')
);

CREATE INDEX sessions_by_client ON booking.sessions (client_id, starts_at, booking_id);
CREATE INDEX sessions_by_therapist ON booking.sessions (therapist_id, starts_at, booking_id);

-- The one conflict predicate: used by the cheap pre-check and by the check under the lock.
CREATE FUNCTION booking.slot_conflicts(p_therapist_id uuid, p_blocked tstzrange, p_ignore_booking_id uuid)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM booking.sessions
         WHERE therapist_id = p_therapist_id
           AND status = 'confirmed'
           AND blocked && p_blocked
           AND booking_id IS DISTINCT FROM p_ignore_booking_id
    )
$$;

-- request_id -> booking_id, written before credits are reserved, so that a retry after a crash
-- or a timeout reuses the same booking id (and so the same, idempotent, reservation).
CREATE TABLE booking.booking_attempts (
    request_id   text PRIMARY KEY,
    booking_id   uuid NOT NULL UNIQUE,
    fingerprint  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The decision log: one row per reservation, the commit point of a booking. A booking
-- transaction inserts 'commit' with its session; the reconciler inserts 'abort' for a hold with
-- no decision, after which that booking can never commit.
CREATE TABLE booking.decisions (
    reservation_id uuid PRIMARY KEY,
    decision       text NOT NULL,
    decided_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT decisions_known CHECK (decision IN ('commit', 'abort'))
);

CREATE TABLE booking.reschedules (
    request_id  text PRIMARY KEY,
    booking_id  uuid NOT NULL REFERENCES booking.sessions (booking_id),
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The transactional outbox: work that must happen after a commit, at least once.
CREATE TABLE booking.outbox (
    event_id        uuid PRIMARY KEY,
    kind            text NOT NULL,
    booking_id      uuid NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_status_known CHECK (status IN ('pending', 'delivered', 'dead')),
    CONSTRAINT outbox_attempts_nonnegative CHECK (attempts >= 0)
);

CREATE INDEX outbox_due ON booking.outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_by_booking ON booking.outbox (booking_id);
