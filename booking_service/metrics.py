"""The booking service's own metrics (docs/operations.md, "Metrics").

`booking_bookings_total{outcome}` counts CreateBooking calls by how they ended, read from the
server interceptor's canonical outcome (code and reason), so every path counts, validation and
timeouts included. `booking_reconciler_actions_total{action}` is counted by the reconciler. The
outbox gauges are read from the database by a periodic worker (a scrape cannot wait for SQL).
Every replica reads the same database, so every replica reports the same gauge values: aggregate
them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import math

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from booking.v1 import booking_pb2
from booking_service.store import outbox as store
from booking_service.store import webhook_deliveries as delivery_store
from service_kit.config import ServerSettings
from service_kit.database import Database
from service_kit.server import Worker
from service_kit.workers import periodic

SERVICE_NAME = booking_pb2.DESCRIPTOR.services_by_name["BookingService"].full_name
CREATE_BOOKING = "CreateBooking"

# Bounded: every code and reason falls into one of these.
OUTCOMES = (
    "confirmed",
    "slot_unavailable",
    "insufficient_credits",
    "outside_availability",
    "aborted",
    "unavailable",
    "invalid",
    "other",
)
RECONCILER_ACTIONS = ("committed", "released", "deferred")
WEBHOOK_RESULTS = ("succeeded", "failed")
# What the retention worker purges (booking_service/store/retention.py, `Purged`).
RETENTION_KINDS = (
    "request_answers",
    "delivered_events",
    "dead_letters",
    "previous_attempts",
    "previous_decisions",
    "previous_reschedules",
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 100)

_REFUSAL_OUTCOMES = {
    "SLOT_UNAVAILABLE": "slot_unavailable",
    "INSUFFICIENT_CREDITS": "insufficient_credits",
    # No account is no credits: the client cannot pay either way.
    "ACCOUNT_NOT_FOUND": "insufficient_credits",
    "OUTSIDE_AVAILABILITY": "outside_availability",
    "INSUFFICIENT_NOTICE": "outside_availability",
    "BEYOND_BOOKING_HORIZON": "outside_availability",
}
_CODE_OUTCOMES = {
    grpc.StatusCode.OK: "confirmed",
    grpc.StatusCode.ABORTED: "aborted",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable",
    # The caller's mistakes: a malformed request, an unknown therapist or session type, a
    # request_id reused for a different booking.
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid",
    grpc.StatusCode.ALREADY_EXISTS: "invalid",
}


def booking_outcome(code: grpc.StatusCode, reason: str | None) -> str:
    """The `outcome` label of one CreateBooking call."""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _REFUSAL_OUTCOMES.get(reason or "", "other")
    return _CODE_OUTCOMES.get(code, "other")  # INTERNAL, UNKNOWN, CANCELLED, ...


class BookingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Without a registry (unit tests, tools) the metrics count but nobody serves them.
        registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.bookings = Counter(
            "booking_bookings_total",
            "CreateBooking calls by outcome (a repeated request_id counts again).",
            ("outcome",),
            registry=registry,
        )
        self.reconciler_actions = Counter(
            "booking_reconciler_actions_total",
            "What the reconciler did with a stale PENDING hold: committed, released, or deferred.",
            ("action",),
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "booking_outbox_depth", "Outbox rows still pending (commits and refunds to deliver).", registry=registry
        )
        self.outbox_dead_letters = Gauge(
            "booking_outbox_dead_letters",
            "Outbox rows that failed BOOKING_OUTBOX_MAX_ATTEMPTS times and are no longer retried.",
            registry=registry,
        )
        self.webhook_attempts = Counter(
            "booking_webhook_attempts",
            "Requests to webhook endpoints, by whether the endpoint took them (a 2xx).",
            ("result",),
            registry=registry,
        )
        self.webhook_deliveries_waiting = Gauge(
            "booking_webhook_deliveries_waiting",
            "Webhook deliveries that failed at least once (or wait behind one) and are retried.",
            registry=registry,
        )
        self.webhook_dead_deliveries = Gauge(
            "booking_webhook_dead_deliveries",
            "Webhook deliveries given up (an endpoint's dead letters), every endpoint together.",
            registry=registry,
        )
        # How well concurrent bookings coalesce (service_kit/batching.py): items per batch, and
        # how long a batch takes, by step (claim_attempts, reserve_credits, decide_bookings, ...).
        self.batch_size = Histogram(
            "booking_batch_size",
            "Items per coalesced batch, by step.",
            ("step",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "booking_batch_duration_seconds", "Time one coalesced batch took, by step.", ("step",), registry=registry
        )
        self._batch_children: dict[str, tuple[Histogram, Histogram]] = {}
        # The retention worker (booking_service/retention.py): rows purged, and how long each
        # bounded batch took, by kind.
        self.retention_purged = Counter(
            "booking_retention_purged_total",
            "Rows the retention worker deleted past their bound, by kind.",
            ("kind",),
            registry=registry,
        )
        self.retention_batch_seconds = Histogram(
            "booking_retention_batch_duration_seconds",
            "Time one retention batch (one DELETE of at most BOOKING_RETENTION_BATCH_SIZE rows) took, by kind.",
            ("kind",),
            registry=registry,
        )
        # Every label value exists from the start, at zero, so that rate() sees the first one.
        self._outcomes = {outcome: self.bookings.labels(outcome) for outcome in OUTCOMES}
        for action in RECONCILER_ACTIONS:
            self.reconciler_actions.labels(action)
        for result in WEBHOOK_RESULTS:
            self.webhook_attempts.labels(result)
        for kind in RETENTION_KINDS:
            self.retention_purged.labels(kind)

    def rpc_finished(
        self, service: str, rpc: str, code: grpc.StatusCode, reason: str | None, duration_s: float
    ) -> None:
        """A server interceptor observer (service_kit.interceptor.RpcObserver)."""
        del duration_s
        if service == SERVICE_NAME and rpc == CREATE_BOOKING:
            self._outcomes[booking_outcome(code, reason)].inc()

    def batch_finished(self, step: str, size: int, duration_s: float) -> None:
        """A coalescer observer (service_kit.batching.BatchObserver): on every batch, so the
        labelled children are looked up once per step (labels() costs more than observe())."""
        children = self._batch_children.get(step)
        if children is None:
            children = self._batch_children[step] = (self.batch_size.labels(step), self.batch_seconds.labels(step))
        children[0].observe(size)
        children[1].observe(duration_s)

    def reconciler_action(self, action: str) -> None:
        assert action in RECONCILER_ACTIONS, action
        self.reconciler_actions.labels(action).inc()

    def webhook_attempt(self, *, succeeded: bool) -> None:
        self.webhook_attempts.labels("succeeded" if succeeded else "failed").inc()

    def retention_batch(self, kind: str, rows: int, duration_s: float) -> None:
        assert kind in RETENTION_KINDS, kind
        self.retention_purged.labels(kind).inc(rows)
        self.retention_batch_seconds.labels(kind).observe(duration_s)

    def refresher(self, database: Database, settings: ServerSettings) -> Worker:
        """A worker that reads the outbox gauges from the database: the depth (an index-only
        count) every `metrics_refresh_interval_s`, the dead letters (a whole-table scan) every
        `metrics_scan_interval_s`."""
        next_scan_at = -math.inf

        async def refresh() -> bool:
            nonlocal next_scan_at
            now = asyncio.get_running_loop().time()
            async with database.pool.acquire() as connection:
                pending = await store.outbox_pending_count(connection)
                waiting = await delivery_store.waiting_count(connection)
                scan = now >= next_scan_at
                dead = await store.outbox_dead_count(connection) if scan else None
                dead_deliveries = await delivery_store.dead_count(connection) if scan else None
            self.outbox_depth.set(pending)
            self.webhook_deliveries_waiting.set(waiting)
            if dead is not None and dead_deliveries is not None:
                self.outbox_dead_letters.set(dead)
                self.webhook_dead_deliveries.set(dead_deliveries)
                next_scan_at = now + settings.metrics_scan_interval_s
            return False

        return periodic("metrics_refresh", settings.metrics_refresh_interval_s, refresh)
