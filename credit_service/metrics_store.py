"""The credit metrics' SQL: what the periodic metrics worker reads (metrics.py), each read
bounded whatever the size of the table. Tables live in the `credit` schema."""

from __future__ import annotations

from credit_service.domain import ReservationStatus
from service_kit.connection import Connection


async def pending_reservation_stats(connection: Connection) -> tuple[int, float]:
    """(count, age in seconds of the oldest) of PENDING reservations, for the metrics; the age
    by the database's clock, 0 when none is pending. Reads only pending rows (the partial index
    reservations_pending_expiry), which are few."""
    row = await connection.fetchrow(
        """SELECT count(*) AS pending, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
             FROM credit.reservations
            WHERE status = 'pending'"""
    )
    assert row is not None
    return int(row["pending"]), float(row["oldest_age_s"])


async def reservation_counts(connection: Connection, *, pending: int, exact_below_rows: int) -> dict[str, int] | None:
    """Reservations by status other than PENDING, for the metrics, without reading the table once
    it is large. Under `exact_below_rows` live rows, counted exactly (a scan of at most that many);
    above, estimated from the statistics PostgreSQL keeps anyway: the live rows (counted as rows
    are inserted) less the `pending` ones (counted exactly through their partial index), shared out
    by the frequencies of each status that the last ANALYZE (autovacuum's) measured. None when the
    table is large and has never been analysed (nothing to estimate from yet)."""
    stats = await connection.fetchrow(
        """SELECT greatest(s.n_live_tup, c.reltuples::bigint, 0) AS live_rows,
                  st.most_common_vals::text::text[] AS statuses, st.most_common_freqs AS frequencies
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
             LEFT JOIN pg_stats st ON st.schemaname = n.nspname AND st.tablename = c.relname AND st.attname = 'status'
            WHERE n.nspname = 'credit' AND c.relname = 'reservations'"""
    )
    assert stats is not None, "credit.reservations exists"
    if stats["live_rows"] < exact_below_rows:
        rows = await connection.fetch(
            "SELECT status, count(*) AS count FROM credit.reservations WHERE status <> 'pending' GROUP BY status"
        )
        return {row["status"]: int(row["count"]) for row in rows}
    frequencies = dict(zip(stats["statuses"] or (), stats["frequencies"] or (), strict=True))
    frequencies.pop(ReservationStatus.PENDING.value, None)
    total_frequency = sum(frequencies.values())
    if total_frequency <= 0:
        return None
    terminal_rows = max(0, stats["live_rows"] - pending)
    return {status: round(terminal_rows * frequency / total_frequency) for status, frequency in frequencies.items()}
