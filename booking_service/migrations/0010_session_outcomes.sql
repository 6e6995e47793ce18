-- Session outcomes and the policies of a session type (docs/design.md, "Outcomes and policies").
--
-- * After a session starts, its therapist or an admin records what happened: 'completed' or
--   'no_show'. A no-show refunds the session type's no_show_refund_percent of its cost (a partial
--   refund of the committed hold). Sessions nobody marked become 'completed' by the sweeper
--   BOOKING_OUTCOME_SWEEP_AFTER_S after their end ('system'), so the books close.
-- * A client cancelling later than the session type's late_cancel_notice_minutes before the
--   start is refunded its late_cancel_refund_percent (NULL notice: the service's
--   BOOKING_FREE_CANCELLATION_HOURS, as before this migration); earlier, in full.
-- * The status stays 'confirmed' for a session with an outcome: it keeps its place in the
--   calendar (the exclusion constraint), which an outcome recorded before its end must not free.

ALTER TABLE booking.session_types
    ADD COLUMN late_cancel_notice_minutes integer,
    ADD COLUMN late_cancel_refund_percent smallint NOT NULL DEFAULT 0,
    ADD COLUMN no_show_refund_percent smallint NOT NULL DEFAULT 0,
    ADD CONSTRAINT session_types_late_notice CHECK (late_cancel_notice_minutes BETWEEN 0 AND 43200),
    ADD CONSTRAINT session_types_refund_percents CHECK (late_cancel_refund_percent BETWEEN 0 AND 100
                                                        AND no_show_refund_percent BETWEEN 0 AND 100);

ALTER TABLE booking.sessions
    ADD COLUMN outcome text,
    ADD COLUMN outcome_by text,
    ADD COLUMN outcome_at timestamptz,
    ADD CONSTRAINT sessions_outcome_known CHECK (outcome IN ('completed', 'no_show')),
    ADD CONSTRAINT sessions_outcome_shape CHECK ((outcome IS NULL) = (outcome_by IS NULL)
                                                 AND (outcome IS NULL) = (outcome_at IS NULL)),
    ADD CONSTRAINT sessions_outcome_of_confirmed CHECK (outcome IS NULL OR status = 'confirmed');

-- The sessions still to happen or to be marked: the sweeper's scan (by start, past ones), and the
-- reminders' (by start, the next hours). Small: a session leaves it once cancelled or marked.
CREATE INDEX sessions_open ON booking.sessions (starts_at) WHERE status = 'confirmed' AND outcome IS NULL;
