-- Weekly series (docs/design.md, "A weekly series"): N occurrences of one session type at the same
-- local time every week or every other week, for one client, with one request id.
--
-- * One request, one answer. The series' request key (caller and request id) is its series id;
--   each occurrence's booking id is derived from the series key and the occurrence's index, so
--   every copy and every retry finds the same holds and the same sessions. Each occurrence is a
--   session row of its own, carrying series_id and series_index.
-- * One locked step. booking.decide takes the occurrences of a series as a group of proposals
--   (kind 'series': all or nothing; 'series_partial': book what is free) and decides the whole
--   group under the therapist's calendar lock, in the transaction of the call, as one answer for
--   the series key: every occurrence placed, or (all or nothing) none and the refusal naming
--   each taken occurrence recorded as the series' answer. Single proposals go on to 0005's
--   function, unchanged and renamed booking.decide_each. A placed series' answer is a request_answers row
--   naming its first session; its refusal_metadata names the occurrences it skipped (if any).
-- * Holds of series occurrences carry the reference 'therapist:<id>/series:<series id>/booking:<id>':
--   the reconciler proposes its abort for the series key, so an all-or-nothing series is never
--   left half placed by a stale hold.
--
-- Rolling upgrade: the previous version calls booking.decide with kinds 'place', 'move' and
-- 'refuse' only, which booking.decide_each decides exactly as 0005 did. Its reconciler ignores series
-- holds (they are not 'booking:<id>'), which this version's reconciler resolves.

ALTER TABLE booking.sessions
    ADD COLUMN series_id uuid,
    ADD COLUMN series_index smallint,
    ADD CONSTRAINT sessions_series_shape CHECK ((series_id IS NULL) = (series_index IS NULL)),
    ADD CONSTRAINT sessions_series_index_bounded CHECK (series_index BETWEEN 0 AND 51);

CREATE INDEX sessions_by_series ON booking.sessions (series_id, series_index) WHERE series_id IS NOT NULL;

-- What booking.proposal's fields mean for the kinds this migration adds ('series' and
-- 'series_partial'): request_key is the series key (the series id), booking_id the occurrence's
-- booking id, booking_version the occurrence's index, blocked NULL for an occurrence the rules
-- refused already (book-what-is-free only: it is skipped with refusal_*), and refusal_* what the
-- occurrence is answered with when its slot is taken (SLOT_UNAVAILABLE, its metadata naming it).
COMMENT ON TYPE booking.proposal IS
    'A request''s proposal to booking.decide: kinds place, move, refuse (0005); series, series_partial (0009)';

-- The proposals of one series in `p_proposals` (the group booking.decide decides at once), with
-- their positions in the array.
CREATE FUNCTION booking.series_group(p_proposals booking.proposal[], p_series_id uuid, p_kind text)
RETURNS TABLE (
    item_position integer, booking_id uuid, occurrence integer, blocked tstzrange, proposal booking.proposal
) LANGUAGE sql IMMUTABLE AS $$
    SELECT n, (p_proposals[n]).booking_id, (p_proposals[n]).booking_version, (p_proposals[n]).blocked, p_proposals[n]
      FROM generate_subscripts(p_proposals, 1) AS n
     WHERE (p_proposals[n]).request_key = p_series_id AND (p_proposals[n]).kind = p_kind
$$;

-- Steps 1 to 4 for the group of one series, under the therapist's lock (booking.decide takes it,
-- in the same transaction; nothing else calls this):
--   1. the series' answer, if it has one: 'answered', each occurrence with its session if it has one;
--   2. rules checked against a schedule that changed since: 'stale' (nothing written);
--   3. the occurrences that cannot be placed: refused by the rules already (blocked NULL) or taken
--      (the one conflict predicate). For 'series' any of them, for 'series_partial' all of them,
--      refuse the whole series: the refusal naming each (their reason if they share one, else
--      OCCURRENCES_UNAVAILABLE) is recorded as the series' answer, 'refused' for every occurrence;
--   4. otherwise every other occurrence is inserted with its video room and its one outbox event
--      ('placed'), the series' answer recorded (its first session; refusal_metadata names the
--      skipped occurrences), and the skipped ones answered 'skipped' with their own refusal.
CREATE FUNCTION booking.decide_series(p_proposals booking.proposal[], p_series booking.proposal)
RETURNS TABLE (
    item_position integer, outcome text, fingerprint text, refusal_reason text, refusal_message text,
    refusal_metadata jsonb, session booking.sessions, room booking.video_rooms
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_answered boolean := false;
    v_fingerprint text;
    v_skipped integer[];
    v_size integer;
    v_reason text;
    v_message text;
    v_metadata jsonb;
BEGIN
    -- 1. The series' answer, if it has one (a single create made with the same key answers too:
    --    the service sees its fingerprint and refuses the reused request id).
    SELECT a.fingerprint, a.refusal_reason, a.refusal_message, a.refusal_metadata, true
      INTO v_fingerprint, v_reason, v_message, v_metadata, v_answered
      FROM booking.request_answers a WHERE a.request_key = p_series.request_key;
    IF NOT v_answered THEN
        SELECT s.request_fingerprint, true INTO v_fingerprint, v_answered
          FROM booking.sessions s WHERE s.booking_id = p_series.request_key;
    END IF;
    IF v_answered THEN
        RETURN QUERY SELECT g.item_position, 'answered'::text, v_fingerprint, v_reason, v_message,
                            coalesce(v_metadata, '{}'), s, v
                       FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
                       LEFT JOIN booking.sessions s ON s.booking_id = g.booking_id AND s.series_id = p_series.request_key
                       LEFT JOIN booking.video_rooms v ON v.booking_id = s.booking_id;
        RETURN;
    END IF;

    -- 2. The rules' version.
    IF NOT EXISTS (SELECT 1 FROM booking.therapists t
                    WHERE t.therapist_id = p_series.therapist_id AND t.schedule_version = p_series.schedule_version) THEN
        RETURN QUERY SELECT g.item_position, 'stale'::text, NULL::text, NULL::text, NULL::text, NULL::jsonb,
                            NULL::booking.sessions, NULL::booking.video_rooms
                       FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g;
        RETURN;
    END IF;

    -- 3. The occurrences that cannot be placed, and what they say.
    SELECT array_agg(g.item_position ORDER BY g.occurrence) INTO v_skipped
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
     WHERE g.blocked IS NULL OR booking.slot_conflicts(p_series.therapist_id, g.blocked, g.booking_id);
    SELECT count(*) INTO v_size FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind);
    v_skipped := coalesce(v_skipped, '{}');
    SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb) INTO v_metadata
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g,
           jsonb_each((g.proposal).refusal_metadata) e
     WHERE g.item_position = ANY (v_skipped);
    IF cardinality(v_skipped) > 0 AND (p_series.kind = 'series' OR cardinality(v_skipped) = v_size) THEN
        SELECT CASE WHEN count(DISTINCT (g.proposal).refusal_reason) = 1 THEN min((g.proposal).refusal_reason)
                    ELSE 'OCCURRENCES_UNAVAILABLE' END,
               left(format('%s of %s occurrences cannot be booked: %s', count(*), v_size,
                           string_agg((g.proposal).refusal_message, '; ' ORDER BY g.occurrence)), 1000)
          INTO v_reason, v_message
          FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
         WHERE g.item_position = ANY (v_skipped);
        INSERT INTO booking.request_answers
               (request_key, fingerprint, booking_id, refusal_reason, refusal_message, refusal_metadata)
        VALUES (p_series.request_key, p_series.fingerprint, NULL, v_reason, v_message, v_metadata);
        RETURN QUERY SELECT g.item_position, 'refused'::text, p_series.fingerprint, v_reason, v_message, v_metadata,
                            NULL::booking.sessions, NULL::booking.video_rooms
                       FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g;
        RETURN;
    END IF;

    -- 4. Every other occurrence, its room and its event; the series' answer.
    INSERT INTO booking.sessions
           (booking_id, request_id, request_fingerprint, client_id, therapist_id, session_type_id,
            starts_at, ends_at, blocked, time_zone, credit_cost, series_id, series_index)
    SELECT g.booking_id, (g.proposal).request_id, (g.proposal).fingerprint, (g.proposal).client_id,
           p_series.therapist_id, (g.proposal).session_type_id, (g.proposal).starts_at, (g.proposal).ends_at,
           g.blocked, (g.proposal).time_zone, (g.proposal).credit_cost, p_series.request_key, g.occurrence
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
     WHERE g.item_position <> ALL (v_skipped);
    INSERT INTO booking.video_rooms (booking_id, room_name)
    SELECT g.booking_id, (g.proposal).video_room_name
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
     WHERE g.item_position <> ALL (v_skipped) AND (g.proposal).video_room_name IS NOT NULL;
    INSERT INTO booking.outbox (event_id, kind, booking_id, payload)
    SELECT gen_random_uuid(), 'booking_event', g.booking_id, (g.proposal).event
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
     WHERE g.item_position <> ALL (v_skipped);
    INSERT INTO booking.request_answers (request_key, fingerprint, booking_id, refusal_metadata)
    SELECT p_series.request_key, p_series.fingerprint, g.booking_id, v_metadata
      FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
     WHERE g.item_position <> ALL (v_skipped)
     ORDER BY g.occurrence LIMIT 1;
    RETURN QUERY SELECT g.item_position, CASE WHEN s.booking_id IS NULL THEN 'skipped' ELSE 'placed' END,
                        p_series.fingerprint,
                        CASE WHEN s.booking_id IS NULL THEN (g.proposal).refusal_reason END,
                        CASE WHEN s.booking_id IS NULL THEN (g.proposal).refusal_message END,
                        CASE WHEN s.booking_id IS NULL THEN (g.proposal).refusal_metadata END, s, v
                   FROM booking.series_group(p_proposals, p_series.request_key, p_series.kind) g
                   LEFT JOIN booking.sessions s
                          ON s.booking_id = g.booking_id AND g.item_position <> ALL (v_skipped)
                   LEFT JOIN booking.video_rooms v ON v.booking_id = s.booking_id;
END;
$$;

-- The therapist's calendar lock (booking.calendar_lock_key), waited for (at most lock_timeout) or
-- only tried; whether it is held.
CREATE FUNCTION booking.take_calendar_lock(p_therapist_id uuid, p_wait boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(booking.calendar_lock_key(p_therapist_id));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(booking.calendar_lock_key(p_therapist_id));
END;
$$;

-- The locked step of 0005, unchanged, decides the single proposals ('place', 'move', 'refuse');
-- it keeps its body under a new name, and booking.decide hands it those proposals.
ALTER FUNCTION booking.decide(booking.proposal[], boolean, integer) RENAME TO decide_each;

-- The locked step, the one place where a request gets its answer: the single proposals as 0005
-- decided them (booking.decide_each), and each series (the proposals of one request_key, kind
-- 'series' or 'series_partial') as one group, under its therapist's lock, by booking.decide_series;
-- all in this one READ COMMITTED transaction. A call with p_wait false (a batch of several) only
-- tries locks: a series whose calendar another transaction holds is 'busy' for every proposal of
-- it, decided again alone. A call with p_wait true holds one proposal or one series, so waiting
-- calls never hold one lock while waiting for another. The exclusion violation undoes the call.
CREATE FUNCTION booking.decide(p_proposals booking.proposal[], p_wait boolean, p_lock_timeout_ms integer)
RETURNS TABLE (
    item_position integer, outcome text, fingerprint text, refusal_reason text, refusal_message text,
    refusal_metadata jsonb, session booking.sessions, room booking.video_rooms
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_positions integer[];
    v_singles booking.proposal[];
    v_series record;
BEGIN
    SELECT array_agg(n ORDER BY n), array_agg(p_proposals[n] ORDER BY n) INTO v_positions, v_singles
      FROM generate_subscripts(p_proposals, 1) AS n
     WHERE (p_proposals[n]).kind NOT IN ('series', 'series_partial');
    -- Even with no single proposal: it checks the isolation level and sets the lock timeout.
    RETURN QUERY SELECT v_positions[d.item_position], d.outcome, d.fingerprint, d.refusal_reason,
                        d.refusal_message, d.refusal_metadata, d.session, d.room
                   FROM booking.decide_each(coalesce(v_singles, '{}'), p_wait, p_lock_timeout_ms) AS d;
    FOR v_series IN
        SELECT DISTINCT ON ((p_proposals[n]).therapist_id, (p_proposals[n]).request_key, (p_proposals[n]).kind)
               p_proposals[n] AS first
          FROM generate_subscripts(p_proposals, 1) AS n
         WHERE (p_proposals[n]).kind IN ('series', 'series_partial')
         ORDER BY (p_proposals[n]).therapist_id, (p_proposals[n]).request_key, (p_proposals[n]).kind, n
    LOOP
        IF NOT booking.take_calendar_lock((v_series.first).therapist_id, p_wait) THEN
            RETURN QUERY SELECT g.item_position, 'busy'::text, NULL::text, NULL::text, NULL::text, NULL::jsonb,
                                NULL::booking.sessions, NULL::booking.video_rooms
                           FROM booking.series_group(p_proposals, (v_series.first).request_key, (v_series.first).kind) g;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT * FROM booking.decide_series(p_proposals, v_series.first);
    END LOOP;
END;
$$;
