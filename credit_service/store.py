"""SQL of the credit service, one function per statement. Tables live in the `credit` schema."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from credit_service.domain import (
    Balance,
    EntryKind,
    GrantKind,
    LedgerEntry,
    Movement,
    ReleaseReason,
    Reservation,
    ReservationStatus,
    Transition,
)
from service_kit.connection import Connection

SCHEMA = "credit"

_RESERVATION_COLUMNS = (
    "reservation_id, owner_id, amount, committed_amount, refunded_amount, status, release_reason,"
    " reference, created_at, updated_at, expires_at"
)
_ENTRY_COLUMNS = (
    "entry_id, owner_id, kind, available_delta, held_delta, spent_delta, granted_delta,"
    " reservation_id, request_id, grant_kind, note, created_at"
)


def _reservation(row: asyncpg.Record) -> Reservation:
    return Reservation(
        reservation_id=row["reservation_id"],
        owner_id=row["owner_id"],
        amount=row["amount"],
        committed_amount=row["committed_amount"],
        refunded_amount=row["refunded_amount"],
        status=ReservationStatus(row["status"]),
        release_reason=ReleaseReason(row["release_reason"]) if row["release_reason"] else None,
        reference=row["reference"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
    )


def _entry(row: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(
        entry_id=row["entry_id"],
        owner_id=row["owner_id"],
        kind=EntryKind(row["kind"]),
        available_delta=row["available_delta"],
        held_delta=row["held_delta"],
        spent_delta=row["spent_delta"],
        granted_delta=row["granted_delta"],
        reservation_id=row["reservation_id"],
        request_id=row["request_id"],
        grant_kind=GrantKind(row["grant_kind"]) if row["grant_kind"] else None,
        note=row["note"],
        created_at=row["created_at"],
    )


def _balance(row: asyncpg.Record) -> Balance:
    return Balance(
        owner_id=row["owner_id"],
        available=row["available"],
        held=row["held"],
        spent=row["spent"],
        granted=row["granted"],
        updated_at=row["updated_at"],
    )


async def fetch_balance(connection: Connection, owner_id: uuid.UUID) -> Balance | None:
    row = await connection.fetchrow(
        "SELECT owner_id, available, held, spent, granted, updated_at FROM credit.accounts WHERE owner_id = $1",
        owner_id,
    )
    return None if row is None else _balance(row)


async def ensure_account(connection: Connection, owner_id: uuid.UUID) -> None:
    await connection.execute(
        "INSERT INTO credit.accounts (owner_id) VALUES ($1) ON CONFLICT (owner_id) DO NOTHING", owner_id
    )


async def fetch_grant(connection: Connection, request_id: str) -> LedgerEntry | None:
    row = await connection.fetchrow(
        f"SELECT {_ENTRY_COLUMNS} FROM credit.ledger_entries WHERE kind = 'grant' AND request_id = $1",
        request_id,
    )
    return None if row is None else _entry(row)


async def insert_grant(
    connection: Connection,
    owner_id: uuid.UUID,
    amount: int,
    request_id: str,
    grant_kind: GrantKind,
    note: str,
) -> LedgerEntry:
    row = await connection.fetchrow(
        f"""INSERT INTO credit.ledger_entries
               (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta,
                request_id, grant_kind, note)
            VALUES ($1, 'grant', $2, 0, 0, $2, $3, $4, $5)
            RETURNING {_ENTRY_COLUMNS}""",
        owner_id,
        amount,
        request_id,
        grant_kind.value,
        note,
    )
    assert row is not None
    return _entry(row)


async def write_movements(
    connection: Connection,
    owner_id: uuid.UUID,
    reservation_id: uuid.UUID,
    movements: Sequence[Movement],
) -> None:
    """One statement for all entries of a transition; the ledger trigger updates the account."""
    deltas = [movement.deltas() for movement in movements]
    await connection.execute(
        """INSERT INTO credit.ledger_entries
               (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id)
           SELECT $1, m.kind, m.available, m.held, m.spent, m.granted, $2
             FROM unnest($3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
                  WITH ORDINALITY AS m(kind, available, held, spent, granted, position)
            ORDER BY m.position""",
        owner_id,
        reservation_id,
        [movement.kind.value for movement in movements],
        [d[0] for d in deltas],
        [d[1] for d in deltas],
        [d[2] for d in deltas],
        [d[3] for d in deltas],
    )


async def fetch_reservation(
    connection: Connection, reservation_id: uuid.UUID, *, for_update: bool = False
) -> Reservation | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await connection.fetchrow(
        f"SELECT {_RESERVATION_COLUMNS} FROM credit.reservations WHERE reservation_id = $1{lock}",
        reservation_id,
    )
    return None if row is None else _reservation(row)


@dataclass(frozen=True)
class ReserveItem:
    reservation_id: uuid.UUID
    owner_id: uuid.UUID
    amount: int
    reference: str


@dataclass(frozen=True)
class ReserveOutcome:
    """One item of credit.reserve_many (migration 0003): `outcome` is created, existing,
    no_account or insufficient; `reservation` is the one that stands under the item's id (None
    when nothing was held), `balance` the item owner's after it (None: no account)."""

    outcome: str
    reservation: Reservation | None
    balance: Balance | None


async def reserve_many(connection: Connection, items: Sequence[ReserveItem], ttl_s: float) -> list[ReserveOutcome]:
    """Holds for many reservations in one call and one transaction, outcomes in item order."""
    rows = await connection.fetch(
        "SELECT * FROM credit.reserve_many($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5)",
        [item.reservation_id for item in items],
        [item.owner_id for item in items],
        [item.amount for item in items],
        [item.reference for item in items],
        ttl_s,
    )
    assert len(rows) == len(items), (len(rows), len(items))
    outcomes: list[ReserveOutcome | None] = [None] * len(items)
    for row in rows:
        balance = None
        if row["balance_available"] is not None:
            balance = Balance(
                owner_id=items[row["item_position"] - 1].owner_id,
                available=row["balance_available"],
                held=row["balance_held"],
                spent=row["balance_spent"],
                granted=row["balance_granted"],
                updated_at=row["balance_updated_at"],
            )
        reservation = None if row["reservation_id"] is None else _reservation(row)
        outcomes[row["item_position"] - 1] = ReserveOutcome(row["outcome"], reservation, balance)
    assert all(outcome is not None for outcome in outcomes)
    return outcomes  # type: ignore[return-value]  # every position was filled, as asserted


async def fetch_reservations(
    connection: Connection, reservation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Reservation]:
    rows = await connection.fetch(
        f"SELECT {_RESERVATION_COLUMNS} FROM credit.reservations WHERE reservation_id = ANY($1::uuid[])",
        list(reservation_ids),
    )
    return {row["reservation_id"]: _reservation(row) for row in rows}


async def apply_transitions(
    connection: Connection, planned: Sequence[tuple[Transition, ReservationStatus]]
) -> dict[uuid.UUID, Reservation]:
    """Many planned transitions as one compare-and-set statement: each reservation moves to its
    new state, and its movements go to the ledger (whose trigger moves the balance), only if it is
    still in the status its plan was made from. Returns the reservations that moved; the others
    lost a race to another transition (plan again). The state machine only moves forward, so the
    status is all a plan depends on. Entries are written in the order of their owners, so
    concurrent statements lock accounts in one order."""
    moves = [transition.after for transition, _ in planned]
    movement_rows = [
        (transition.after.reservation_id, transition.after.owner_id, position, movement.kind.value, movement.deltas())
        for transition, _ in planned
        for position, movement in enumerate(transition.movements)
    ]
    rows = await connection.fetch(
        f"""WITH planned AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
                       AS p(reservation_id, status, committed_amount, refunded_amount, release_reason, planned_from)
            ), moved AS (
                UPDATE credit.reservations r
                   SET status = p.status, committed_amount = p.committed_amount,
                       refunded_amount = p.refunded_amount, release_reason = p.release_reason, updated_at = now()
                  FROM planned p
                 WHERE r.reservation_id = p.reservation_id AND r.status = p.planned_from
             RETURNING {", ".join(f"r.{column.strip()}" for column in _RESERVATION_COLUMNS.split(","))}
            ), entries AS (
                INSERT INTO credit.ledger_entries
                       (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id)
                SELECT moved.owner_id, m.kind, m.available, m.held, m.spent, m.granted, moved.reservation_id
                  FROM moved
                  JOIN unnest($7::uuid[], $8::uuid[], $9::integer[], $10::text[], $11::bigint[], $12::bigint[],
                              $13::bigint[], $14::bigint[])
                       AS m(reservation_id, owner_id, position, kind, available, held, spent, granted)
                    ON m.reservation_id = moved.reservation_id
                 ORDER BY m.owner_id, m.reservation_id, m.position
            )
            SELECT {_RESERVATION_COLUMNS} FROM moved""",
        [after.reservation_id for after in moves],
        [after.status.value for after in moves],
        [after.committed_amount for after in moves],
        [after.refunded_amount for after in moves],
        [after.release_reason.value if after.release_reason else None for after in moves],
        [planned_from.value for _, planned_from in planned],
        [row[0] for row in movement_rows],
        [row[1] for row in movement_rows],
        [row[2] for row in movement_rows],
        [row[3] for row in movement_rows],
        [row[4][0] for row in movement_rows],
        [row[4][1] for row in movement_rows],
        [row[4][2] for row in movement_rows],
        [row[4][3] for row in movement_rows],
    )
    return {row["reservation_id"]: _reservation(row) for row in rows}


async def update_reservation(connection: Connection, reservation: Reservation) -> Reservation:
    row = await connection.fetchrow(
        f"""UPDATE credit.reservations
               SET status = $2, committed_amount = $3, refunded_amount = $4, release_reason = $5,
                   updated_at = now()
             WHERE reservation_id = $1
         RETURNING {_RESERVATION_COLUMNS}""",
        reservation.reservation_id,
        reservation.status.value,
        reservation.committed_amount,
        reservation.refunded_amount,
        reservation.release_reason.value if reservation.release_reason else None,
    )
    assert row is not None, reservation.reservation_id
    return _reservation(row)


async def lock_expired_reservations(connection: Connection, limit: int) -> list[Reservation]:
    """Pending reservations past their expiry, locked; rows other sweepers hold are skipped."""
    rows = await connection.fetch(
        f"""SELECT {_RESERVATION_COLUMNS} FROM credit.reservations
             WHERE status = 'pending' AND expires_at <= now()
             ORDER BY expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return [_reservation(row) for row in rows]


# Open ends of a keyset cursor. A listing always compares with a bound (never `$n IS NULL OR ...`),
# so that in a generic plan, which PostgreSQL uses for a prepared statement after five runs, the
# cursor is still an index condition and a deep page reads only its own rows.
_LATEST = datetime.max.replace(tzinfo=UTC)
_NIL_ID = uuid.UUID(int=0)
MAX_ENTRY_ID = 2**63 - 1  # entry_id is a bigint: above every entry


def list_reservations_sql(*, by_owner: bool, pending: bool) -> str:
    """The listing's statement for one shape of filter: by owner (index reservations_by_owner) or
    not (reservations_by_creation); PENDING named as a literal, so that the planner may take the
    partial index of pending holds (few) whatever the parameters, else the status as a filter."""
    # Every parameter appears in every shape (one that does not has no type); the ones a shape
    # does not filter on stand in a condition on the parameter alone, a one-time check.
    owner = "owner_id = $6" if by_owner else "$6::uuid IS NULL"
    status = "status = 'pending' AND $5::text = 'pending'" if pending else "($5::text IS NULL OR status = $5)"
    return f"""SELECT {_RESERVATION_COLUMNS} FROM credit.reservations
             WHERE {owner}
               AND {status}
               AND (created_at, reservation_id) < ($1, $2::uuid)
               AND created_at < $3
             ORDER BY created_at DESC, reservation_id DESC
             LIMIT $4"""


async def list_reservations(
    connection: Connection,
    *,
    owner_id: uuid.UUID | None,
    status: ReservationStatus | None,
    created_before: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Reservation]:
    """Newest first; `after` is the (created_at, reservation_id) of the previous page's last row."""
    upper = created_before or _LATEST
    # (created_at, id) < (upper, nil) is created_at < upper: no id is below the nil UUID.
    cursor = after or (upper, _NIL_ID)
    sql = list_reservations_sql(by_owner=owner_id is not None, pending=status is ReservationStatus.PENDING)
    rows = await connection.fetch(sql, cursor[0], cursor[1], upper, limit, status.value if status else None, owner_id)
    return [_reservation(row) for row in rows]


LIST_ENTRIES_SQL = f"""SELECT {_ENTRY_COLUMNS} FROM credit.ledger_entries
             WHERE owner_id = $1 AND entry_id < $2
             ORDER BY entry_id DESC
             LIMIT $3"""


async def list_entries(
    connection: Connection, owner_id: uuid.UUID, *, before_entry_id: int | None, limit: int
) -> list[LedgerEntry]:
    """Newest first, below `before_entry_id` (the previous page's last entry)."""
    before = MAX_ENTRY_ID if before_entry_id is None else before_entry_id
    rows = await connection.fetch(LIST_ENTRIES_SQL, owner_id, before, limit)
    return [_entry(row) for row in rows]
