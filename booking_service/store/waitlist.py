"""The SQL of the waitlist: entries, the offers of held slots, and their lifecycles."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
from asyncpg import Range

from booking_service.practice import Offer, WaitlistEntry, WaitlistStatus
from service_kit.connection import Connection

_ENTRY_COLUMNS = (
    "e.entry_id, e.request_id, e.fingerprint, e.client_id, e.therapist_id, e.session_type_id, "
    "lower(e.wanted) AS wanted_from, upper(e.wanted) AS wanted_until, e.status, e.booking_id, e.created_at"
)
_OFFER_COLUMNS = "o.offer_id, o.entry_id, o.therapist_id, o.starts_at, o.expires_at, o.status, o.booking_id"


def _entry(row: asyncpg.Record, offer: Offer | None = None) -> WaitlistEntry:
    return WaitlistEntry(
        entry_id=row["entry_id"],
        request_id=row["request_id"],
        fingerprint=row["fingerprint"],
        client_id=row["client_id"],
        therapist_id=row["therapist_id"],
        session_type_id=row["session_type_id"],
        wanted_from=row["wanted_from"],
        wanted_until=row["wanted_until"],
        status=WaitlistStatus(row["status"]),
        booking_id=row["booking_id"],
        created_at=row["created_at"],
        offer=offer,
    )


def _offer(row: asyncpg.Record) -> Offer:
    return Offer(
        row["offer_id"], row["entry_id"], row["therapist_id"], row["starts_at"], row["expires_at"], row["status"]
    )


async def insert_entry(connection: Connection, entry: WaitlistEntry) -> WaitlistEntry:
    """The entry as stored: this one, or the one its request id made before (the caller compares)."""
    await connection.execute(
        """INSERT INTO booking.waitlist_entries
               (entry_id, request_id, fingerprint, client_id, therapist_id, session_type_id, wanted)
           VALUES ($1, $2, $3, $4, $5, $6, tstzrange($7, $8, '[)'))
           ON CONFLICT (entry_id) DO NOTHING""",
        entry.entry_id,
        entry.request_id,
        entry.fingerprint,
        entry.client_id,
        entry.therapist_id,
        entry.session_type_id,
        entry.wanted_from,
        entry.wanted_until,
    )
    stored = await fetch_entry(connection, entry.entry_id)
    assert stored is not None
    return stored


async def fetch_entry(connection: Connection, entry_id: uuid.UUID) -> WaitlistEntry | None:
    """The entry with its open offer, if it has one."""
    row = await connection.fetchrow(
        f"SELECT {_ENTRY_COLUMNS} FROM booking.waitlist_entries e WHERE e.entry_id = $1", entry_id
    )
    if row is None:
        return None
    offer = await connection.fetchrow(
        f"SELECT {_OFFER_COLUMNS} FROM booking.slot_offers o WHERE o.entry_id = $1 AND o.status = 'open'", entry_id
    )
    return _entry(row, None if offer is None else _offer(offer))


async def leave(connection: Connection, entry_id: uuid.UUID) -> None:
    """The entry leaves the waitlist (if it still waits or has an offer), its open offer withdrawn."""
    await connection.execute(
        """WITH withdrawn AS (
               UPDATE booking.slot_offers SET status = 'withdrawn' WHERE entry_id = $1 AND status = 'open')
           UPDATE booking.waitlist_entries SET status = 'left', updated_at = now()
            WHERE entry_id = $1 AND status IN ('waiting', 'offered')""",
        entry_id,
    )


async def expire(connection: Connection, now: datetime) -> None:
    """Offers past their hold expire (their entries wait again); entries whose window passed expire."""
    await connection.execute(
        """WITH expired AS (
               UPDATE booking.slot_offers SET status = 'expired'
                WHERE status = 'open' AND expires_at <= $1
            RETURNING entry_id)
           UPDATE booking.waitlist_entries e SET status = 'waiting', updated_at = now()
             FROM expired WHERE e.entry_id = expired.entry_id AND e.status = 'offered'""",
        now,
    )
    await connection.execute(
        """UPDATE booking.waitlist_entries SET status = 'expired', updated_at = now()
            WHERE status = 'waiting' AND upper(wanted) <= $1""",
        now,
    )


async def waiting(connection: Connection, limit: int) -> list[WaitlistEntry]:
    """The waiting entries, those that joined first first."""
    found = await connection.fetch(
        f"""SELECT {_ENTRY_COLUMNS} FROM booking.waitlist_entries e
             WHERE e.status = 'waiting' ORDER BY e.created_at, e.entry_id LIMIT $1""",
        limit,
    )
    return [_entry(row) for row in found]


async def offered_before(connection: Connection, entry_id: uuid.UUID) -> set[datetime]:
    """The starts this entry was offered already (not offered again)."""
    found = await connection.fetch("SELECT starts_at FROM booking.slot_offers WHERE entry_id = $1", entry_id)
    return {row["starts_at"] for row in found}


async def offer_slot(  # the offer's own fields
    connection: Connection,
    offer_id: uuid.UUID,
    entry_id: uuid.UUID,
    therapist_id: uuid.UUID,
    starts_at: datetime,
    blocked: tuple[datetime, datetime],
    expires_at: datetime,
    *,
    lock_timeout_ms: int,
) -> bool:
    """booking.offer_slot: whether the offer was made (the range was free, the entry waiting)."""
    made = await connection.fetchval(
        "SELECT booking.offer_slot($1, $2, $3, $4, $5, $6, $7)",
        offer_id,
        entry_id,
        therapist_id,
        starts_at,
        Range(blocked[0], blocked[1]),
        expires_at,
        lock_timeout_ms,
    )
    return made is not None


async def fetch_offer(connection: Connection, offer_id: uuid.UUID) -> tuple[Offer, uuid.UUID | None] | None:
    """The offer and the booking it was accepted for, if any."""
    row = await connection.fetchrow(
        f"SELECT {_OFFER_COLUMNS} FROM booking.slot_offers o WHERE o.offer_id = $1", offer_id
    )
    return None if row is None else (_offer(row), row["booking_id"])


async def bind_offer(connection: Connection, offer_id: uuid.UUID, booking_id: uuid.UUID, now: datetime) -> bool:
    """The open, unexpired offer is accepted for this booking (whose request may place a session
    over the held slot); whether it was."""
    result = await connection.execute(
        """UPDATE booking.slot_offers SET booking_id = $2
            WHERE offer_id = $1 AND status = 'open' AND expires_at > $3""",
        offer_id,
        booking_id,
        now,
    )
    return bool(result == "UPDATE 1")


async def mark_taken(connection: Connection, offer_id: uuid.UUID, booking_id: uuid.UUID) -> None:
    await connection.execute(
        """WITH taken AS (
               UPDATE booking.slot_offers SET status = 'taken' WHERE offer_id = $1 AND booking_id = $2
            RETURNING entry_id)
           UPDATE booking.waitlist_entries e SET status = 'booked', booking_id = $2, updated_at = now()
             FROM taken WHERE e.entry_id = taken.entry_id""",
        offer_id,
        booking_id,
    )


async def open_offer_ranges(connection: Connection, therapist_id: uuid.UUID) -> list[tuple[datetime, datetime]]:
    found = await connection.fetch(
        "SELECT blocked FROM booking.slot_offers WHERE therapist_id = $1 AND status = 'open'", therapist_id
    )
    return [(row["blocked"].lower, row["blocked"].upper) for row in found]
