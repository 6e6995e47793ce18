-- Discovery (ListTherapists, SearchAvailability), archived therapists, and session types that
-- change (price, name) or retire (docs/design.md, "Discovery").
--
-- * A therapist has languages and specialties (tags a marketplace filters on), and may be
--   archived: no longer listed or bookable, the row and its bookings kept. Archiving is an UPDATE
--   of the therapist, so the BEFORE UPDATE trigger of 0004 moves its schedule_version on.
-- * A session type may change its name or price, or retire (no new bookings; its bookings stay).
--   0004 assumed session types never change; a booking's rules include the type (its cost), and
--   every replica keeps them in memory checked against the therapist's schedule_version. So every
--   change to a session type moves its therapist's schedule_version on too (the trigger below),
--   and a booking decided on a type read before the change is refused as stale and read again.

ALTER TABLE booking.therapists
    ADD COLUMN languages text[] NOT NULL DEFAULT '{}',
    ADD COLUMN specialties text[] NOT NULL DEFAULT '{}',
    ADD COLUMN archived_at timestamptz,
    ADD CONSTRAINT therapists_languages_bounded CHECK (cardinality(languages) <= 10),
    ADD CONSTRAINT therapists_specialties_bounded CHECK (cardinality(specialties) <= 20);

-- ListTherapists and SearchAvailability page in creation order: (created_at, therapist_id) is
-- the keyset cursor, an index condition even in the generic plan. The filters are conditions on
-- the rows this index walks. (No GIN index on the tags: in the generic plan of a prepared
-- statement the planner cannot tell an empty filter, which matches every row, from a rare tag,
-- and chose a bitmap of every therapist sorted for each page.)
CREATE INDEX therapists_by_creation ON booking.therapists (created_at, therapist_id);

ALTER TABLE booking.session_types
    ADD COLUMN retired_at timestamptz,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Any change to a session type (its price, its name, its retirement) is a change to its
-- therapist's booking rules. booking.bump_schedule_version (0004) updates the therapist row,
-- whose own trigger then leaves the version as moved on.
CREATE TRIGGER session_types_schedule_version AFTER UPDATE ON booking.session_types
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION booking.bump_schedule_version();
