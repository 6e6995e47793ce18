"""SQL of the booking service, one function per statement, by what it keeps: the catalogue
(therapists, schedules, session types), the calendar (sessions and the answers of requests), and
the outbox. Tables live in the `booking` schema. Driver errors that mean something to the domain
(a lock timeout, a taken slot) are translated here, so nothing above the store imports asyncpg."""

SCHEMA = "booking"
