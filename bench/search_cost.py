"""What one SearchAvailability call costs at its bound: `python -m bench.search_cost`.

An embedded PostgreSQL and an in-process booking server; `--therapists` therapists (60: more
than one call examines) with four half-hour windows a day, too short for the 50-minute session
searched, so that no slot is ever found and every day of every schedule is expanded: the most a
call does. Prints the median and the slowest of `--calls` calls over 14 days (the widest range)
and over 2 days (docs/design.md, "Discovery, and catalogue changes"). Run it on a quiet machine
(hold /tmp/heavy.lock on a shared one).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from booking.v1 import booking_pb2
from booking_service.discovery import MAX_SEARCH_RANGE, MAX_THERAPISTS_EXAMINED
from devstack.postgres import EmbeddedPostgres
from tests.support.booking_server import booking_server
from tests.support.stack import fresh_database
from tests.support.world import every_day, future_hour, ts

SPECIALTY = "search-cost"
# Four windows a day, each shorter than the session: a schedule to expand, and never a slot.
WINDOWS = every_day(("08:00", "08:30"), ("10:00", "10:30"), ("12:00", "12:30"), ("14:00", "14:30"))


async def therapist(stub: Any) -> None:
    made = await stub.CreateTherapist(
        booking_pb2.CreateTherapistRequest(
            request_id=str(uuid.uuid4()),
            therapist=booking_pb2.Therapist(
                display_name="Cost", time_zone="Europe/Paris", booking_horizon_days=365, specialties=[SPECIALTY]
            ),
        )
    )
    therapist_id = made.therapist.therapist_id
    await stub.SetWeeklySchedule(booking_pb2.SetWeeklyScheduleRequest(therapist_id=therapist_id, windows=WINDOWS))
    await stub.CreateSessionType(
        booking_pb2.CreateSessionTypeRequest(
            therapist_id=therapist_id,
            request_id=str(uuid.uuid4()),
            session_type=booking_pb2.SessionType(name="Session", duration_minutes=50, credit_cost=5),
        )
    )


async def timed(stub: Any, request: booking_pb2.SearchAvailabilityRequest, calls: int) -> list[float]:
    await stub.SearchAvailability(request)  # warm: the first call prepares the statements
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        answer = await stub.SearchAvailability(request)
        times.append(time.perf_counter() - began)
    assert answer.therapists_examined == MAX_THERAPISTS_EXAMINED and not answer.results, answer
    return times


async def main(therapists: int, calls: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="search-cost-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        database = await fresh_database(server.start(), "search_cost")
        # No credit service: a search never calls it, and the reconciler is off.
        async with booking_server(database, "127.0.0.1:9", BOOKING_RECONCILER_ENABLED="false") as booking:
            for _ in range(therapists):
                await therapist(booking.stub)
            start = future_hour(2, 0)
            for days in (MAX_SEARCH_RANGE.days, 2):
                request = booking_pb2.SearchAvailabilityRequest(
                    duration_minutes=50,
                    start_time=ts(start),
                    end_time=ts(start + timedelta(days=days)),
                    specialties=[SPECIALTY],
                    page_size=10,
                )
                times_ms = [t * 1000 for t in await timed(booking.stub, request, calls)]
                print(
                    f"SearchAvailability, {MAX_THERAPISTS_EXAMINED} therapists examined over {days} days, no slot:"
                    f" median {statistics.median(times_ms):.1f} ms, slowest {max(times_ms):.1f} ms ({calls} calls)"
                )
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--therapists", type=int, default=MAX_THERAPISTS_EXAMINED + 10)
    parser.add_argument("--calls", type=int, default=30)
    arguments = parser.parse_args()
    assert arguments.therapists > MAX_THERAPISTS_EXAMINED, "more therapists than one call examines"
    asyncio.run(main(arguments.therapists, arguments.calls))
