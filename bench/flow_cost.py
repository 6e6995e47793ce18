"""What the booking flow itself costs, without gRPC: `python -m bench.flow_cost [--bookings 2000]`.

Runs BookingFlow.create in this process, one booking at a time (or `--concurrency` at once), on a
real PostgreSQL (an embedded one in a temporary folder, or `--postgres-url`), with the scripted
credit service of the service test tier (tests/support/fake_credits.py) in place of the credit
service. Prints this process's CPU per booking (the booking service's own Python: the flow, the
coalescers, asyncpg, logging; no server call, no client call) and PostgreSQL's, so that the
flow's share of a booking is known apart from gRPC's (bench.grpc_floor) and the credit service's.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
import uvloop

from bench.pg_costs import Meter
from booking_service.config import BookingSettings
from booking_service.domain import SessionType, Therapist, WeeklyWindowMinutes
from booking_service.requests import NewBooking
from booking_service.service import BookingService
from booking_service.store import SCHEMA
from devstack.postgres import EmbeddedPostgres, database_url, ensure_database
from service_kit import migrations
from service_kit.auth import DISABLED_ACKNOWLEDGEMENT
from service_kit.database import Database, DatabaseState
from service_kit.logs import configure_logging
from tests.support.fake_credits import FakeCredits

THERAPISTS = 64
WARMUP_BOOKINGS = 200


async def measure(server_url: str, bookings: int, concurrency: int, meter: Meter | None) -> None:
    name = f"flow_cost_{uuid.uuid4().hex[:8]}"
    await ensure_database(server_url, name)
    env = {
        "BOOKING_DATABASE_URL": database_url(server_url, name),
        "BOOKING_VIDEO_PROVIDER": "none",
        # No RPC is served here: the flow is called directly.
        "AUTH_MODE": "disabled",
        "AUTH_DISABLED_ACKNOWLEDGEMENT": DISABLED_ACKNOWLEDGEMENT,
    }
    settings = BookingSettings.from_environment(env)
    database = Database(settings.server, SCHEMA, migrations.load("booking_service"))
    assert await database.check() is DatabaseState.READY, database.detail
    credits = FakeCredits()
    service = BookingService(database, credits, settings)
    now = datetime.now(UTC)
    therapists = []
    for _ in range(THERAPISTS):
        therapist = await service.catalogue.create_therapist(
            str(uuid.uuid4()), Therapist(uuid.uuid4(), "Bench", "UTC", 0, 0, 0, 730, now, now)
        )
        await service.catalogue.set_weekly_schedule(
            therapist.therapist_id, [WeeklyWindowMinutes(day, 0, 24 * 60) for day in range(1, 8)]
        )
        kind = await service.catalogue.create_session_type(
            # 10-minute sessions back to back on a 10-minute grid of starts, as the benchmark books.
            str(uuid.uuid4()),
            SessionType(uuid.uuid4(), therapist.therapist_id, "S", 10, 1, start_step_minutes=10),
        )
        therapists.append((therapist.therapist_id, kind.session_type_id))
    client = uuid.uuid4()
    credits.grant(client, 10**9)
    first = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    counter = iter(range(10**9))

    async def book() -> None:
        i = next(counter)
        therapist_id, type_id = therapists[i % THERAPISTS]
        start = first + timedelta(minutes=10 * (i // THERAPISTS))
        await service.bookings.create(NewBooking("bench", str(uuid.uuid4()), client, therapist_id, type_id, start))

    async def run(count: int) -> None:
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                await book()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await run(WARMUP_BOOKINGS)
    cpu_before, pg_before, wall_before = time.process_time(), meter.cpu_s() if meter else 0.0, time.perf_counter()
    await run(bookings)
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    pg = (meter.cpu_s() - pg_before) if meter else None
    print(
        f"{bookings} bookings, {concurrency} at a time: {bookings / wall:.0f}/s; CPU per booking: this process "
        f"{cpu * 1000 / bookings:.3f} ms, PostgreSQL {'-' if pg is None else f'{pg * 1000 / bookings:.3f} ms'}"
    )
    await service.close()
    await database.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flow_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--bookings", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--postgres-url", help="an existing server (PostgreSQL's CPU is then not measured)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    arguments = parser.parse_args()
    if not 1 <= arguments.bookings <= 1_000_000 or not 1 <= arguments.concurrency <= 256:
        parser.error("--bookings must be in [1, 1000000] and --concurrency in [1, 256]")
    configure_logging("json", arguments.log_level)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=Path("/dev/null").open("w")))  # noqa: SIM115
    if arguments.postgres_url:
        uvloop.run(measure(arguments.postgres_url, arguments.bookings, arguments.concurrency, None))
        return
    folder = Path(tempfile.mkdtemp(prefix="flow-cost-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        url = server.start()
        uvloop.run(measure(url, arguments.bookings, arguments.concurrency, Meter(folder / "data")))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
