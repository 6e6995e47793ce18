"""Random or time-ordered ids, with or without WAL compression: what a booking's writes cost
PostgreSQL on large tables. `python -m bench.id_locality [--rows 300000] [--bookings 400]`.

After a checkpoint, the first change to each page writes a full-page image (FPI) of it to the WAL.
A random key (uuid4) lands on a random leaf page of its index, so on a large table nearly every
insert into every index keyed by one touches a page not yet written since the checkpoint: one FPI
(8 KiB) each. A time-ordered key (UUIDv7) lands on the rightmost leaf, which one FPI covers for
many inserts. `wal_compression` shrinks every FPI instead.

Starts an embedded PostgreSQL in a temporary folder, applies both services' migrations, loads
`--rows` sessions, one outbox row per booking, reservations and ledger entries (bulk SQL,
triggers off: a cost bench, not a consistent data set), then books `--bookings` sessions through
the services' own statements (look up, reserve, decide, commit, mark paid: booking.look_up,
credit.reserve_many, booking.decide, credit reservations' compare-and-set, the paid mark) right
after a CHECKPOINT, for each variant:

  ids        uuid4 everywhere (as now); v7 for the outbox event ids only (what the services can
             change on their own, the booking id being the caller's or derived from the request);
             v7 for the booking id too (the bound of what time-ordered ids could give)
  wal        wal_compression off, or pglz (the only method this embedded build has; lz4 and zstd
             cost less CPU where PostgreSQL is built with them)

and prints, per booking: PostgreSQL's CPU (all its processes), WAL bytes and FPIs. Variants are
interleaved over `--rounds` rounds so that growth and machine load fall on each alike.
docs/performance.md ("Ids and WAL on large tables") has the numbers and what was done with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.pg_costs import Meter
from booking_service.availability import Interval
from booking_service.decisions import Place, Placed, Refusal, Unanswered
from booking_service.domain import Booking, BookingStatus, PaymentStatus
from booking_service.requests import hold_reference
from booking_service.store import calendar as calendar_store
from credit_service import store as credit_store
from credit_service.domain import ReservationStatus
from devstack.postgres import EmbeddedPostgres, ensure_database
from service_kit import migrations
from service_kit.ids import uuid7

THERAPISTS = 2000
OWNERS = 20_000
CREDITS = 1_000_000_000
SESSION = timedelta(minutes=50)
FIRST_SLOT = datetime(2031, 1, 1, tzinfo=UTC)
ID_MODES = ("uuid4", "outbox-v7", "all-v7")
WAL_MODES = ("off", "pglz")


@dataclass
class Result:
    cpu_ms: float
    wal_bytes: float
    fpi: float


async def preload(booking: asyncpg.Connection, credit: asyncpg.Connection, rows: int) -> None:
    """Large tables in one go: generate_series, with triggers off (session_replication_role)."""
    await credit.execute(
        f"""SET session_replication_role = replica;
            INSERT INTO credit.accounts (owner_id, available, granted)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, {CREDITS}, {CREDITS}
              FROM generate_series(1, {OWNERS}) i;
            INSERT INTO credit.reservations
                   (reservation_id, owner_id, amount, committed_amount, status, reference, expires_at)
            SELECT gen_random_uuid(), ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % {OWNERS}), 12, '0'))::uuid,
                   1, 1, 'committed', 'booking:preload', now()
              FROM generate_series(1, {rows}) i;
            INSERT INTO credit.ledger_entries
                   (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id)
            SELECT r.owner_id, k.kind, k.available, k.held, k.spent, 0, r.reservation_id
              FROM credit.reservations r,
                   (VALUES ('reserve', -1, 1, 0), ('commit', 0, -1, 1)) AS k(kind, available, held, spent);
            SET session_replication_role = origin;"""
    )
    await credit.execute("VACUUM ANALYZE credit.accounts, credit.reservations, credit.ledger_entries")
    await booking.execute(
        f"""SET session_replication_role = replica;
            INSERT INTO booking.therapists (therapist_id, request_id, display_name, time_zone)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'preload-t' || i, 'T', 'UTC'
              FROM generate_series(1, {THERAPISTS}) i;
            INSERT INTO booking.session_types
                   (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost)
            SELECT therapist_id, therapist_id, 'preload-st-' || therapist_id, 'S', 50, 1 FROM booking.therapists;
            CREATE TEMPORARY TABLE preload AS
            SELECT gen_random_uuid() AS booking_id, i,
                   ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % {THERAPISTS}), 12, '0'))::uuid AS therapist_id,
                   timestamptz '2030-01-01' + make_interval(hours => i / {THERAPISTS}) AS starts_at
              FROM generate_series(1, {rows}) i;
            INSERT INTO booking.sessions
                   (booking_id, request_id, request_fingerprint, client_id, therapist_id, session_type_id, starts_at,
                    ends_at, blocked, time_zone, credit_cost, payment_status)
            SELECT booking_id, 'preload-' || booking_id, md5(booking_id::text),
                   ('00000000-0000-4000-9000-' || lpad(to_hex(1 + i % 200000), 12, '0'))::uuid,
                   therapist_id, therapist_id, starts_at, starts_at + interval '50 minutes',
                   tstzrange(starts_at, starts_at + interval '50 minutes'), 'UTC', 1, 'paid'
              FROM preload;
            INSERT INTO booking.outbox (event_id, kind, booking_id, status)
            SELECT gen_random_uuid(), 'booking_event', booking_id, 'delivered' FROM preload;
            SET session_replication_role = origin;"""
    )
    await booking.execute("VACUUM ANALYZE booking.therapists, booking.session_types, booking.sessions, booking.outbox")


def outbox_v7(sql: str) -> str:
    """A migration's SQL with the outbox's event ids made time-ordered (PostgreSQL 18's uuidv7)."""
    return sql.replace("gen_random_uuid()", "uuidv7()")


async def use_outbox_ids(booking: asyncpg.Connection, time_ordered: bool) -> None:
    """booking.decide as migration 0005 wrote it, or with uuidv7() for the event ids."""
    source = migrations.load("booking_service")
    decide = next(m for m in source if "one_answer_per_request" in m.name).sql
    start = decide.index("CREATE FUNCTION booking.decide(")
    end = decide.index("$$;", decide.index("LANGUAGE plpgsql AS $$", start)) + 3
    function = decide[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    await booking.execute(outbox_v7(function) if time_ordered else function)


class Booker:
    """Books one session at a time through the services' own statements."""

    def __init__(self, booking: asyncpg.Connection, credit: asyncpg.Connection) -> None:
        self.booking = booking
        self.credit = credit
        self.next_hour = 0
        self.random = random.Random(7)

    async def book(self, booking_id: uuid.UUID) -> None:
        therapist_id = uuid.UUID(f"00000000-0000-4000-8000-{self.random.randint(1, THERAPISTS):012x}")
        owner_id = uuid.UUID(f"00000000-0000-4000-8000-{self.random.randint(1, OWNERS):012x}")
        client_id = uuid.uuid4()
        starts_at = FIRST_SLOT + timedelta(hours=self.next_hour)
        self.next_hour += 1
        request_id = str(uuid.uuid4())
        version = await self.booking.fetchval(
            "SELECT schedule_version FROM booking.therapists WHERE therapist_id = $1", therapist_id
        )
        blocked = Interval(starts_at, starts_at + SESSION)
        (found,) = await calendar_store.look_up(
            self.booking, [(booking_id, therapist_id, (blocked.start, blocked.end))]
        )
        assert isinstance(found, Unanswered) and found.schedule_version == version, found
        reference = hold_reference(therapist_id, booking_id)
        reserved = await credit_store.reserve_many(
            self.credit, [credit_store.ReserveItem(booking_id, owner_id, 1, reference)], 3600
        )
        reservation = reserved[0].reservation
        assert reserved[0].outcome == "created" and reservation is not None, reserved
        now = datetime.now(UTC)
        draft = Booking(
            booking_id, request_id, client_id, therapist_id, therapist_id, starts_at, starts_at + SESSION, "UTC", 1,
            BookingStatus.CONFIRMED, PaymentStatus.COMMITTING, None, None, 0, None, 0, now, now,
        )  # fmt: skip
        taken = Refusal("SLOT_UNAVAILABLE", "taken")
        place = Place("bench", draft, blocked, version, {"type": "booking.confirmed"}, None, taken)
        (decision,) = await calendar_store.decide(self.booking, [place], wait=True, lock_timeout_ms=3000)
        assert isinstance(decision, Placed), decision
        moved = await credit_store.apply_transitions(
            self.credit, [(reservation.plan_commit(None), ReservationStatus.PENDING)]
        )
        assert booking_id in moved
        await calendar_store.mark_paid(self.booking, [booking_id])


async def wal_position(connection: asyncpg.Connection) -> tuple[int, int]:
    """(WAL bytes written so far, full-page images so far)."""
    row = await connection.fetchrow(
        "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS position, wal_fpi FROM pg_stat_wal"
    )
    assert row is not None
    return int(row["position"]), int(row["wal_fpi"])


async def measure(meter: Meter, booker: Booker, admin: asyncpg.Connection, ids: str, wal: str, bookings: int) -> Result:
    await admin.execute(f"ALTER SYSTEM SET wal_compression = '{wal}'")
    await admin.execute("SELECT pg_reload_conf()")
    await use_outbox_ids(booker.booking, time_ordered=ids != "uuid4")
    await admin.execute("CHECKPOINT")
    await admin.execute("SELECT pg_stat_force_next_flush()")
    wal_before, fpi_before = await wal_position(admin)
    cpu_before = meter.cpu_s()
    for _ in range(bookings):
        await booker.book(uuid7() if ids == "all-v7" else uuid.uuid4())
    cpu_s = meter.cpu_s() - cpu_before
    # The backends' WAL counters reach pg_stat_wal when they report: make them report now.
    for connection in (booker.booking, booker.credit):
        await connection.execute("SELECT pg_stat_force_next_flush()")
        await connection.execute("SELECT 1")
    await asyncio.sleep(0.2)
    wal_after, fpi_after = await wal_position(admin)
    return Result(cpu_s / bookings * 1000, (wal_after - wal_before) / bookings, (fpi_after - fpi_before) / bookings)


async def run(rows: int, bookings: int, rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="id-locality-"))
    server = EmbeddedPostgres(folder / "data")
    url = server.start()
    try:
        booking = await asyncpg.connect(await ensure_database(url, "locality_booking"))
        credit = await asyncpg.connect(await ensure_database(url, "locality_credit"))
        admin = await asyncpg.connect(url)
        await migrations.migrate(booking, "booking", migrations.load("booking_service"))
        await migrations.migrate(credit, "credit", migrations.load("credit_service"))
        started = time.perf_counter()
        await preload(booking, credit, rows)
        print(f"preloaded {rows} bookings' rows in {time.perf_counter() - started:.0f} s")
        meter = Meter(folder / "data")
        booker = Booker(booking, credit)
        await measure(meter, booker, admin, "uuid4", "off", bookings // 4)  # warm-up
        results: dict[tuple[str, str], list[Result]] = {}
        for _ in range(rounds):
            for ids in ID_MODES:
                for wal in WAL_MODES:
                    result = await measure(meter, booker, admin, ids, wal, bookings)
                    results.setdefault((ids, wal), []).append(result)
                    print(
                        f"{ids:10} wal_compression={wal:5} {result.cpu_ms:6.2f} ms CPU/booking "
                        f"{result.wal_bytes:8.0f} WAL bytes/booking {result.fpi:5.1f} FPI/booking",
                        flush=True,
                    )
        summary = {
            f"{ids} wal_compression={wal}": {
                "cpu_ms_per_booking": [round(r.cpu_ms, 3) for r in found],
                "wal_bytes_per_booking": [round(r.wal_bytes) for r in found],
                "fpi_per_booking": [round(r.fpi, 2) for r in found],
            }
            for (ids, wal), found in results.items()
        }
        print(json.dumps({"rows": rows, "bookings": bookings, "cpus": os.cpu_count(), "results": summary}, indent=1))
        for connection in (booking, credit, admin):
            await connection.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.id_locality", description=__doc__)
    parser.add_argument("--rows", type=int, default=300_000, help="rows preloaded per table (default 300000)")
    parser.add_argument("--bookings", type=int, default=400, help="bookings measured per variant (default 400)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants (default 2)")
    arguments = parser.parse_args()
    if not 1000 <= arguments.rows <= 5_000_000 or not 10 <= arguments.bookings <= 100_000:
        parser.error("--rows must be 1000..5000000 and --bookings 10..100000")
    asyncio.run(run(arguments.rows, arguments.bookings, arguments.rounds))


if __name__ == "__main__":
    main()
