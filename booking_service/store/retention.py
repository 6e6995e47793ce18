"""The retention worker's SQL: one bounded batch of rows past their bound, per kind of row.

Each batch is one DELETE of at most `limit` rows, oldest first, found through an index on the
row's age (migration 0008), so a batch reads only rows it deletes (dead letters of unsettled
payments aside: they stay, and there are few). Rows are taken FOR UPDATE SKIP LOCKED: a row
another transaction holds is left for a later batch, so the purge never waits for a row lock and
two replicas purging at once take different rows (a row deleted by one is gone for the other).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Rows:
    """Where one kind of row lives: its table, key, age column (indexed, migration 0008) and what
    else a row must be to go."""

    table: str
    key: str
    age: str
    condition: str = "true"

    @property
    def batch_sql(self) -> str:
        """One batch: $1 the cutoff (rows strictly older go), $2 the batch's size."""
        # `= ANY (ARRAY(...))`, not `IN (...)`: the rows to delete are then found by their key,
        # whereas a semi-join may read the whole table to match them.
        return f"""DELETE FROM {self.table} WHERE {self.key} = ANY (ARRAY(
                       SELECT o.{self.key} FROM {self.table} o
                        WHERE {self.condition} AND o.{self.age} < $1
                        ORDER BY o.{self.age} LIMIT $2 FOR UPDATE OF o SKIP LOCKED))"""


# What each kind of row is, and so each one's batch statement.
ROWS = {
    # A series' answer names its first session and is the only record of which request made the
    # series (its occurrences' ids derive from the request key): it stays while the series has a
    # session. A refusal's answer, and a reschedule's (its booking stays), go.
    Purged.REQUEST_ANSWERS: _Rows(
        "booking.request_answers",
        "request_key",
        "created_at",
        "NOT EXISTS (SELECT 1 FROM booking.sessions s WHERE s.series_id = o.request_key)",
    ),
    Purged.DELIVERED_EVENTS: _Rows("booking.outbox", "event_id", "updated_at", "o.status = 'delivered'"),
    # A dead letter whose booking still waits for its payment (COMMITTING, REFUNDING) is what the
    # runbook re-drives: it stays until the payment is settled, whatever its age.
    Purged.DEAD_LETTERS: _Rows(
        "booking.outbox",
        "event_id",
        "updated_at",
        """o.status = 'dead'
           AND NOT EXISTS (SELECT 1 FROM booking.sessions s
                            WHERE s.booking_id = o.booking_id AND s.payment_status IN ('committing', 'refunding'))""",
    ),
    Purged.PREVIOUS_ATTEMPTS: _Rows("booking.booking_attempts", "request_id", "created_at"),
    Purged.PREVIOUS_DECISIONS: _Rows("booking.decisions", "reservation_id", "decided_at"),
    Purged.PREVIOUS_RESCHEDULES: _Rows("booking.reschedules", "request_id", "created_at"),
}


async def purge_batch(
    connection: Connection, purged: Purged, cutoff: datetime, limit: int, *, statement_timeout_ms: int
) -> int:
    """Deletes up to `limit` rows of one kind older than `cutoff`, in one short transaction whose
    statement may take `statement_timeout_ms` at most; the number of rows deleted."""
    async with connection.transaction():
        # SET LOCAL: the pooled connection's session settings stay as they were.
        await connection.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        status = await connection.execute(ROWS[purged].batch_sql, cutoff, limit)
    return int(status.split()[-1])  # "DELETE <n>"
