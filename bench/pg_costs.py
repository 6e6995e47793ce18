"""What PostgreSQL's CPU costs per statement here: `python -m bench.pg_costs [--items 2048]`.

Starts an embedded PostgreSQL in a temporary folder, applies both services' migrations and the
baseline, and runs each statement in a loop on one connection, reporting the CPU of all the
server's processes (backends, WAL writer, ...) per item. It isolates the database's share of a
booking from the services' (docs/performance.md, "Where the CPU of a booking goes now").
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.plan_drift import new_therapist, place_at
from bench.stack import child_pids, cpu_seconds
from booking_service.decisions import Place
from booking_service.store import calendar as calendar_store
from credit_service import store as credit_store
from credit_service.domain import ReservationStatus
from devstack.postgres import EmbeddedPostgres, ensure_database
from service_kit import migrations

OWNERS = 64
CREDITS = 1_000_000_000
BATCH_SIZES = (1, 4, 16, 64)


class Meter:
    """CPU seconds of every process of one PostgreSQL server (its postmaster's children)."""

    def __init__(self, data_dir: Path) -> None:
        self._postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])

    def cpu_s(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in child_pids(self._postmaster))


async def measure(meter: Meter, label: str, items: int, run: Callable[[], Awaitable[int]]) -> None:
    cpu_before, started = meter.cpu_s(), time.perf_counter()
    done = 0
    while done < items:
        done += await run()
    elapsed_s, cpu_s = time.perf_counter() - started, meter.cpu_s() - cpu_before
    print(f"{label:44} {cpu_s / done * 1000:7.3f} ms CPU/item {done / elapsed_s:8.0f} items/s")


async def funded_owners(connection: asyncpg.Connection) -> list[uuid.UUID]:
    owners = [uuid.uuid4() for _ in range(OWNERS)]
    for owner in owners:
        await connection.execute("INSERT INTO credit.accounts (owner_id) VALUES ($1)", owner)
        await connection.execute(
            """INSERT INTO credit.ledger_entries
                   (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, request_id, grant_kind)
               VALUES ($1, 'grant', $2, 0, 0, $2, $3, 'purchase')""",
            owner,
            CREDITS,
            str(uuid.uuid4()),
        )
    return owners


async def run(items: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="pg-costs-"))
    server = EmbeddedPostgres(folder / "data")
    url = server.start()
    try:
        credit = await asyncpg.connect(await ensure_database(url, "costs_credit"))
        await migrations.migrate(credit, "credit", migrations.load("credit_service"))
        baseline = await asyncpg.connect(await ensure_database(url, "costs_baseline"))
        await baseline.execute((Path(__file__).parent / "baseline.sql").read_text())
        meter = Meter(folder / "data")
        owners = await funded_owners(credit)

        async def select_one() -> int:
            await credit.fetchval("SELECT 1")
            return 1

        async def insert_committed() -> int:
            await credit.execute("INSERT INTO credit.accounts (owner_id) VALUES ($1)", uuid.uuid4())
            return 1

        await measure(meter, "SELECT 1", items, select_one)
        await measure(meter, "INSERT one account row, committed", items, insert_committed)
        for size in BATCH_SIZES:

            async def reserve_many(size: int = size) -> int:
                await credit.fetch(
                    "SELECT * FROM credit.reserve_many($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], 3600)",
                    [uuid.uuid4() for _ in range(size)],
                    [owners[i % OWNERS] for i in range(size)],
                    [1] * size,
                    ["costs"] * size,
                )
                return size

            await measure(meter, f"credit.reserve_many, {size} per call", items, reserve_many)

        therapist, session_type, client = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await baseline.execute("INSERT INTO baseline.session_types VALUES ($1, $2, 10, 1)", session_type, therapist)
        await baseline.execute("INSERT INTO baseline.credit_balances VALUES ($1, $2, 0, $2)", client, CREDITS)
        start = datetime(2031, 1, 1, tzinfo=UTC)
        slots = iter(range(10 * items))

        async def book() -> int:
            at = start + timedelta(minutes=10 * next(slots))
            await baseline.fetch(
                "SELECT * FROM baseline.book($1, $2, $3, $4, $5)",
                str(uuid.uuid4()),
                client,
                therapist,
                session_type,
                at,
            )
            return 1

        await measure(meter, "baseline.book (the baseline's whole booking)", items, book)
        await credit.close()
        await baseline.close()
        for plans in ("auto", "force_generic_plan"):
            await measure_protocol(meter, url, owners, items, plans)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def measure_protocol(meter: Meter, url: str, owners: list[uuid.UUID], items: int, plans: str) -> None:
    """A lone booking's statements, each alone and then all of them, through the services' own
    store functions, with the connections' plan_cache_mode set to `plans` (the services use
    force_generic_plan: service_kit/database.py)."""
    settings = {"plan_cache_mode": plans}
    booking = await asyncpg.connect(await ensure_database(url, f"costs_booking_{plans}"), server_settings=settings)
    credit = await asyncpg.connect(await ensure_database(url, "costs_credit"), server_settings=settings)
    await migrations.migrate(booking, "booking", migrations.load("booking_service"))
    therapist_id, type_id, version = await new_therapist(booking)
    start = datetime(2031, 1, 1, tzinfo=UTC)
    slots = iter(range(10 * items))

    def proposal() -> Place:
        return place_at(therapist_id, type_id, version, start + timedelta(minutes=10 * next(slots)))

    async def look_up() -> int:
        place = proposal()
        await calendar_store.look_up(
            booking, [(place.request_key, therapist_id, (place.blocked.start, place.blocked.end))]
        )
        return 1

    async def decide() -> int:
        await calendar_store.decide(booking, [proposal()], wait=True, lock_timeout_ms=1000)
        return 1

    async def booking_side() -> int:
        place = proposal()
        await calendar_store.look_up(
            booking, [(place.request_key, therapist_id, (place.blocked.start, place.blocked.end))]
        )
        await calendar_store.decide(booking, [place], wait=True, lock_timeout_ms=1000)
        await calendar_store.mark_paid(booking, [place.request_key])
        return 1

    async def credit_side() -> int:
        key = uuid.uuid4()
        reserved = await credit_store.reserve_many(credit, [credit_store.ReserveItem(key, owners[1], 1, "costs")], 3600)
        reservation = reserved[0].reservation
        assert reservation is not None
        current = await credit_store.fetch_reservations(credit, [key])
        await credit_store.apply_transitions(credit, [(current[key].plan_commit(None), ReservationStatus.PENDING)])
        return 1

    placed: list[uuid.UUID] = []

    async def decide_and_keep() -> int:
        place = proposal()
        await calendar_store.decide(booking, [place], wait=True, lock_timeout_ms=1000)
        placed.append(place.request_key)
        return 1

    async def mark_paid() -> int:
        await calendar_store.mark_paid(booking, [placed.pop()])
        return 1

    for label, run in (
        ("booking.look_up", look_up),
        ("booking.decide (place)", decide_and_keep),
        ("mark paid (one UPDATE)", mark_paid),
    ):
        await measure(meter, f"{label}, plans {plans}", items, run)
    await measure(meter, f"booking side of a booking, plans {plans}", items, booking_side)
    await measure(meter, f"credit side of a booking, plans {plans}", items, credit_side)
    await booking.close()
    await credit.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_costs", description=__doc__)
    parser.add_argument("--items", type=int, default=2048, help="items per statement (default 2048)")
    arguments = parser.parse_args()
    if not 64 <= arguments.items <= 100_000:
        parser.error("--items must be between 64 and 100000")
    asyncio.run(run(arguments.items))


if __name__ == "__main__":
    main()
