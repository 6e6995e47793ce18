"""The retention worker: what no invariant needs after its bound is purged, in bounded batches
(docs/operations.md, "Retention").

    request answers     a create's refusal or a reschedule's answer, past the request-id
                        retention: until then every repeat of the request gets that answer
                        (docs/design.md, "One answer per request"); after it, a repeat is
                        answered afresh. A booking's session is its answer and is never purged.
    delivered events    outbox rows delivered longer ago than their bound.
    dead letters        outbox rows dead longer ago than their (longer) bound, unless their
                        booking's payment is still unsettled: those wait for a person.
    previous version    its request ids (booking_attempts, reschedules) and decision log
                        (decisions), past the rolling-upgrade window, or past the request-id
                        retention if that is longer.

Each pass deletes one batch of each kind (at most BOOKING_RETENTION_BATCH_SIZE rows, one short
statement each, rows another transaction holds skipped); when a batch was full the next pass
starts at once, else after BOOKING_RETENTION_INTERVAL_S. Bounds are counted on the service's clock
from each row's own time, so every replica may run it: they take different rows, and a row one
has deleted is simply not there for the other. The credit side keeps its books (ledger entries,
reservations) for ever and has nothing else to purge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from booking_service.config import RetentionSettings
from booking_service.metrics import BookingMetrics
from booking_service.store import retention as store
from booking_service.store.retention import Purged
from service_kit.database import Database

log = structlog.get_logger()

# One batch's statement may take this long at most (a lock it waits for included): a purge gives
# way rather than hold anything up. At the default batch size a batch takes milliseconds.
STATEMENT_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class PassResult:
    """What one pass deleted, by kind, and whether any batch was full (more may be waiting)."""

    purged: Mapping[Purged, int]
    full: bool


class Retention:
    def __init__(
        self,
        database: Database,
        settings: RetentionSettings,
        metrics: BookingMetrics,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._database = database
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        request = timedelta(hours=settings.request_retention_hours)
        previous = max(timedelta(hours=settings.previous_version_retention_hours), request)
        self._bounds = {
            Purged.REQUEST_ANSWERS: request,
            Purged.DELIVERED_EVENTS: timedelta(hours=settings.delivered_retention_hours),
            Purged.DEAD_LETTERS: timedelta(hours=settings.dead_letter_retention_hours),
            Purged.PREVIOUS_ATTEMPTS: previous,
            Purged.PREVIOUS_DECISIONS: previous,
            Purged.PREVIOUS_RESCHEDULES: previous,
        }

    def cutoffs(self) -> dict[Purged, datetime]:
        """Per kind, the instant before which its rows go (rows of that instant or later stay)."""
        now = self._clock()
        return {purged: now - bound for purged, bound in self._bounds.items()}

    async def purge_pass(self) -> PassResult:
        """One batch of each kind; what it deleted."""
        started_s = time.perf_counter()
        purged: dict[Purged, int] = {}
        for kind, cutoff in self.cutoffs().items():
            batch_started_s = time.perf_counter()
            async with self._database.pool.acquire() as connection:
                deleted = await store.purge_batch(
                    connection, kind, cutoff, self._settings.batch_size, statement_timeout_ms=STATEMENT_TIMEOUT_MS
                )
            self._metrics.retention_batch(kind.value, deleted, time.perf_counter() - batch_started_s)
            purged[kind] = deleted
        result = PassResult(purged, full=any(n == self._settings.batch_size for n in purged.values()))
        if any(purged.values()):
            log.info(
                "retention_purged",
                **{kind.value: n for kind, n in purged.items() if n},
                more_waiting=result.full,
                duration_ms=round((time.perf_counter() - started_s) * 1000, 1),
            )
        return result

    async def purge_once(self) -> bool:
        """A pass for `service_kit.workers.periodic`: True when more may be waiting."""
        return (await self.purge_pass()).full
