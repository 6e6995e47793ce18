"""The single-transaction baseline: installing `baseline.sql`, seeding it, calling it, checking it."""

from __future__ import annotations

import uuid
from datetime import datetime
from importlib import resources

from service_kit.connection import Connection

SCHEMA = "baseline"
CALL_TIMEOUT_S = 10.0

_BOOK_SQL = "SELECT outcome, booking_id FROM baseline.book($1, $2, $3, $4, $5)"


def sql() -> str:
    return resources.files("bench").joinpath("baseline.sql").read_text(encoding="utf-8")


async def install(connection: Connection) -> None:
    """Creates the `baseline` schema, unless it exists (a fresh database in every run)."""
    exists = await connection.fetchval("SELECT to_regnamespace($1) IS NOT NULL", SCHEMA)
    if not exists:
        async with connection.transaction():
            await connection.execute(sql())


async def seed(
    connection: Connection,
    therapists: list[tuple[uuid.UUID, uuid.UUID]],
    duration_minutes: int,
    credit_cost: int,
    clients: list[uuid.UUID],
    credits: int,
) -> None:
    """Session types of (therapist, session type) pairs, and clients with `credits` each (a grant
    in the ledger, as the services have)."""
    async with connection.transaction():
        await connection.executemany(
            """INSERT INTO baseline.session_types (session_type_id, therapist_id, duration_minutes, credit_cost)
               VALUES ($1, $2, $3, $4)""",
            [(session_type, therapist, duration_minutes, credit_cost) for therapist, session_type in therapists],
        )
        await connection.executemany(
            "INSERT INTO baseline.credit_balances (owner_id, available, granted) VALUES ($1, $2, $2)",
            [(client, credits) for client in clients],
        )
        await connection.executemany(
            "INSERT INTO baseline.ledger (owner_id, kind, delta) VALUES ($1, 'grant', $2)",
            [(client, credits) for client in clients],
        )


async def book(
    connection: Connection,
    request_id: str,
    client_id: uuid.UUID,
    therapist_id: uuid.UUID,
    session_type_id: uuid.UUID,
    start: datetime,
) -> tuple[str, uuid.UUID | None]:
    """(outcome, booking_id): 'booked' or 'repeated' with the id, or a refusal reason."""
    row = await connection.fetchrow(
        _BOOK_SQL, request_id, client_id, therapist_id, session_type_id, start, timeout=CALL_TIMEOUT_S
    )
    assert row is not None
    return str(row["outcome"]), row["booking_id"]


_OVERLAPS_SQL = """
SELECT count(*) FROM baseline.sessions a JOIN baseline.sessions b
    ON a.therapist_id = b.therapist_id AND a.booking_id < b.booking_id AND a.blocked && b.blocked
 WHERE a.therapist_id = ANY($1::uuid[]) AND a.status = 'confirmed' AND b.status = 'confirmed'
"""
_BALANCES_SQL = """
WITH ledger AS (
    SELECT owner_id, sum(delta) FILTER (WHERE kind = 'grant') AS granted,
           -coalesce(sum(delta) FILTER (WHERE kind = 'spend'), 0) AS spent
      FROM baseline.ledger WHERE owner_id = ANY($1::uuid[]) GROUP BY owner_id
), booked AS (
    SELECT client_id AS owner_id, sum(credit_cost) AS spent
      FROM baseline.sessions WHERE client_id = ANY($1::uuid[]) AND status = 'confirmed' GROUP BY client_id
)
SELECT b.owner_id, b.available, b.spent, b.granted, l.granted AS ledger_granted, l.spent AS ledger_spent,
       coalesce(k.spent, 0) AS booked_spent
  FROM baseline.credit_balances b
  LEFT JOIN ledger l USING (owner_id)
  LEFT JOIN booked k USING (owner_id)
 WHERE b.owner_id = ANY($1::uuid[])
   AND (b.available < 0 OR b.spent < 0 OR b.available + b.spent <> b.granted
        OR b.granted IS DISTINCT FROM l.granted OR b.spent IS DISTINCT FROM l.spent
        OR b.spent <> coalesce(k.spent, 0))
"""


async def violations(
    connection: Connection,
    therapist_ids: list[uuid.UUID],
    client_ids: list[uuid.UUID],
    acknowledged: int,
    unanswered: int,
) -> list[str]:
    """The baseline's books, checked like the services' are: no overlap, balances that add up to
    the grants and to the ledger and to the sessions booked, a session per acknowledged booking
    (and at most one more per call that failed without an answer)."""
    found: list[str] = []
    overlaps = await connection.fetchval(_OVERLAPS_SQL, therapist_ids)
    if overlaps:
        found.append(f"{overlaps} pairs of confirmed sessions overlap")
    for row in await connection.fetch(_BALANCES_SQL, client_ids):
        found.append(
            f"client {row['owner_id']}: available {row['available']} spent {row['spent']} granted {row['granted']}, "
            f"ledger granted {row['ledger_granted']} spent {row['ledger_spent']}, sessions cost {row['booked_spent']}"
        )
    sessions = await connection.fetchval(
        "SELECT count(*) FROM baseline.sessions WHERE therapist_id = ANY($1::uuid[]) AND status = 'confirmed'",
        therapist_ids,
    )
    if not acknowledged <= sessions <= acknowledged + unanswered:
        found.append(
            f"{sessions} confirmed sessions, but {acknowledged} bookings were acknowledged"
            f" and {unanswered} calls failed without an answer"
        )
    return found
