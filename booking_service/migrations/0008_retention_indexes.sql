-- Retention (docs/operations.md, "Retention"): what no invariant needs after its bound is purged by
-- the retention worker (booking_service/retention.py) in bounded batches, oldest first. Each batch
-- reads the rows past their bound through one of these indexes, and only those: a batch costs the
-- same on a table of a week's rows as on one of years.
--
-- Building them takes the tables' SHARE lock for as long as the build lasts (writes wait; reads do
-- not): about a second per million rows (docs/operations.md, "Retention").

-- A request's refusal, or a reschedule's answer, past the request-id retention.
CREATE INDEX request_answers_by_age ON booking.request_answers (created_at);

-- Delivered events, by the time of their delivery. Dead letters are found through
-- outbox_dead_letters (migration 0002), which is ordered by the same column.
CREATE INDEX outbox_delivered_by_age ON booking.outbox (updated_at) WHERE status = 'delivered';

-- The previous version's request ids and decision log, which only it and the reconciler of its
-- holds read: purged past the rolling-upgrade window, until the release that drops the tables.
CREATE INDEX booking_attempts_by_age ON booking.booking_attempts (created_at);
CREATE INDEX decisions_by_age ON booking.decisions (decided_at);
CREATE INDEX reschedules_by_age ON booking.reschedules (created_at);
