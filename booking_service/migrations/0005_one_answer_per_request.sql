-- The booking protocol, second edition (docs/design.md, "A booking, step by step").
--
-- * A request has one answer. A booking's id is derived from its caller and request id (the
--   request key, booking_service/requests.py), so a retry finds its hold and its session without
--   a binding row written first. A create is answered by its session, or by a refusal recorded
--   in booking.request_answers; a reschedule by a row there, moved or refused. Every answer is
--   recorded under the therapist's calendar lock, in booking.decide, after checking that the
--   request has none yet: once a request is answered, every copy and every retry gets that answer,
--   and no copy still in flight can commit another.
-- * The session row is the commit decision: no decision row is written for a booking that
--   commits. An abort is a recorded refusal (the reconciler's is BOOKING_ABORTED).
-- * One outbox row per booking event ('booking_event'); the worker delivers its side effects and,
--   only when the inline commit or refund did not finish, retries that payment from the same row.
--
-- Rolling upgrade (docs/operations.md): replicas of the previous version may run beside this one.
-- They keep calling booking.claim_attempts, booking.claim_attempt_and_precheck and
-- booking.decide_bookings / booking.decide_one, and their holds carry the reference 'booking:<id>'
-- with a row in booking.decisions; all of that stays until the next release drops it. The lock
-- key is the same, so both versions serialise on one calendar. booking.decide_booking (0003) is
-- called by no supported version and goes now.

DROP FUNCTION booking.decide_booking(
    integer, uuid, text, uuid, uuid, uuid, timestamptz, timestamptz, tstzrange, text, bigint, jsonb, text
);

-- Request ids are scoped to their caller: the booking id (the request key) is unique, the bare
-- request id need not be. The fingerprint is what the request asked for; NULL for sessions booked
-- by the previous version.
ALTER TABLE booking.sessions DROP CONSTRAINT sessions_request_id_key;
ALTER TABLE booking.sessions ADD COLUMN request_fingerprint text;

-- The answers that are not a session of their own: a create's refusal (booking_id NULL), a
-- reschedule's result (booking_id set; refusal_reason NULL when it moved the booking). A NULL
-- fingerprint answers every copy of the request, whatever it asked: the reconciler's abort, which
-- does not know what the request asked.
CREATE TABLE booking.request_answers (
    request_key      uuid PRIMARY KEY,
    fingerprint      text,
    booking_id       uuid REFERENCES booking.sessions (booking_id),
    refusal_reason   text,
    refusal_message  text,
    refusal_metadata jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT request_answers_answer CHECK (booking_id IS NOT NULL OR refusal_reason IS NOT NULL),
    CONSTRAINT request_answers_refusal_shape CHECK ((refusal_reason IS NULL) = (refusal_message IS NULL)),
    CONSTRAINT request_answers_reason_form CHECK (refusal_reason ~ '^[A-Z][A-Z0-9_]{0,62}$'),
    CONSTRAINT request_answers_message_length CHECK (length(refusal_message) <= 1000)
);

-- The one definition of a therapist calendar's lock: a 64-bit, namespaced, transaction-scoped
-- advisory lock (the same key as the previous version's, so both serialise on it).
CREATE FUNCTION booking.calendar_lock_key(p_therapist_id uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended('therapist:' || p_therapist_id::text, 0)
$$;

-- What the service proposes for one request. `kind`:
--   'place'  a create: insert the session (booking_id = request_key) unless the slot is taken;
--   'move'   a reschedule: move booking_id unless the slot is taken;
--   'refuse' record refusal_* as the request's answer (booking_id: a reschedule's booking, or
--            NULL for a create).
-- For 'place' and 'move', refusal_* is what a taken slot is answered with (SLOT_UNAVAILABLE), and
-- `event` is the outbox event of the change. schedule_version is the version of the therapist's
-- schedule the service checked the rules against; for 'move', booking_version is the booking's
-- reschedule_count as the service read it and `now` the instant a started session can no longer move.
CREATE TYPE booking.proposal AS (
    kind             text,
    request_key      uuid,
    fingerprint      text,
    therapist_id     uuid,
    schedule_version bigint,
    booking_id       uuid,
    booking_version  integer,
    now              timestamptz,
    request_id       text,
    client_id        uuid,
    session_type_id  uuid,
    starts_at        timestamptz,
    ends_at          timestamptz,
    blocked          tstzrange,
    time_zone        text,
    credit_cost      bigint,
    video_room_name  text,
    event            jsonb,
    refusal_reason   text,
    refusal_message  text,
    refusal_metadata jsonb
);

-- The locked step: the one place where a request gets its answer. For each proposal, in the
-- order of the therapists, under the therapist's calendar lock:
--   1. a request that has an answer keeps it: 'answered', with its session or its refusal;
--   2. a proposed refusal is recorded: 'refused';
--   3. rules checked against a schedule that has changed since: 'stale' (nothing written: the
--      service reads the schedule again); a booking to move that changed since it was read
--      (cancelled, started, moved): 'changed';
--   4. the one conflict predicate: a taken slot is recorded as the refusal: 'refused';
--   5. otherwise the session is inserted ('placed') or moved ('moved', its answer recorded), with
--      one outbox event.
-- With p_wait false (a batch of several) the lock is only tried: a therapist whose lock another
-- transaction holds is 'busy' for its proposals, and nothing happens for them (the service decides
-- them again alone, waiting then): a batch never waits for one calendar, so batches cannot
-- deadlock. With p_wait true, p_lock_timeout_ms bounds the wait (lock_timeout, for this
-- transaction), raising lock_not_available. A slot taken despite the check raises the exclusion violation of
-- sessions_no_overlap, which undoes the whole call: the service then decides each proposal alone.
-- Lock, then check: only at READ COMMITTED does the check see what the previous holder of the lock
-- committed (docs/conventions.md); the pool pins it, and this refuses any other level loudly.
CREATE FUNCTION booking.decide(p_proposals booking.proposal[], p_wait boolean, p_lock_timeout_ms integer)
RETURNS TABLE (
    item_position integer, outcome text, fingerprint text, refusal_reason text, refusal_message text,
    refusal_metadata jsonb, session booking.sessions, room booking.video_rooms
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    p record;
    v_answer booking.request_answers;
    v_session booking.sessions;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'booking.decide needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    FOR p IN
        SELECT i.*, i.ordinality::integer AS position
          FROM unnest(p_proposals) WITH ORDINALITY AS i
         ORDER BY i.therapist_id, i.request_key, i.ordinality
    LOOP
        IF p_wait THEN
            PERFORM pg_advisory_xact_lock(booking.calendar_lock_key(p.therapist_id));
        ELSIF NOT pg_try_advisory_xact_lock(booking.calendar_lock_key(p.therapist_id)) THEN
            RETURN QUERY SELECT p.position, 'busy'::text, NULL::text, NULL::text, NULL::text, NULL::jsonb,
                                NULL::booking.sessions, NULL::booking.video_rooms;
            CONTINUE;
        END IF;

        -- 1. The request's answer, if it has one: a recorded answer, or the session of a create.
        SELECT * INTO v_answer FROM booking.request_answers a WHERE a.request_key = p.request_key;
        IF FOUND THEN
            RETURN QUERY SELECT p.position, 'answered'::text, v_answer.fingerprint, v_answer.refusal_reason,
                                v_answer.refusal_message, v_answer.refusal_metadata, s, v
                           FROM (SELECT 1) AS one
                           LEFT JOIN booking.sessions s ON s.booking_id = v_answer.booking_id
                           LEFT JOIN booking.video_rooms v ON v.booking_id = v_answer.booking_id;
            CONTINUE;
        END IF;
        SELECT * INTO v_session FROM booking.sessions s WHERE s.booking_id = p.request_key;
        IF FOUND THEN
            RETURN QUERY SELECT p.position, 'answered'::text, v_session.request_fingerprint, NULL::text, NULL::text,
                                NULL::jsonb, v_session, v
                           FROM (SELECT 1) AS one LEFT JOIN booking.video_rooms v ON v.booking_id = v_session.booking_id;
            CONTINUE;
        END IF;

        -- 2. and 3.
        IF p.kind <> 'refuse' THEN
            IF NOT EXISTS (SELECT 1 FROM booking.therapists t
                            WHERE t.therapist_id = p.therapist_id AND t.schedule_version = p.schedule_version) THEN
                RETURN QUERY SELECT p.position, 'stale'::text, NULL::text, NULL::text, NULL::text, NULL::jsonb,
                                    NULL::booking.sessions, NULL::booking.video_rooms;
                CONTINUE;
            END IF;
            IF p.kind = 'move' THEN
                SELECT * INTO v_session FROM booking.sessions s WHERE s.booking_id = p.booking_id FOR UPDATE;
                IF NOT FOUND OR v_session.status <> 'confirmed' OR v_session.starts_at <= p.now
                   OR v_session.reschedule_count <> p.booking_version THEN
                    RETURN QUERY SELECT p.position, 'changed'::text, NULL::text, NULL::text, NULL::text,
                                        NULL::jsonb, NULL::booking.sessions, NULL::booking.video_rooms;
                    CONTINUE;
                END IF;
            END IF;
        END IF;

        -- 4. A proposed refusal, or a taken slot, becomes the request's answer.
        IF p.kind = 'refuse' OR booking.slot_conflicts(p.therapist_id, p.blocked, p.booking_id) THEN
            INSERT INTO booking.request_answers
                   (request_key, fingerprint, booking_id, refusal_reason, refusal_message, refusal_metadata)
            VALUES (p.request_key, p.fingerprint, NULLIF(p.booking_id, p.request_key), p.refusal_reason,
                    p.refusal_message, coalesce(p.refusal_metadata, '{}'));
            RETURN QUERY SELECT p.position, 'refused'::text, p.fingerprint, p.refusal_reason, p.refusal_message,
                                coalesce(p.refusal_metadata, '{}'), NULL::booking.sessions, NULL::booking.video_rooms;
            CONTINUE;
        END IF;

        -- 5. The change, and its one outbox event.
        IF p.kind = 'place' THEN
            INSERT INTO booking.sessions
                   (booking_id, request_id, request_fingerprint, client_id, therapist_id, session_type_id,
                    starts_at, ends_at, blocked, time_zone, credit_cost)
            VALUES (p.request_key, p.request_id, p.fingerprint, p.client_id, p.therapist_id, p.session_type_id,
                    p.starts_at, p.ends_at, p.blocked, p.time_zone, p.credit_cost)
            RETURNING * INTO v_session;
            IF p.video_room_name IS NOT NULL THEN
                INSERT INTO booking.video_rooms (booking_id, room_name) VALUES (p.request_key, p.video_room_name);
            END IF;
        ELSE
            UPDATE booking.sessions s
               SET starts_at = p.starts_at, ends_at = p.ends_at, blocked = p.blocked,
                   reschedule_count = s.reschedule_count + 1, updated_at = now()
             WHERE s.booking_id = p.booking_id
            RETURNING * INTO v_session;
            INSERT INTO booking.request_answers (request_key, fingerprint, booking_id)
            VALUES (p.request_key, p.fingerprint, p.booking_id);
            -- The room follows the session: pending until the worker has moved it.
            UPDATE booking.video_rooms v SET state = 'pending', url = NULL, failure_reason = NULL, updated_at = now()
             WHERE v.booking_id = p.booking_id AND v.state <> 'deleted';
        END IF;
        INSERT INTO booking.outbox (event_id, kind, booking_id, payload)
        VALUES (gen_random_uuid(), 'booking_event', v_session.booking_id, p.event);
        RETURN QUERY SELECT p.position, CASE p.kind WHEN 'place' THEN 'placed' ELSE 'moved' END, p.fingerprint,
                            NULL::text, NULL::text, NULL::jsonb, v_session, v
                       FROM (SELECT 1) AS one LEFT JOIN booking.video_rooms v ON v.booking_id = v_session.booking_id;
    END LOOP;
END;
$$;

-- The first look of a create, read-only (no commit to wait for): the request's answer if it has
-- one, else whether the slot is taken (the one conflict predicate: a cheap pre-check so that an
-- obviously taken slot holds no credits; NULL when no range was given), and the therapist's
-- schedule version (NULL: no such therapist), so that rules read from memory are checked before
-- any credit moves.
CREATE FUNCTION booking.look_up(
    p_request_keys uuid[], p_therapist_ids uuid[], p_blocked_lowers timestamptz[], p_blocked_uppers timestamptz[]
) RETURNS TABLE (
    item_position integer, fingerprint text, refusal_reason text, refusal_message text, refusal_metadata jsonb,
    session booking.sessions, room booking.video_rooms, answered boolean, conflict boolean, schedule_version bigint
) LANGUAGE sql STABLE AS $$
    SELECT i.position::integer,
           coalesce(a.fingerprint, s.request_fingerprint), a.refusal_reason, a.refusal_message, a.refusal_metadata,
           CASE WHEN s.booking_id IS NOT NULL THEN s END,
           CASE WHEN v.booking_id IS NOT NULL THEN v END,
           a.request_key IS NOT NULL OR s.booking_id IS NOT NULL,
           CASE WHEN a.request_key IS NULL AND s.booking_id IS NULL AND i.blocked_lower IS NOT NULL
                THEN booking.slot_conflicts(i.therapist_id, tstzrange(i.blocked_lower, i.blocked_upper, '[)'),
                                            i.request_key) END,
           t.schedule_version
      FROM unnest(p_request_keys, p_therapist_ids, p_blocked_lowers, p_blocked_uppers)
           WITH ORDINALITY AS i(request_key, therapist_id, blocked_lower, blocked_upper, position)
      LEFT JOIN booking.request_answers a ON a.request_key = i.request_key
      LEFT JOIN booking.sessions s ON s.booking_id = coalesce(a.booking_id, i.request_key)
      LEFT JOIN booking.video_rooms v ON v.booking_id = s.booking_id
      LEFT JOIN booking.therapists t ON t.therapist_id = i.therapist_id
$$;

-- The payments the inline calls did not finish are found through the event rows that carry them;
-- sessions need no index of their own for it. Bookings made by this version have no
-- commit_reservation rows, and no booking_attempts or decisions rows.
