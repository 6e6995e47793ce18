"""The retention worker's SQL: one bounded batch of rows past their bound, per kind of row.

Each batch is one DELETE of at most `limit` rows, oldest first, found through an index on the
row's age (migration 0006), so a batch reads only rows it deletes (dead letters of unsettled
payments aside: they stay, and there are few). Rows are taken FOR UPDATE SKIP LOCKED: a row
another transaction holds is left for a later batch, so the purge never waits for a row lock and
two replicas purging at once take different rows (a row deleted by one is gone for the other).
"""

from __future__ import annotations

import enum
from datetime import datetime

from service_kit.connection import Connection


class Purged(enum.Enum):
    """What the retention purges (the `kind` label of its metrics)."""

    REQUEST_ANSWERS = "request_answers"
    DELIVERED_EVENTS = "delivered_events"
    DEAD_LETTERS = "dead_letters"
    PREVIOUS_ATTEMPTS = "previous_attempts"
    PREVIOUS_DECISIONS = "previous_decisions"
    PREVIOUS_RESCHEDULES = "previous_reschedules"


# $1: the cutoff (rows strictly older go), $2: the batch's size.
_BATCHES = {
    Purged.REQUEST_ANSWERS: """
        DELETE FROM booking.request_answers WHERE request_key IN (
            SELECT request_key FROM booking.request_answers
             WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    Purged.DELIVERED_EVENTS: """
        DELETE FROM booking.outbox WHERE event_id IN (
            SELECT event_id FROM booking.outbox
             WHERE status = 'delivered' AND updated_at < $1 ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    # A dead letter whose booking still waits for its payment (COMMITTING, REFUNDING) is what the
    # runbook re-drives: it stays until the payment is settled, whatever its age.
    Purged.DEAD_LETTERS: """
        DELETE FROM booking.outbox WHERE event_id IN (
            SELECT o.event_id FROM booking.outbox o
             WHERE o.status = 'dead' AND o.updated_at < $1
               AND NOT EXISTS (SELECT 1 FROM booking.sessions s
                                WHERE s.booking_id = o.booking_id
                                  AND s.payment_status IN ('committing', 'refunding'))
             ORDER BY o.updated_at LIMIT $2 FOR UPDATE OF o SKIP LOCKED)""",
    Purged.PREVIOUS_ATTEMPTS: """
        DELETE FROM booking.booking_attempts WHERE request_id IN (
            SELECT request_id FROM booking.booking_attempts
             WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    Purged.PREVIOUS_DECISIONS: """
        DELETE FROM booking.decisions WHERE reservation_id IN (
            SELECT reservation_id FROM booking.decisions
             WHERE decided_at < $1 ORDER BY decided_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
    Purged.PREVIOUS_RESCHEDULES: """
        DELETE FROM booking.reschedules WHERE request_id IN (
            SELECT request_id FROM booking.reschedules
             WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)""",
}


async def purge_batch(
    connection: Connection, purged: Purged, cutoff: datetime, limit: int, *, statement_timeout_ms: int
) -> int:
    """Deletes up to `limit` rows of one kind older than `cutoff`, in one short transaction whose
    statement may take `statement_timeout_ms` at most; the number of rows deleted."""
    async with connection.transaction():
        # SET LOCAL: the pooled connection's session settings stay as they were.
        await connection.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        status = await connection.execute(_BATCHES[purged], cutoff, limit)
    return int(status.split()[-1])  # "DELETE <n>"
