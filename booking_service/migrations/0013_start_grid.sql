-- Bookable starts lie on a grid (docs/design.md, "The grid of starts"): every start_step_minutes
-- of the therapist's local time, counted from local midnight. The listing and the check share one
-- definition (booking_service/availability.py, grid_start_at_or_after). A step divides an hour,
-- so the grid is the same every hour; existing session types get the default, 15 minutes.
-- Sessions booked before this migration keep their starts, on the grid or not.
ALTER TABLE booking.session_types
    ADD COLUMN start_step_minutes smallint NOT NULL DEFAULT 15,
    ADD CONSTRAINT session_types_start_step CHECK (start_step_minutes IN (5, 10, 15, 20, 30, 60));
