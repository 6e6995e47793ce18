"""The SQL of session outcomes: one recorded, and the sweep of the sessions nobody marked."""

from __future__ import annotations

import uuid
from datetime import datetime

from booking_service.domain import Actor, Booking, PaymentStatus, SessionOutcome
from booking_service.store import rows
from service_kit.connection import Connection


async def record_outcome(
    connection: Connection,
    booking_id: uuid.UUID,
    outcome: SessionOutcome,
    *,
    actor: Actor,
    at: datetime,
    refunded_credits: int,
    payment_status: PaymentStatus,
) -> Booking:
    row = await connection.fetchrow(
        f"""UPDATE booking.sessions
               SET outcome = $2, outcome_by = $3, outcome_at = $4, refunded_credits = $5, payment_status = $6,
                   updated_at = now()
             WHERE booking_id = $1
         RETURNING {rows.BOOKING_COLUMNS}""",
        booking_id,
        outcome.value,
        actor.value,
        at,
        refunded_credits,
        payment_status.value,
    )
    assert row is not None
    return rows.booking(row)


async def complete_unmarked(connection: Connection, ended_before: datetime, now: datetime, limit: int) -> list[Booking]:
    """Marks up to `limit` confirmed sessions without an outcome that ended before `ended_before`
    COMPLETED by the system, oldest first; returns them. Rows another sweeper holds are skipped."""
    found = await connection.fetch(
        f"""UPDATE booking.sessions s
               SET outcome = 'completed', outcome_by = 'system', outcome_at = $2, updated_at = now()
              FROM (SELECT booking_id FROM booking.sessions
                     WHERE status = 'confirmed' AND outcome IS NULL AND starts_at < $1 AND ends_at <= $1
                     ORDER BY starts_at
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED) due
             WHERE s.booking_id = due.booking_id
         RETURNING {", ".join(f"s.{column}" for column in rows.BOOKING_FIELDS)}""",
        ended_before,
        now,
        limit,
    )
    return [rows.booking(row) for row in found]
