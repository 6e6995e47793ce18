"""Does a connection's look-up get slower as it books? `python -m bench.plan_drift [--bookings 6000]`.

`--plan-cache-mode auto` runs it in PostgreSQL's default mode instead of the services' one.

The services' connections use generic plans (service_kit/database.py), made once per connection
and kept. This books `--bookings` sessions of one therapist through the booking's own look-up and
locked step on one connection whose plans were made on empty tables, and prints what a look-up
costs (wall milliseconds, the mean of 200, at one call at a time) every 1,000 bookings, and once
more after an ANALYZE of the tables it reads (which makes the connection plan again): for
today's look-up (booking migration 0015) and for migration 0005's, installed beside it under
another name (docs/performance.md, "A plan that aged"). Starts an embedded PostgreSQL in a
temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from booking_service.availability import Interval
from booking_service.decisions import Place, Refusal
from booking_service.domain import Booking, BookingStatus, PaymentStatus
from booking_service.store import calendar as calendar_store
from devstack.postgres import EmbeddedPostgres, ensure_database
from service_kit import migrations

STEP = 1000
TIMED = 200
MIGRATIONS = Path(__file__).parents[1] / "booking_service" / "migrations"
LOOK_UP_SQL = "SELECT * FROM {function}($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[])"


def joined_look_up() -> str:
    """Migration 0005's booking.look_up (a join), as booking.look_up_joined."""
    text = (MIGRATIONS / "0005_one_answer_per_request.sql").read_text()
    found = re.search(r"CREATE FUNCTION booking\.look_up\(.*?\n\$\$;", text, re.S)
    assert found is not None
    return found.group(0).replace("booking.look_up(", "booking.look_up_joined(", 1)


async def new_therapist(connection: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID, int]:
    """A therapist with a 10-minute session type: their ids and the schedule's version."""
    therapist_id, type_id = uuid.uuid4(), uuid.uuid4()
    await connection.execute(
        "INSERT INTO booking.therapists (therapist_id, request_id, display_name, time_zone)"
        " VALUES ($1, $2, 'T', 'UTC')",
        therapist_id,
        str(uuid.uuid4()),
    )
    await connection.execute(
        """INSERT INTO booking.session_types (session_type_id, therapist_id, request_id, name, duration_minutes,
                                              credit_cost) VALUES ($1, $2, $3, 'S', 10, 1)""",
        type_id,
        therapist_id,
        str(uuid.uuid4()),
    )
    version = await connection.fetchval(
        "SELECT schedule_version FROM booking.therapists WHERE therapist_id = $1", therapist_id
    )
    return therapist_id, type_id, version


def place_at(therapist_id: uuid.UUID, type_id: uuid.UUID, version: int, at: datetime) -> Place:
    """A new request's proposal to place a 10-minute session at `at`."""
    key = uuid.uuid4()
    booking = Booking(
        key, str(key), uuid.uuid4(), therapist_id, type_id, at, at + timedelta(minutes=10), "UTC", 1,
        BookingStatus.CONFIRMED, PaymentStatus.COMMITTING, None, None, 0, None, 0, at, at,
    )  # fmt: skip
    return Place(
        "f", booking, Interval(at, at + timedelta(minutes=10)), version, {"type": "t"}, None,
        Refusal("SLOT_UNAVAILABLE", "taken"),
    )  # fmt: skip


async def drift(url: str, function: str, bookings: int, plan_cache_mode: str) -> None:
    connection = await asyncpg.connect(url, server_settings={"plan_cache_mode": plan_cache_mode})
    therapist_id, type_id, version = await new_therapist(connection)
    start = datetime(2031, 1, 1, tzinfo=UTC) + timedelta(days=3650 * (function != "booking.look_up"))
    sql = LOOK_UP_SQL.format(function=function)

    async def look_up(at: datetime) -> None:
        await connection.fetch(sql, [uuid.uuid4()], [therapist_id], [at], [at + timedelta(minutes=10)])

    async def report(when: str) -> None:
        began = time.perf_counter()
        for _ in range(TIMED):
            await look_up(start - timedelta(days=1))
        per_call_ms = (time.perf_counter() - began) / TIMED * 1000
        print(f"{function:<24} {when:<21}: {per_call_ms:6.3f} ms per look-up", flush=True)

    await look_up(start)  # planned now, on empty tables (or on the other run's rows)
    for index in range(bookings):
        at = start + timedelta(minutes=10 * index)
        await look_up(at)
        place = place_at(therapist_id, type_id, version, at)
        await calendar_store.decide(connection, [place], wait=True, lock_timeout_ms=1000)
        if (index + 1) % STEP == 0:
            await report(f"after {index + 1:>6} bookings")
    await connection.execute("ANALYZE booking.sessions, booking.request_answers, booking.video_rooms")
    await report("after ANALYZE")
    await connection.close()


async def run(bookings: int, plan_cache_mode: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="plan-drift-"))
    server = EmbeddedPostgres(folder / "data")
    url = server.start()
    try:
        for function in ("booking.look_up", "booking.look_up_joined"):
            database = await ensure_database(url, f"drift_{function.split('.')[1]}")
            connection = await asyncpg.connect(database)
            await migrations.migrate(connection, "booking", migrations.load("booking_service"))
            await connection.execute(joined_look_up())
            await connection.close()
            await drift(database, function, bookings, plan_cache_mode)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_drift", description=__doc__.splitlines()[0])
    parser.add_argument("--bookings", type=int, default=6000, help="bookings per look-up (default 6000)")
    parser.add_argument(
        "--plan-cache-mode",
        default="force_generic_plan",
        choices=("force_generic_plan", "auto"),
        help="the connection's plan_cache_mode (default: the services' force_generic_plan)",
    )
    arguments = parser.parse_args()
    if not STEP <= arguments.bookings <= 100_000:
        parser.error(f"--bookings must be between {STEP} and 100000")
    asyncio.run(run(arguments.bookings, arguments.plan_cache_mode))


if __name__ == "__main__":
    main()
