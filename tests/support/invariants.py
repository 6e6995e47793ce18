"""The credit service's books, checked from outside through SQL.

`credit_invariant_violations` reads the credit schema directly and lists every broken invariant
in words (an empty list means the books are straight). It trusts nothing the service computes:
no row of the service's own bookkeeping is used to judge another without cross-checking it
against the ledger, so it also serves fault-injection tests (crashes, restarts, killed
connections) that must prove no credit was lost or doubled.

Everything is set-based: a handful of aggregate queries whatever the number of accounts, run in
one REPEATABLE READ snapshot so a concurrent writer cannot make consistent books look broken.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

import asyncpg

from service_kit.connection import Connection

__all__ = ["Connection", "credit_invariant_violations"]

# Per account: the stored buckets, the ledger's sums and what the reservations imply.
_ACCOUNT_SQL = """
WITH scope AS (
    SELECT owner_id, available, held, spent, granted
      FROM credit.accounts
     WHERE $1::uuid[] IS NULL OR owner_id = ANY($1::uuid[])
), ledger AS (
    SELECT e.owner_id,
           sum(e.available_delta) AS available,
           sum(e.held_delta) AS held,
           sum(e.spent_delta) AS spent,
           sum(e.granted_delta) AS granted
      FROM credit.ledger_entries e JOIN scope USING (owner_id)
     GROUP BY e.owner_id
), booked AS (
    SELECT r.owner_id,
           sum(r.amount) FILTER (WHERE r.status = 'pending') AS held,
           sum(r.committed_amount - r.refunded_amount) FILTER (WHERE r.status IN ('committed', 'refunded'))
               AS spent
      FROM credit.reservations r JOIN scope USING (owner_id)
     GROUP BY r.owner_id
)
SELECT s.owner_id, s.available, s.held, s.spent, s.granted,
       coalesce(l.available, 0) AS ledger_available,
       coalesce(l.held, 0) AS ledger_held,
       coalesce(l.spent, 0) AS ledger_spent,
       coalesce(l.granted, 0) AS ledger_granted,
       coalesce(b.held, 0) AS pending_held,
       coalesce(b.spent, 0) AS committed_spent
  FROM scope s
  LEFT JOIN ledger l USING (owner_id)
  LEFT JOIN booked b USING (owner_id)
 WHERE least(s.available, s.held, s.spent, s.granted) < 0
    OR s.available + s.held + s.spent <> s.granted
    OR (s.available, s.held, s.spent, s.granted) IS DISTINCT FROM
       (coalesce(l.available, 0), coalesce(l.held, 0), coalesce(l.spent, 0), coalesce(l.granted, 0))
    OR s.held <> coalesce(b.held, 0)
    OR s.spent <> coalesce(b.spent, 0)
 ORDER BY s.owner_id
"""

# Per reservation: its own ledger entries must match its state (one reserve of its amount, then
# at most one transition's worth of movements). Catches a doubled or missing transition even
# when another reservation of the same account happens to compensate in the account's totals.
_RESERVATION_SQL = """
SELECT r.reservation_id, r.owner_id, r.status, r.amount, r.committed_amount, r.refunded_amount,
       coalesce(sum(e.held_delta), 0) AS ledger_held,
       coalesce(sum(e.spent_delta), 0) AS ledger_spent,
       coalesce(sum(-e.available_delta) FILTER (WHERE e.kind = 'reserve'), 0) AS reserved,
       count(*) FILTER (WHERE e.kind = 'reserve') AS reserve_entries,
       count(*) FILTER (WHERE e.kind = 'commit') AS commit_entries,
       count(*) FILTER (WHERE e.kind = 'refund') AS refund_entries,
       count(*) FILTER (WHERE e.kind = 'release') AS release_entries
  FROM credit.reservations r
  LEFT JOIN credit.ledger_entries e ON e.reservation_id = r.reservation_id
 WHERE $1::uuid[] IS NULL OR r.owner_id = ANY($1::uuid[])
 GROUP BY r.reservation_id
HAVING coalesce(sum(e.held_delta), 0) <> CASE WHEN r.status = 'pending' THEN r.amount ELSE 0 END
    OR coalesce(sum(e.spent_delta), 0) <> r.committed_amount - r.refunded_amount
    OR coalesce(sum(-e.available_delta) FILTER (WHERE e.kind = 'reserve'), 0) <> r.amount
    OR count(*) FILTER (WHERE e.kind = 'reserve') <> 1
    OR count(*) FILTER (WHERE e.kind = 'commit') > 1
    OR count(*) FILTER (WHERE e.kind = 'refund') > 1
    OR count(*) FILTER (WHERE e.kind = 'release') > 1
 ORDER BY r.reservation_id
"""

_OVERDUE_SQL = """
SELECT reservation_id, owner_id, expires_at, extract(epoch FROM now() - expires_at)::float8 AS overdue_s
  FROM credit.reservations
 WHERE status = 'pending'
   AND expires_at < now() - make_interval(secs => $2::float8)
   AND ($1::uuid[] IS NULL OR owner_id = ANY($1::uuid[]))
 ORDER BY expires_at
"""


async def credit_invariant_violations(
    connection: Connection,
    owner_ids: Collection[uuid.UUID] | None = None,
    max_pending_overdue_s: float | None = None,
) -> list[str]:
    """Every broken invariant of the credit books, in words; empty when all hold.

    `owner_ids` limits the check to those accounts (None: every account). With
    `max_pending_overdue_s`, a pending hold more than that many seconds past its expiry is a
    violation too (the sweeper should have released it).
    """
    owners = None if owner_ids is None else list(owner_ids)
    if connection.is_in_transaction():
        return await _check(connection, owners, max_pending_overdue_s)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        return await _check(connection, owners, max_pending_overdue_s)


async def _check(
    connection: Connection, owners: list[uuid.UUID] | None, max_pending_overdue_s: float | None
) -> list[str]:
    violations: list[str] = []
    for row in await connection.fetch(_ACCOUNT_SQL, owners):
        violations.extend(_account_violations(row))
    for row in await connection.fetch(_RESERVATION_SQL, owners):
        violations.append(_reservation_violation(row))
    if max_pending_overdue_s is not None:
        for row in await connection.fetch(_OVERDUE_SQL, owners, max_pending_overdue_s):
            violations.append(
                f"reservation {row['reservation_id']} of account {row['owner_id']} is still pending "
                f"{row['overdue_s']:.1f} s after it expired at {row['expires_at'].isoformat()} "
                f"(allowed: {max_pending_overdue_s} s)"
            )
    return violations


def _account_violations(row: asyncpg.Record) -> list[str]:
    owner = row["owner_id"]
    buckets = {name: row[name] for name in ("available", "held", "spent", "granted")}
    found = [f"account {owner}: {name} is negative ({value})" for name, value in buckets.items() if value < 0]
    if buckets["available"] + buckets["held"] + buckets["spent"] != buckets["granted"]:
        found.append(
            f"account {owner}: available {buckets['available']} + held {buckets['held']} "
            f"+ spent {buckets['spent']} != granted {buckets['granted']}"
        )
    for name, value in buckets.items():
        ledger = row[f"ledger_{name}"]
        if value != ledger:
            found.append(f"account {owner}: {name} is {value} but its ledger entries sum to {ledger}")
    if buckets["held"] != row["pending_held"]:
        found.append(
            f"account {owner}: held is {buckets['held']} but its pending reservations hold {row['pending_held']}"
        )
    if buckets["spent"] != row["committed_spent"]:
        found.append(
            f"account {owner}: spent is {buckets['spent']} but its committed and refunded reservations "
            f"account for {row['committed_spent']}"
        )
    return found


def _reservation_violation(row: asyncpg.Record) -> str:
    return (
        f"reservation {row['reservation_id']} of account {row['owner_id']} ({row['status']}, amount "
        f"{row['amount']}, committed {row['committed_amount']}, refunded {row['refunded_amount']}) "
        f"disagrees with its ledger entries: held {row['ledger_held']}, spent {row['ledger_spent']}, "
        f"reserved {row['reserved']}; entries reserve={row['reserve_entries']} "
        f"commit={row['commit_entries']} release={row['release_entries']} refund={row['refund_entries']}"
    )
