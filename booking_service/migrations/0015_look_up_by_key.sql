-- booking.look_up (migration 0005) finds each request's answer, session and room by key, in one
-- statement. As a join it let the planner pick hash joins over whole tables when the statistics
-- said they were small, and a plan made once on a connection is kept until the table is analysed:
-- made on a fresh database, every later look-up on that connection read every session (1.1 ms
-- after 1,000 bookings, 5.0 ms after 6,000; python -m bench.plan_drift, docs/performance.md, "A
-- plan that aged"). Here each row is found through its key, a probe per item whatever the
-- statistics say: each table is read by a lateral subquery that depends on the item, and OFFSET 0
-- keeps the planner from turning it back into a join over the table. Same signature, same answers.
-- (A row's IS NULL is true only when every one of its fields is: the checks below ask its key.)
CREATE OR REPLACE FUNCTION booking.look_up(
    p_request_keys uuid[], p_therapist_ids uuid[], p_blocked_lowers timestamptz[], p_blocked_uppers timestamptz[]
) RETURNS TABLE (
    item_position integer, fingerprint text, refusal_reason text, refusal_message text, refusal_metadata jsonb,
    session booking.sessions, room booking.video_rooms, answered boolean, conflict boolean, schedule_version bigint
) LANGUAGE sql STABLE AS $$
    SELECT i.position::integer,
           coalesce((a.answer).fingerprint, (s.session).request_fingerprint),
           (a.answer).refusal_reason, (a.answer).refusal_message, (a.answer).refusal_metadata,
           s.session,
           v.room,
           (a.answer).request_key IS NOT NULL OR (s.session).booking_id IS NOT NULL,
           CASE WHEN (a.answer).request_key IS NULL AND (s.session).booking_id IS NULL AND i.blocked_lower IS NOT NULL
                THEN booking.slot_conflicts(i.therapist_id, tstzrange(i.blocked_lower, i.blocked_upper, '[)'),
                                            i.request_key) END,
           t.schedule_version
      FROM unnest(p_request_keys, p_therapist_ids, p_blocked_lowers, p_blocked_uppers)
           WITH ORDINALITY AS i(request_key, therapist_id, blocked_lower, blocked_upper, position)
      LEFT JOIN LATERAL (SELECT x FROM booking.request_answers x WHERE x.request_key = i.request_key OFFSET 0)
                AS a(answer) ON true
      LEFT JOIN LATERAL (SELECT x FROM booking.sessions x
                          WHERE x.booking_id = coalesce((a.answer).booking_id, i.request_key) OFFSET 0)
                AS s(session) ON true
      LEFT JOIN LATERAL (SELECT x FROM booking.video_rooms x WHERE x.booking_id = (s.session).booking_id OFFSET 0)
                AS v(room) ON true
      LEFT JOIN LATERAL (SELECT x.schedule_version FROM booking.therapists x
                          WHERE x.therapist_id = i.therapist_id OFFSET 0) AS t ON true
$$;
