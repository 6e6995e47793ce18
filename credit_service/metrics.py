"""The credit service's own metrics (docs/operations.md, "Metrics").

Reservations by state and the age of the oldest PENDING hold are read from the database by a
periodic worker (a scrape cannot wait for SQL): the pending ones exactly, through their partial
index; the other states (which grow with the table for ever) exactly while the table is small,
then estimated from PostgreSQL's own statistics (metrics_store.reservation_counts), so that the refresh
never reads a million rows. Every replica reads the same database, so every replica reports the
same values: aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import math

from prometheus_client import CollectorRegistry, Gauge

from credit_service import metrics_store
from credit_service.domain import ReservationStatus
from service_kit.config import ServerSettings
from service_kit.database import Database
from service_kit.server import Worker
from service_kit.workers import periodic

# Below this many reservations the other states are counted exactly (a scan of at most ~15 ms of
# database time); above, estimated (metrics_store.reservation_counts).
EXACT_COUNT_BELOW_ROWS = 100_000


class CreditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reservations = Gauge(
            "credit_reservations",
            "Reservations by state (pending, committed, released, refunded), read from the database.",
            ("state",),
            registry=registry,
        )
        self.oldest_pending_age_seconds = Gauge(
            "credit_oldest_pending_reservation_age_seconds",
            "Age of the oldest PENDING reservation (0 when none), read from the database.",
            registry=registry,
        )

    def refresher(self, database: Database, settings: ServerSettings) -> Worker:
        """A worker that reads the gauges from the database: the pending holds (through their
        partial index) every `metrics_refresh_interval_s`, the other states every
        `metrics_scan_interval_s`."""
        next_scan_at = -math.inf

        async def refresh() -> bool:
            nonlocal next_scan_at
            now = asyncio.get_running_loop().time()
            scan = now >= next_scan_at
            counts = None
            async with database.pool.acquire() as connection:
                pending, oldest_pending_age_s = await metrics_store.pending_reservation_stats(connection)
                if scan:
                    counts = await metrics_store.reservation_counts(
                        connection, pending=pending, exact_below_rows=EXACT_COUNT_BELOW_ROWS
                    )
            self.reservations.labels(ReservationStatus.PENDING.value).set(pending)
            self.oldest_pending_age_seconds.set(oldest_pending_age_s)
            if scan:
                next_scan_at = now + settings.metrics_scan_interval_s
            if counts is not None:  # None: a large table never analysed; the last values stand
                for status in ReservationStatus:
                    if status is not ReservationStatus.PENDING:
                        self.reservations.labels(status.value).set(counts.get(status.value, 0))
            return False

        return periodic("metrics_refresh", settings.metrics_refresh_interval_s, refresh)
