-- CreateBooking's database steps in one round trip each (docs/performance.md). Each function runs
-- the statements the service used to send one by one, in the same order and with the same
-- predicates, as one implicit READ COMMITTED transaction; the guarantees stay the database's: the
-- attempt's primary key, the decision row's primary key, the advisory lock, the one conflict
-- predicate (booking.slot_conflicts) and the exclusion constraint as the last line.

-- Steps 1 and 2 of DESIGN.md's coordinator: bind request_id to a booking id (durably: this commits
-- before any credit moves), and, unless the request already made its booking, the cheap
-- pre-check. The caller computes what needs no database first (the blocked range, the schedule
-- rules) and passes the verdict: p_blocked is NULL when the range could not be computed (the
-- caller raises its error; the attempt stays, as before), p_bookable is false when a schedule
-- rule refuses (the attempt is forgotten, so a retry starts afresh, as before).
--
-- Returns the booking id the request is bound to, the fingerprint recorded for it (the caller
-- refuses a mismatch and nothing else happens here then), whether that id was aborted (the caller
-- starts over with a new id, the rare path), whether its session exists (a repeat: the caller
-- returns it), and whether the slot is taken by another session (the attempt is then forgotten).
CREATE FUNCTION booking.claim_attempt_and_precheck(
    p_request_id text, p_booking_id uuid, p_fingerprint text, p_therapist_id uuid, p_blocked tstzrange,
    p_bookable boolean
) RETURNS TABLE (booking_id uuid, fingerprint text, aborted boolean, finished boolean, conflict boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_booking_id uuid;
    v_fingerprint text;
    v_conflict boolean := false;
BEGIN
    INSERT INTO booking.booking_attempts (request_id, booking_id, fingerprint)
    VALUES (p_request_id, p_booking_id, p_fingerprint)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING booking_id, fingerprint INTO v_booking_id, v_fingerprint;
    IF NOT FOUND THEN
        -- Another call bound it first; a new statement sees its commit (ON CONFLICT waited for it).
        SELECT a.booking_id, a.fingerprint INTO v_booking_id, v_fingerprint
          FROM booking.booking_attempts a WHERE a.request_id = p_request_id;
        IF NOT FOUND THEN
            -- It bound it and let go again (a refused try): a retry of the whole call binds afresh.
            RAISE EXCEPTION 'booking attempt % vanished while being claimed', p_request_id
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
    IF v_fingerprint IS DISTINCT FROM p_fingerprint THEN
        RETURN QUERY SELECT v_booking_id, v_fingerprint, false, false, false;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM booking.decisions d WHERE d.reservation_id = v_booking_id AND d.decision = 'abort') THEN
        RETURN QUERY SELECT v_booking_id, v_fingerprint, true, false, false;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM booking.sessions s WHERE s.booking_id = v_booking_id) THEN
        RETURN QUERY SELECT v_booking_id, v_fingerprint, false, true, false;
        RETURN;
    END IF;
    IF p_blocked IS NOT NULL THEN
        IF p_bookable THEN
            -- This booking's own session is no conflict: a concurrent repeat of this request may
            -- have inserted it since the look-up above; going on is safe (the hold is idempotent by
            -- booking id and decide_booking returns the existing session), whereas refusing would
            -- forget the attempt and break every later repeat of a confirmed booking.
            v_conflict := booking.slot_conflicts(p_therapist_id, p_blocked, v_booking_id);
        END IF;
        IF v_conflict OR NOT p_bookable THEN
            DELETE FROM booking.booking_attempts a WHERE a.request_id = p_request_id AND a.booking_id = v_booking_id;
        END IF;
    END IF;
    RETURN QUERY SELECT v_booking_id, v_fingerprint, false, false, v_conflict;
END;
$$;

-- Step 4, the commit point of the whole booking, under the therapist's advisory lock: the conflict
-- predicate again, the decision `commit` (unless the reconciler recorded `abort` first), the
-- session, the outbox row that retries CommitReservation if the inline call fails, and the side
-- effects that commit with the booking: its notification (p_notification, the payload the
-- service made) and, when p_video_room_name is not NULL, its video room.
-- outcome: 'inserted' (with the new session), 'existing' (a concurrent repeat of this request got
-- here first: its session), 'conflict' (the slot is taken) or 'aborted' (the decision is abort).
-- A lock wait beyond p_lock_timeout_ms raises lock_not_available, a slot taken despite all this
-- raises the exclusion violation of sessions_no_overlap: the caller handles both, as before.
CREATE FUNCTION booking.decide_booking(
    p_lock_timeout_ms integer, p_booking_id uuid, p_request_id text, p_client_id uuid, p_therapist_id uuid,
    p_session_type_id uuid, p_starts_at timestamptz, p_ends_at timestamptz, p_blocked tstzrange, p_time_zone text,
    p_credit_cost bigint, p_notification jsonb, p_video_room_name text
) RETURNS TABLE (
    outcome text, booking_id uuid, request_id text, client_id uuid, therapist_id uuid, session_type_id uuid,
    starts_at timestamptz, ends_at timestamptz, time_zone text, credit_cost bigint, status text,
    payment_status text, cancelled_by text, cancel_reason text, refunded_credits bigint, cancelled_at timestamptz,
    reschedule_count integer, created_at timestamptz, updated_at timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_decision text;
BEGIN
    -- Lock, then check: only at READ COMMITTED does the check see what the previous holder of the
    -- lock committed (CONVENTIONS.md). The pool pins it; this refuses any other setting loudly.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'booking.decide_booking needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    PERFORM pg_advisory_xact_lock(hashtextextended('therapist:' || p_therapist_id::text, 0));

    IF EXISTS (SELECT 1 FROM booking.sessions s WHERE s.booking_id = p_booking_id) THEN
        RETURN QUERY SELECT 'existing'::text, s.booking_id, s.request_id, s.client_id, s.therapist_id,
                            s.session_type_id, s.starts_at, s.ends_at, s.time_zone, s.credit_cost, s.status,
                            s.payment_status, s.cancelled_by, s.cancel_reason, s.refunded_credits, s.cancelled_at,
                            s.reschedule_count, s.created_at, s.updated_at
                       FROM booking.sessions s WHERE s.booking_id = p_booking_id;
        RETURN;
    END IF;
    IF booking.slot_conflicts(p_therapist_id, p_blocked, NULL) THEN
        RETURN QUERY SELECT 'conflict'::text, NULL::uuid, NULL::text, NULL::uuid, NULL::uuid, NULL::uuid,
                            NULL::timestamptz, NULL::timestamptz, NULL::text, NULL::bigint, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::bigint, NULL::timestamptz, NULL::integer,
                            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;

    INSERT INTO booking.decisions (reservation_id, decision) VALUES (p_booking_id, 'commit')
    ON CONFLICT (reservation_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT d.decision INTO v_decision FROM booking.decisions d WHERE d.reservation_id = p_booking_id;
        IF v_decision IS DISTINCT FROM 'commit' THEN
            RETURN QUERY SELECT 'aborted'::text, NULL::uuid, NULL::text, NULL::uuid, NULL::uuid, NULL::uuid,
                                NULL::timestamptz, NULL::timestamptz, NULL::text, NULL::bigint, NULL::text,
                                NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::timestamptz, NULL::integer,
                                NULL::timestamptz, NULL::timestamptz;
            RETURN;
        END IF;
    END IF;

    INSERT INTO booking.outbox (event_id, kind, booking_id, payload)
    VALUES (gen_random_uuid(), 'commit_reservation', p_booking_id, '{}'),
           (gen_random_uuid(), 'notification', p_booking_id, p_notification);
    RETURN QUERY
        INSERT INTO booking.sessions AS s
               (booking_id, request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, blocked,
                time_zone, credit_cost)
        VALUES (p_booking_id, p_request_id, p_client_id, p_therapist_id, p_session_type_id, p_starts_at, p_ends_at,
                p_blocked, p_time_zone, p_credit_cost)
        RETURNING 'inserted'::text, s.booking_id, s.request_id, s.client_id, s.therapist_id, s.session_type_id,
                  s.starts_at, s.ends_at, s.time_zone, s.credit_cost, s.status, s.payment_status, s.cancelled_by,
                  s.cancel_reason, s.refunded_credits, s.cancelled_at, s.reschedule_count, s.created_at,
                  s.updated_at;
    -- The video room, when the service has a provider: the outbox creates it; nothing waits for it.
    IF p_video_room_name IS NOT NULL THEN
        INSERT INTO booking.video_rooms (booking_id, room_name) VALUES (p_booking_id, p_video_room_name)
        ON CONFLICT (booking_id) DO NOTHING;
        INSERT INTO booking.outbox (event_id, kind, booking_id, payload)
        VALUES (gen_random_uuid(), 'create_video_room', p_booking_id, '{}');
    END IF;
END;
$$;
