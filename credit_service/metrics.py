"""The credit service's own metrics (docs/operations.md, "Metrics").

Reservations by state and the age of the oldest PENDING hold are read from the database by a
periodic worker (a scrape cannot wait for SQL): the pending ones often and cheaply, the other
states (which grow with the table) rarely. Every replica reads the same database, so every
replica reports the same values: aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import math

from prometheus_client import CollectorRegistry, Gauge

from credit_service import store
from credit_service.domain import ReservationStatus
from service_kit.config import ServerSettings
from service_kit.database import Database
from service_kit.server import Worker
from service_kit.workers import periodic


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
        partial index) every `metrics_refresh_interval_s`, the other states (a whole-table scan)
        every `metrics_scan_interval_s`."""
        next_scan_at = -math.inf

        async def refresh() -> bool:
            nonlocal next_scan_at
            now = asyncio.get_running_loop().time()
            async with database.pool.acquire() as connection:
                pending, oldest_pending_age_s = await store.pending_reservation_stats(connection)
                counts = await store.reservation_counts(connection) if now >= next_scan_at else None
            self.reservations.labels(ReservationStatus.PENDING.value).set(pending)
            self.oldest_pending_age_seconds.set(oldest_pending_age_s)
            if counts is not None:
                for status in ReservationStatus:
                    if status is not ReservationStatus.PENDING:
                        self.reservations.labels(status.value).set(counts.get(status.value, 0))
                next_scan_at = now + settings.metrics_scan_interval_s
            return False

        return periodic("metrics_refresh", settings.metrics_refresh_interval_s, refresh)
