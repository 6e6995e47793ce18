"""The benchmark's measuring tools still run (what they print is the figures of
docs/performance.md): a short run of each, the profile's parser of py-spy's raw stacks, and the
preload of large tables at small sizes (bench/preload.py), alone and as `python -m bench --preload`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from bench import preload
from bench.profile import top_frames
from booking_service.domain import BookingStatus, PaymentStatus
from booking_service.store import rows
from service_kit import migrations
from tests.support.stack import fresh_database

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9]+(\.[0-9]+)?"


def run_module(*arguments: str, timeout_s: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_grpc_floor_prints_the_cpu_of_a_call() -> None:
    output = run_module("bench.grpc_floor", "--duration-s", "1", "--concurrency", "4")
    match = re.search(rf"server ({NUMBER}) ms CPU/call, client ({NUMBER}) ms CPU/call", output)
    assert match is not None, output
    assert float(match.group(1)) > 0 and float(match.group(3)) > 0


def test_pg_costs_prints_every_statement() -> None:
    output = run_module("bench.pg_costs", "--items", "64")
    for label in (
        "SELECT 1",
        "INSERT one account row",
        "reserve_many, 1 per call",
        "reserve_many, 64",
        "baseline.book",
        "booking.look_up",
        "booking.decide (place)",
        "mark paid",
        "booking side of a booking",
        "credit side of a booking",
    ):
        assert re.search(rf"{re.escape(label)}.* ({NUMBER}) ms CPU/item", output), (label, output)


def test_flow_cost_books_on_its_grid_and_prints_the_cost() -> None:
    """The booking flow in-process (a scripted credit service): every booking must be placed, or
    the tool fails, as it did when the grid of starts came (a start off the grid is refused)."""
    output = run_module("bench.flow_cost", "--bookings", "40", "--concurrency", "4")
    match = re.search(rf"this process ({NUMBER}) ms, PostgreSQL ({NUMBER}) ms", output)
    assert match is not None, output
    assert float(match.group(1)) > 0 and float(match.group(3)) > 0


def test_profile_counts_each_frame_once_per_stack(tmp_path: Path) -> None:
    raw = tmp_path / "service.txt"
    raw.write_text("thread (1);main (a.py:1);f (a.py:2);f (a.py:2) 3\nthread (1);main (a.py:1);g (a.py:3) 1\n")
    frames = dict((frame, share) for share, frame in top_frames(raw))
    assert frames == {"main (a.py:1)": 1.0, "f (a.py:2)": 0.75, "g (a.py:3)": 0.25}


async def migrated_pair(server_url: str, prefix: str) -> tuple[str, str]:
    """Fresh booking and credit databases at the services' schema."""
    urls = []
    for schema, package in (("booking", "booking_service"), ("credit", "credit_service")):
        url = await fresh_database(server_url, f"{prefix}_{schema}")
        connection = await asyncpg.connect(url)
        try:
            await migrations.migrate(connection, schema, migrations.load(package))
        finally:
            await connection.close()
        urls.append(url)
    return urls[0], urls[1]


async def test_preload_loads_a_marketplace_whose_every_constraint_holds(postgres_server_url: str) -> None:
    booking_url, credit_url = await migrated_pair(postgres_server_url, "preload")
    lines: list[str] = []
    probe = preload.Sizes(therapists=1, clients=1, sessions=40, refusals=0)
    await preload.load(booking_url, credit_url, probe, tag="probe", progress=lines.append)
    loaded = await preload.load(booking_url, credit_url, preload.SMOKE, tag="bulk", progress=lines.append)

    sizes = preload.SMOKE
    assert loaded.rows["booking.sessions"] == loaded.rows["booking.outbox"] == sizes.sessions
    assert loaded.rows["credit.reservations"] == sizes.sessions
    assert loaded.rows["credit.ledger_entries"] == sizes.ledger_entries
    assert loaded.rows["credit.accounts"] == sizes.clients
    assert loaded.rows["booking.request_answers"] == sizes.refusals
    assert any("booking.sessions" in line for line in lines), "progress lines name each table"
    booking = await asyncpg.connect(booking_url)
    credit = await asyncpg.connect(credit_url)
    try:
        assert await preload.verify(booking, credit) == []
        totals = await booking.fetchrow("SELECT count(*), count(DISTINCT client_id) FROM booking.sessions")
        assert totals is not None and tuple(totals) == (sizes.sessions + 40, sizes.clients + 1)
        # The service reads what was loaded: every row parses into its domain types.
        parsed = [
            rows.booking(row) for row in await booking.fetch(f"SELECT {rows.BOOKING_COLUMNS} FROM booking.sessions")
        ]
        assert {b.status for b in parsed} == {BookingStatus.CONFIRMED, BookingStatus.CANCELLED}
        assert {b.payment_status for b in parsed} == {PaymentStatus.PAID, PaymentStatus.REFUNDED}
        # The checks can fail: an account whose balance drifts from its ledger is found.
        await credit.execute(
            """SET session_replication_role = replica;
               UPDATE credit.accounts SET available = available + 1, granted = granted + 1
                WHERE owner_id = (SELECT owner_id FROM credit.accounts ORDER BY owner_id LIMIT 1);
               SET session_replication_role = origin"""
        )
        assert any("ledger entries sum to" in problem for problem in await preload.verify(booking, credit))
    finally:
        await booking.close()
        await credit.close()


@pytest.mark.slow
def test_bench_with_preload_reports_both_phases(postgres_server_url: str, tmp_path: Path) -> None:
    output = run_module(
        "bench",
        "--smoke",
        "--preload",
        "--runs",
        "spread@1",
        "--quiet",
        "--out",
        str(tmp_path),
        "--postgres-url",
        postgres_server_url,
        timeout_s=240,
    )
    [result_file] = tmp_path.glob("*.json")
    report = json.loads(result_file.read_text())
    assert report["ok"] is True
    section = report["preload"]
    assert section["violations"] == []
    assert section["load"]["rows"]["booking.sessions"] == preload.SMOKE.sessions
    for phase in ("empty", "large"):
        measured = section["phases"][phase]["create_booking"]["spread@1"]
        assert measured["violations"] == [] and measured["acknowledged"] > 0, phase
        listings = section["phases"][phase]["listings"]
        walked = listings["ListLedgerEntries by owner"]
        assert walked["pages"] == -(-(2 * section["probe_depth"] + 1 + section["probe_depth"] // 10) // 50), walked
        assert walked["last_page_ms"]["p50"] > 0
        assert listings["reconciler: stale pending holds"]["call_ms"]["p50"] > 0
    assert section["phases"]["large"]["listings"]["retention: one pass (6 batches)"]["rows_deleted"] > 0
    for label in ("CreateBooking spread@1: latency", "ListBookings by client", "outbox: lease, nothing due"):
        assert label in output, (label, output)
