-- CreateBooking's database steps for many bookings in one call and one transaction (the service
-- coalesces concurrent bookings: docs/performance.md), and a version of each therapist's
-- schedule so that the service can keep what a booking's rules need in memory and still decide
-- on what the database holds.
--
-- The guarantees are those of 0003, item by item: the attempt's primary key, the decision row's
-- primary key, the therapist's advisory lock, the one conflict predicate, and the exclusion
-- constraint as the last line. The functions of 0003 stay for replicas of the previous version
-- during a rolling upgrade.

-- Every change to what a booking's rules read (the therapist's zone, buffers, notice, horizon,
-- weekly windows, date overrides) moves the therapist's schedule_version on. A booking's claim
-- names the version its rules were checked against and is refused as stale when it moved.
-- Session types never change once made, so they need no version.
ALTER TABLE booking.therapists ADD COLUMN schedule_version bigint NOT NULL DEFAULT 0;

CREATE FUNCTION booking.bump_own_schedule_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.schedule_version = OLD.schedule_version THEN
        NEW.schedule_version := OLD.schedule_version + 1;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER therapists_schedule_version BEFORE UPDATE ON booking.therapists
    FOR EACH ROW EXECUTE FUNCTION booking.bump_own_schedule_version();

CREATE FUNCTION booking.bump_schedule_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE booking.therapists SET schedule_version = schedule_version + 1
     WHERE therapist_id = CASE WHEN TG_OP = 'DELETE' THEN OLD.therapist_id ELSE NEW.therapist_id END;
    IF TG_OP = 'UPDATE' AND NEW.therapist_id IS DISTINCT FROM OLD.therapist_id THEN
        UPDATE booking.therapists SET schedule_version = schedule_version + 1 WHERE therapist_id = OLD.therapist_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER weekly_windows_schedule_version AFTER INSERT OR UPDATE OR DELETE ON booking.weekly_windows
    FOR EACH ROW EXECUTE FUNCTION booking.bump_schedule_version();
CREATE TRIGGER date_overrides_schedule_version AFTER INSERT OR UPDATE OR DELETE ON booking.date_overrides
    FOR EACH ROW EXECUTE FUNCTION booking.bump_schedule_version();

-- Steps 1 and 2 for many bookings: per item, 'stale' when the therapist's schedule_version is
-- no longer the one the caller's rules used (nothing else happens: the caller reads the schedule
-- again and retries), otherwise what booking.claim_attempt_and_precheck (0003) returns. Items are
-- taken in request_id order, so that concurrent batches bind attempts in one order. A NULL
-- p_blocked_lowers[i] means the range could not be computed (as p_blocked NULL in 0003).
CREATE FUNCTION booking.claim_attempts(
    p_request_ids text[], p_booking_ids uuid[], p_fingerprints text[], p_therapist_ids uuid[],
    p_blocked_lowers timestamptz[], p_blocked_uppers timestamptz[], p_bookable boolean[],
    p_schedule_versions bigint[]
) RETURNS TABLE (
    item_position integer, stale boolean, booking_id uuid, fingerprint text, aborted boolean, finished boolean,
    conflict boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_item record;
BEGIN
    FOR v_item IN
        SELECT i.position::integer AS position, i.request_id, i.booking_id, i.fingerprint, i.therapist_id,
               i.blocked_lower, i.blocked_upper, i.bookable, i.schedule_version
          FROM unnest(p_request_ids, p_booking_ids, p_fingerprints, p_therapist_ids, p_blocked_lowers,
                      p_blocked_uppers, p_bookable, p_schedule_versions)
               WITH ORDINALITY AS i(request_id, booking_id, fingerprint, therapist_id, blocked_lower, blocked_upper,
                                    bookable, schedule_version, position)
         ORDER BY i.request_id, i.position
    LOOP
        IF NOT EXISTS (SELECT 1 FROM booking.therapists t
                        WHERE t.therapist_id = v_item.therapist_id AND t.schedule_version = v_item.schedule_version) THEN
            RETURN QUERY SELECT v_item.position, true, NULL::uuid, NULL::text, false, false, false;
            CONTINUE;
        END IF;
        RETURN QUERY
            SELECT v_item.position, false, c.booking_id, c.fingerprint, c.aborted, c.finished, c.conflict
              FROM booking.claim_attempt_and_precheck(
                       v_item.request_id, v_item.booking_id, v_item.fingerprint, v_item.therapist_id,
                       CASE WHEN v_item.blocked_lower IS NULL THEN NULL
                            ELSE tstzrange(v_item.blocked_lower, v_item.blocked_upper, '[)') END,
                       v_item.bookable) c;
    END LOOP;
END;
$$;

-- Step 4 for one booking, under the therapist's advisory lock: as booking.decide_booking (0003),
-- with three differences.
--   * With p_wait false the lock is only tried: when another transaction holds it, the outcome
--     is 'busy' and nothing happens (a batch never waits for one therapist's lock with the other
--     bookings aboard: the caller decides a busy booking again on its own, waiting then).
--   * A refusal is decided here too: on 'conflict' the decision `abort` is recorded and the
--     attempt forgotten (so a retry starts afresh) in this same transaction; the caller only
--     releases the hold. (0003 left both to the caller, one round trip each.)
--   * The outbox row that retries CommitReservation falls due p_commit_retry_after_s from now:
--     the inline commit is usually done well before, and the worker then finds nothing to do.
-- The caller runs it at READ COMMITTED with lock_timeout set (booking.decide_bookings does both).
CREATE FUNCTION booking.decide_one(
    p_booking_id uuid, p_request_id text, p_client_id uuid, p_therapist_id uuid, p_session_type_id uuid,
    p_starts_at timestamptz, p_ends_at timestamptz, p_blocked tstzrange, p_time_zone text, p_credit_cost bigint,
    p_notification jsonb, p_video_room_name text, p_commit_retry_after_s double precision, p_wait boolean
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
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('therapist:' || p_therapist_id::text, 0));
    ELSIF NOT pg_try_advisory_xact_lock(hashtextextended('therapist:' || p_therapist_id::text, 0)) THEN
        RETURN QUERY SELECT 'busy'::text, NULL::uuid, NULL::text, NULL::uuid, NULL::uuid, NULL::uuid,
                            NULL::timestamptz, NULL::timestamptz, NULL::text, NULL::bigint, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::bigint, NULL::timestamptz, NULL::integer,
                            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;

    IF EXISTS (SELECT 1 FROM booking.sessions s WHERE s.booking_id = p_booking_id) THEN
        RETURN QUERY SELECT 'existing'::text, s.booking_id, s.request_id, s.client_id, s.therapist_id,
                            s.session_type_id, s.starts_at, s.ends_at, s.time_zone, s.credit_cost, s.status,
                            s.payment_status, s.cancelled_by, s.cancel_reason, s.refunded_credits, s.cancelled_at,
                            s.reschedule_count, s.created_at, s.updated_at
                       FROM booking.sessions s WHERE s.booking_id = p_booking_id;
        RETURN;
    END IF;
    IF booking.slot_conflicts(p_therapist_id, p_blocked, NULL) THEN
        INSERT INTO booking.decisions (reservation_id, decision) VALUES (p_booking_id, 'abort')
        ON CONFLICT (reservation_id) DO NOTHING;
        DELETE FROM booking.booking_attempts a WHERE a.request_id = p_request_id AND a.booking_id = p_booking_id;
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

    INSERT INTO booking.outbox (event_id, kind, booking_id, payload, next_attempt_at)
    VALUES (gen_random_uuid(), 'commit_reservation', p_booking_id, '{}',
            now() + make_interval(secs => p_commit_retry_after_s)),
           (gen_random_uuid(), 'notification', p_booking_id, p_notification, now());
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
    IF p_video_room_name IS NOT NULL THEN
        INSERT INTO booking.video_rooms (booking_id, room_name) VALUES (p_booking_id, p_video_room_name)
        ON CONFLICT (booking_id) DO NOTHING;
        INSERT INTO booking.outbox (event_id, kind, booking_id, payload)
        VALUES (gen_random_uuid(), 'create_video_room', p_booking_id, '{}');
    END IF;
END;
$$;

-- Step 4 for many bookings in one transaction: booking.decide_one per item, in the order of the
-- therapists (then of the bookings). Two items for one therapist see each other: the second's
-- conflict check runs after the first's insert, in the same transaction.
-- With p_wait false (a batch of several), a therapist whose lock another transaction holds is
-- 'busy' for its items: the batch never waits, so it cannot deadlock with another either. With
-- p_wait true (one booking alone), the lock is waited for: beyond p_lock_timeout_ms that raises
-- lock_not_available. A slot taken despite the check raises the exclusion violation of
-- sessions_no_overlap, for the whole batch: the caller then decides each item on its own, to give
-- that refusal to its own item only.
CREATE FUNCTION booking.decide_bookings(
    p_lock_timeout_ms integer, p_commit_retry_after_s double precision, p_wait boolean,
    p_booking_ids uuid[], p_request_ids text[], p_client_ids uuid[], p_therapist_ids uuid[],
    p_session_type_ids uuid[], p_starts_ats timestamptz[], p_ends_ats timestamptz[],
    p_blocked_lowers timestamptz[], p_blocked_uppers timestamptz[], p_time_zones text[], p_credit_costs bigint[],
    p_notifications text[], p_video_room_names text[]
) RETURNS TABLE (
    item_position integer, outcome text, booking_id uuid, request_id text, client_id uuid, therapist_id uuid,
    session_type_id uuid, starts_at timestamptz, ends_at timestamptz, time_zone text, credit_cost bigint,
    status text, payment_status text, cancelled_by text, cancel_reason text, refunded_credits bigint,
    cancelled_at timestamptz, reschedule_count integer, created_at timestamptz, updated_at timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_item record;
BEGIN
    -- Lock, then check: only at READ COMMITTED does the check see what the previous holder of the
    -- lock committed (CONVENTIONS.md). The pool pins it; this refuses any other setting loudly.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'booking.decide_bookings needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    FOR v_item IN
        SELECT i.*
          FROM unnest(p_booking_ids, p_request_ids, p_client_ids, p_therapist_ids, p_session_type_ids, p_starts_ats,
                      p_ends_ats, p_blocked_lowers, p_blocked_uppers, p_time_zones, p_credit_costs, p_notifications,
                      p_video_room_names)
               WITH ORDINALITY AS i(booking_id, request_id, client_id, therapist_id, session_type_id, starts_at,
                                    ends_at, blocked_lower, blocked_upper, time_zone, credit_cost, notification,
                                    video_room_name, position)
         ORDER BY i.therapist_id, i.booking_id, i.position
    LOOP
        RETURN QUERY
            SELECT v_item.position::integer, d.*
              FROM booking.decide_one(
                       v_item.booking_id, v_item.request_id, v_item.client_id, v_item.therapist_id,
                       v_item.session_type_id, v_item.starts_at, v_item.ends_at,
                       tstzrange(v_item.blocked_lower, v_item.blocked_upper, '[)'), v_item.time_zone,
                       v_item.credit_cost, v_item.notification::jsonb, v_item.video_room_name,
                       p_commit_retry_after_s, p_wait) d;
    END LOOP;
END;
$$;

-- Room on each page for the next version of a row, so that updates that change no indexed
-- column stay on the page (HOT: no new index entries): a session is marked PAID right after it
-- is inserted, a video room turns ready. Applies to pages written from now on.
ALTER TABLE booking.sessions SET (fillfactor = 80);
ALTER TABLE booking.video_rooms SET (fillfactor = 80);
