"""`python -m bench --preload`: CreateBooking and the listings on empty tables, then on the tables of
a large marketplace (bench/preload.py), in one run, side by side (docs/performance.md, "Large
tables").

Both phases hold the same probe: one therapist and one client with `PROBE_DEPTH` bookings (their
sessions, holds, ledger entries), whose histories the listings page through to the end. The
"empty" phase holds only that (and what its own CreateBooking runs write); the "large" phase adds
the preload. Per phase:

- CreateBooking under load, for each of `--scenarios`, through the load generator as `make bench`
  runs it (rates, p50/p99, CPU per booking by process, and every correctness check);
- the listings, one call at a time from this process, timed at the client: ListBookings (the
  client's and the therapist's, every page), ListLedgerEntries and ListReservations (the client's,
  every page), ListReservations of every owner (the first pages, newest first), the reconciler's
  listing of stale pending holds, the outbox worker's lease of due events when none is due, and a
  pass of the retention worker (in the large phase it deletes what the preload wrote long ago).

The services run without their retention worker here (BOOKING_RETENTION_ENABLED=false), so that
the preload's old rows are not deleted under the CreateBooking runs; its cost is measured apart.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from bench import preload
from bench.loadgen import Tokens, percentiles_ms
from bench.stack import TOKEN_AUDIENCE, TOKEN_ISSUER, BenchStack
from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service.config import BookingSettings
from booking_service.metrics import BookingMetrics
from booking_service.retention import Retention
from booking_service.store import SCHEMA
from booking_service.store import outbox as outbox_store
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit import migrations
from service_kit.database import Database, DatabaseState

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

PHASES = ("empty", "large")
SERVICE_ENV = {"BOOKING_RETENTION_ENABLED": "false"}
PROBE_DEPTH = 1000
SMOKE_PROBE_DEPTH = 60
PAGE_SIZE = 50
# Walks through every page of each history, and calls of each single listing, per phase.
WALKS, SMOKE_WALKS = 5, 1
REPEATS, SMOKE_REPEATS = 50, 5
# Pages of the listing of every owner's reservations read per walk.
ALL_RESERVATIONS_PAGES = 20
RETENTION_PASSES = 5
CALL_TIMEOUT_S = 30.0
# The reconciler's own bounds (BOOKING_RECONCILE_AFTER_S, BOOKING_RECONCILE_BATCH_SIZE defaults).
RECONCILE_AFTER = timedelta(seconds=60)
RECONCILE_PAGE_SIZE = 100
# The outbox worker's own bounds (BOOKING_OUTBOX_BATCH_SIZE, BOOKING_OUTBOX_LEASE_S defaults).
OUTBOX_BATCH = 50
OUTBOX_LEASE_S = 30.0

RETENTION = "retention: one pass (6 batches)"
NAME_WIDTH = 54

Measure = Callable[[argparse.Namespace, BenchStack, str, str, int], Awaitable[dict[str, Any]]]
Listing = Callable[[str], Awaitable[str]]  # a page token in, the next one out ("" at the end)


def service_env(arguments: argparse.Namespace) -> dict[str, str]:
    """The services' settings for a --preload run: the caller's, over ours."""
    return {**SERVICE_ENV, **arguments.service_env}


async def run(arguments: argparse.Namespace, stack: BenchStack, measure: Measure) -> dict[str, Any]:
    sizes = preload.SMOKE if arguments.smoke else preload.LARGE
    depth = SMOKE_PROBE_DEPTH if arguments.smoke else PROBE_DEPTH
    progress = preload.print_progress if not arguments.quiet else _silent
    probe = preload.Sizes(therapists=1, clients=1, sessions=depth, refusals=0)
    await preload.load(stack.booking_url, stack.credit_url, probe, tag="probe", progress=progress)
    section: dict[str, Any] = {"sizes": asdict(sizes), "probe_depth": depth, "phases": {}}
    async with _Probe(stack, arguments.smoke) as prober:
        for phase in PHASES:
            if phase == "large":
                loaded = await preload.load(stack.booking_url, stack.credit_url, sizes, tag="bulk", progress=progress)
                section["load"] = {"rows": loaded.rows, "seconds": loaded.seconds}
            result: dict[str, Any] = {"create_booking": {}}
            for scenario, concurrency in arguments.runs:
                result["create_booking"][f"{scenario}@{concurrency}"] = await measure(
                    arguments, stack, "services", scenario, concurrency
                )
            progress(f"listings on the {phase} tables ...")
            result["listings"] = await prober.listings()
            section["phases"][phase] = result
    section["violations"] = [
        f"{phase}/{scenario}: {violation}"
        for phase, result in section["phases"].items()
        for scenario, measured in result["create_booking"].items()
        for violation in measured["violations"]
    ]
    return section


def _silent(line: str) -> None:
    del line


class _Probe:
    """The listings, timed one call at a time, against the probe's client and therapist."""

    def __init__(self, stack: BenchStack, smoke: bool) -> None:
        assert stack.booking is not None and stack.credit is not None and stack.token_key_file is not None
        self._stack = stack
        self._walks = SMOKE_WALKS if smoke else WALKS
        self._repeats = SMOKE_REPEATS if smoke else REPEATS
        self._metadata = Tokens(stack.token_key_file, TOKEN_ISSUER, TOKEN_AUDIENCE).admin
        self._booking_channel = grpc.aio.insecure_channel(stack.booking.address)
        self._credit_channel = grpc.aio.insecure_channel(stack.credit.address)
        self._booking: BookingServiceAsyncStub = booking_pb2_grpc.BookingServiceStub(self._booking_channel)
        self._credit: CreditServiceAsyncStub = credit_pb2_grpc.CreditServiceStub(self._credit_channel)
        self._connection: asyncpg.Connection | None = None
        self._retention_database: Database | None = None
        self._client_id = self._therapist_id = ""

    async def __aenter__(self) -> _Probe:
        self._connection = await asyncpg.connect(self._stack.booking_url)
        row = await self._connection.fetchrow(
            """SELECT s.therapist_id::text, s.client_id::text FROM booking.sessions s
                 JOIN booking.therapists t USING (therapist_id)
                WHERE t.request_id = 'preload-probe-therapist-1' LIMIT 1"""
        )
        assert row is not None, "the probe is not loaded"
        self._therapist_id, self._client_id = row[0], row[1]
        booking = self._stack.booking
        assert booking is not None
        settings = BookingSettings.from_environment(booking.env)  # the service's own settings
        self._retention_settings = settings.retention
        self._retention_database = Database(settings.server, SCHEMA, migrations.load("booking_service"))
        assert await self._retention_database.check() is DatabaseState.READY, self._retention_database.detail
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._booking_channel.close()
        await self._credit_channel.close()
        if self._connection is not None:
            await self._connection.close()
        if self._retention_database is not None:
            await self._retention_database.close()

    async def listings(self) -> dict[str, dict[str, Any]]:
        client, therapist = self._client_id, self._therapist_id
        results = {
            "ListBookings by client": await self._walk(self._bookings(client_id=client)),
            "ListBookings by therapist": await self._walk(self._bookings(therapist_id=therapist)),
            "ListLedgerEntries by owner": await self._walk(self._ledger(client)),
            "ListReservations by owner": await self._walk(self._reservations(owner_id=client)),
            "ListReservations, all owners": await self._walk(self._reservations(), pages=ALL_RESERVATIONS_PAGES),
            "reconciler: stale pending holds": await self._repeat(self._stale_pending),
            "outbox: lease, nothing due": await self._repeat(self._outbox_lease),
        }
        results[RETENTION] = await self._retention()
        return results

    def _bookings(self, **subject: str) -> Listing:
        async def page(token: str) -> str:
            request = booking_pb2.ListBookingsRequest(page_size=PAGE_SIZE, page_token=token, **subject)  # type: ignore[arg-type]
            response = await self._booking.ListBookings(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
            return response.next_page_token

        return page

    def _ledger(self, owner_id: str) -> Listing:
        async def page(token: str) -> str:
            request = credit_pb2.ListLedgerEntriesRequest(owner_id=owner_id, page_size=PAGE_SIZE, page_token=token)
            response = await self._credit.ListLedgerEntries(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
            return response.next_page_token

        return page

    def _reservations(self, **subject: str) -> Listing:
        async def page(token: str) -> str:
            request = credit_pb2.ListReservationsRequest(page_size=PAGE_SIZE, page_token=token, **subject)  # type: ignore[arg-type]
            response = await self._credit.ListReservations(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
            return response.next_page_token

        return page

    async def _stale_pending(self) -> None:
        """What the reconciler asks every pass (booking_service/credits.py, `stale_pending`)."""
        before = timestamp_pb2.Timestamp()
        before.FromDatetime(datetime.now(UTC) - RECONCILE_AFTER)
        request = credit_pb2.ListReservationsRequest(
            status=credit_pb2.RESERVATION_STATUS_PENDING, created_before=before, page_size=RECONCILE_PAGE_SIZE
        )
        await self._credit.ListReservations(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)

    async def _outbox_lease(self) -> None:
        """The statement every outbox pass of every replica starts with (nothing is due here)."""
        assert self._connection is not None
        await outbox_store.lease_due_events(self._connection, OUTBOX_BATCH, OUTBOX_LEASE_S)

    async def _walk(self, listing: Listing, pages: int | None = None) -> dict[str, Any]:
        """Every page (or the first `pages`) of a listing, `walks` times: each page's time, the
        first page's and the last page's."""
        every: list[float] = []
        first: list[float] = []
        last: list[float] = []
        count = 0
        for _ in range(self._walks):
            token, count = "", 0
            while True:
                started = time.perf_counter()
                token = await listing(token)
                elapsed = time.perf_counter() - started
                every.append(elapsed)
                if count == 0:
                    first.append(elapsed)
                count += 1
                if not token or count == pages:
                    last.append(elapsed)
                    break
        return {
            "pages": count,
            "page_ms": percentiles_ms(every),
            "first_page_ms": percentiles_ms(first),
            "last_page_ms": percentiles_ms(last),
        }

    async def _repeat(self, call: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        samples = []
        for _ in range(self._repeats):
            started = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - started)
        return {"calls": len(samples), "call_ms": percentiles_ms(samples)}

    async def _retention(self) -> dict[str, Any]:
        """Passes of the retention worker with its default bounds, on the service's real clock."""
        assert self._retention_database is not None
        retention = Retention(
            self._retention_database, self._retention_settings, BookingMetrics(), clock=lambda: datetime.now(UTC)
        )
        samples, deleted = [], 0
        for _ in range(RETENTION_PASSES):
            started = time.perf_counter()
            result = await retention.purge_pass()
            samples.append(time.perf_counter() - started)
            deleted += sum(result.purged.values())
        return {"calls": len(samples), "call_ms": percentiles_ms(samples), "rows_deleted": deleted}


def _p(result: dict[str, Any], key: str, quantile: str) -> float | None:
    value = (result.get(key) or {}).get(quantile)
    return None if value is None else float(value)


def table(section: dict[str, Any]) -> str:
    """CreateBooking and the listings, empty beside large (ms, at the client, unless named)."""
    empty, large = section["phases"]["empty"], section["phases"]["large"]
    sizes = section["sizes"]
    lines = [
        f"Large tables: {sizes['sessions']:,} bookings, {sizes['clients']:,} clients, {sizes['therapists']:,} "
        f"therapists (loaded in {section.get('load', {}).get('seconds', 0):.0f} s); the probe's histories: "
        f"{section['probe_depth']:,} bookings, pages of {PAGE_SIZE}",
        f"{'':<{NAME_WIDTH}} {'empty p50':>10} {'p99':>8} {'large p50':>10} {'p99':>8} {'large/empty':>11}",
    ]
    for scenario, before in empty["create_booking"].items():
        after = large["create_booking"][scenario]
        latency_before, latency_after = before["latency_booked_ms"], after["latency_booked_ms"]
        lines.append(
            _row(
                f"CreateBooking {scenario}: latency",
                latency_before["p50"],
                latency_before["p99"],
                latency_after["p50"],
                latency_after["p99"],
            )
        )
        for part in ("total", "postgres", "booking", "credit"):
            lines.append(
                _row(
                    f"CreateBooking {scenario}: CPU ms/booking, {part}",
                    before["cpu_ms_per_call"].get(part),
                    None,
                    after["cpu_ms_per_call"].get(part),
                    None,
                )
            )
        lines.append(
            _row(f"CreateBooking {scenario}: bookings/s", before["bookings_per_s"], None, after["bookings_per_s"], None)
        )
    for name, before in empty["listings"].items():
        after = large["listings"][name]
        if "page_ms" not in before:
            lines.append(_percentiles(name, before, after, "call_ms"))
            continue
        for label, key in (("first page", "first_page_ms"), ("last page", "last_page_ms"), ("any page", "page_ms")):
            pages = f"{before['pages']}" if before["pages"] == after["pages"] else f"{before['pages']}/{after['pages']}"
            lines.append(_percentiles(f"{name} ({pages} pages): {label}", before, after, key))
    deleted = large["listings"][RETENTION].get("rows_deleted", 0)
    lines.append(f"(the large phase's retention passes deleted {deleted:,} rows the preload wrote long ago)")
    return "\n".join(lines)


def _percentiles(name: str, before: dict[str, Any], after: dict[str, Any], key: str) -> str:
    return _row(name, _p(before, key, "p50"), _p(before, key, "p99"), _p(after, key, "p50"), _p(after, key, "p99"))


def _row(name: str, empty_p50: Any, empty_p99: Any, large_p50: Any, large_p99: Any) -> str:
    def cell(value: Any, width: int) -> str:
        return ("-" if value is None else f"{float(value):.2f}").rjust(width)

    ratio = None if not empty_p50 or large_p50 is None else float(large_p50) / float(empty_p50)
    return (
        f"{name:<{NAME_WIDTH}} {cell(empty_p50, 10)} {cell(empty_p99, 8)} {cell(large_p50, 10)} {cell(large_p99, 8)} "
        f"{'-' if ratio is None else f'{ratio:.2f}x':>11}"
    )
