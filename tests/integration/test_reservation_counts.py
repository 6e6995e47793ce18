"""The credit metrics' reservation counts: exact while the table is small, estimated from
PostgreSQL's statistics once it is large, so that the refresh never reads every row
(credit_service.metrics_store.reservation_counts)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from credit_service import metrics_store
from service_kit import migrations
from tests.support.stack import fresh_database

# Statuses of the loaded rows: 3,000 committed, 1,500 released, 500 refunded, 40 pending.
LOADED = {"committed": 3000, "released": 1500, "refunded": 500, "pending": 40}
OWNER = "00000000-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
async def connection(postgres_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(await fresh_database(postgres_server_url, "counts_credit"))
    await migrations.migrate(connection, "credit", migrations.load("credit_service"))
    await connection.execute(f"INSERT INTO credit.accounts (owner_id) VALUES ('{OWNER}')")
    shapes = {
        "committed": "1, 0, NULL",
        "released": "0, 0, 'cancelled'",
        "refunded": "1, 1, NULL",
        "pending": "0, 0, NULL",
    }
    for status, count in LOADED.items():
        await connection.execute(
            f"""INSERT INTO credit.reservations
                       (reservation_id, owner_id, amount, committed_amount, refunded_amount, release_reason,
                        status, expires_at)
                SELECT gen_random_uuid(), '{OWNER}', 1, {shapes[status]}, '{status}', now() + interval '1 hour'
                  FROM generate_series(1, {count})"""
        )
    # This session's row counts reach the statistics before ANALYZE replaces them (else they
    # would be added a second time when the session next reports).
    await connection.execute("SELECT pg_stat_force_next_flush()")
    await connection.execute("SELECT 1")
    yield connection
    await connection.close()


async def test_a_small_table_is_counted_exactly(connection: asyncpg.Connection) -> None:
    counts = await metrics_store.reservation_counts(connection, pending=LOADED["pending"], exact_below_rows=1_000_000)

    assert counts == {status: n for status, n in LOADED.items() if status != "pending"}


async def test_a_large_table_is_estimated_from_its_statistics_without_reading_it(
    connection: asyncpg.Connection,
) -> None:
    await connection.execute("ANALYZE credit.reservations")
    await connection.execute("SELECT pg_stat_force_next_flush()")  # earlier scans are in the count
    scans_before = await connection.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'reservations' AND schemaname = 'credit'"
    )

    counts = await metrics_store.reservation_counts(connection, pending=LOADED["pending"], exact_below_rows=1000)

    assert counts is not None
    # ANALYZE saw every row of a table this small: the estimate is the count, up to rounding.
    for status in ("committed", "released", "refunded"):
        assert abs(counts[status] - LOADED[status]) <= 2, counts
    await connection.execute("SELECT pg_stat_force_next_flush()")
    scans_after = await connection.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'reservations' AND schemaname = 'credit'"
    )
    assert scans_after == scans_before, "the estimate read no row of the table"
