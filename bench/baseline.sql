-- The baseline: the design this product replaces, at its best. One PL/pgSQL function books a
-- session in one transaction: the therapist's advisory lock, the conflict check, the insert, the
-- conditional deduction and its ledger row. No network hop between deciding and paying, so it is
-- the ceiling for one PostgreSQL. It keeps the guarantees that can be kept in one place: the same
-- EXCLUDE constraint on sessions, balances that never go negative, a ledger row per deduction,
-- an idempotency key per request.

CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE SCHEMA baseline;

CREATE TABLE baseline.session_types (
    session_type_id  uuid PRIMARY KEY,
    therapist_id     uuid NOT NULL,
    duration_minutes integer NOT NULL CHECK (duration_minutes BETWEEN 5 AND 480),
    credit_cost      bigint NOT NULL CHECK (credit_cost > 0)
);

CREATE TABLE baseline.credit_balances (
    owner_id  uuid PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0),
    spent     bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    granted   bigint NOT NULL CHECK (granted >= 0),
    CONSTRAINT credit_balances_identity CHECK (available + spent = granted)
);

CREATE TABLE baseline.sessions (
    booking_id      uuid PRIMARY KEY,
    request_id      text NOT NULL UNIQUE,
    client_id       uuid NOT NULL,
    therapist_id    uuid NOT NULL,
    session_type_id uuid NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    blocked         tstzrange NOT NULL,
    credit_cost     bigint NOT NULL,
    status          text NOT NULL DEFAULT 'confirmed',
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_no_overlap EXCLUDE USING gist (therapist_id WITH =, blocked WITH &&)
        WHERE (status = 'confirmed')
);

CREATE INDEX sessions_by_client ON baseline.sessions (client_id, starts_at);

CREATE TABLE baseline.ledger (
    entry_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id    uuid NOT NULL REFERENCES baseline.credit_balances (owner_id),
    kind        text NOT NULL CHECK (kind IN ('grant', 'spend')),
    delta       bigint NOT NULL,
    booking_id  uuid,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_by_owner ON baseline.ledger (owner_id);

-- Returns (outcome, booking_id): outcome 'booked' (or 'repeated' for a request_id seen before),
-- or a refusal reason with the services' names: SLOT_UNAVAILABLE, INSUFFICIENT_CREDITS,
-- ACCOUNT_NOT_FOUND, SESSION_TYPE_NOT_FOUND. Runs at READ COMMITTED, so the check after the lock
-- sees the sessions that earlier lock holders committed (CONVENTIONS.md).
CREATE FUNCTION baseline.book(
    p_request_id text, p_client_id uuid, p_therapist_id uuid, p_session_type_id uuid, p_start timestamptz
) RETURNS TABLE (outcome text, booking_id uuid) LANGUAGE plpgsql AS $$
DECLARE
    v_duration integer;
    v_cost bigint;
    v_end timestamptz;
    v_existing uuid;
    v_booking_id uuid := gen_random_uuid();
BEGIN
    SELECT t.duration_minutes, t.credit_cost INTO v_duration, v_cost
      FROM baseline.session_types t
     WHERE t.session_type_id = p_session_type_id AND t.therapist_id = p_therapist_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'SESSION_TYPE_NOT_FOUND'::text, NULL::uuid;
        RETURN;
    END IF;
    v_end := p_start + make_interval(mins => v_duration);

    PERFORM pg_advisory_xact_lock(hashtextextended('therapist:' || p_therapist_id::text, 0));

    SELECT s.booking_id INTO v_existing FROM baseline.sessions s WHERE s.request_id = p_request_id;
    IF FOUND THEN
        RETURN QUERY SELECT 'repeated'::text, v_existing;
        RETURN;
    END IF;

    IF EXISTS (
        SELECT 1 FROM baseline.sessions s
         WHERE s.therapist_id = p_therapist_id AND s.status = 'confirmed'
           AND s.blocked && tstzrange(p_start, v_end, '[)')
    ) THEN
        RETURN QUERY SELECT 'SLOT_UNAVAILABLE'::text, NULL::uuid;
        RETURN;
    END IF;

    UPDATE baseline.credit_balances b
       SET available = b.available - v_cost, spent = b.spent + v_cost
     WHERE b.owner_id = p_client_id AND b.available >= v_cost;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM baseline.credit_balances b WHERE b.owner_id = p_client_id) THEN
            RETURN QUERY SELECT 'INSUFFICIENT_CREDITS'::text, NULL::uuid;
        ELSE
            RETURN QUERY SELECT 'ACCOUNT_NOT_FOUND'::text, NULL::uuid;
        END IF;
        RETURN;
    END IF;

    INSERT INTO baseline.sessions
        (booking_id, request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, blocked, credit_cost)
    VALUES (v_booking_id, p_request_id, p_client_id, p_therapist_id, p_session_type_id, p_start, v_end,
            tstzrange(p_start, v_end, '[)'), v_cost);
    INSERT INTO baseline.ledger (owner_id, kind, delta, booking_id)
    VALUES (p_client_id, 'spend', -v_cost, v_booking_id);

    RETURN QUERY SELECT 'booked'::text, v_booking_id;
END;
$$;
