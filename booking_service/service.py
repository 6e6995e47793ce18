"""The booking service's use cases, put together: one object per concern, sharing the database,
the calendar's steps and the payments.

    catalogue   therapists, schedules, session types, free slots, the rules (catalogue.py)
    bookings    CreateBooking, top-down (booking_flow.py)
    series      CreateBookingSeries, the same steps for every occurrence at once (series.py)
    changes     cancel and reschedule (changes.py)
    outcomes    COMPLETED / NO_SHOW, and the sweeper of unmarked sessions (outcomes.py)
    reminders   reminder events before each session (reminders.py)
    feeds       the iCalendar feeds of therapists and clients (feeds.py)
    waitlist    waiting for a slot, offers with a short hold (waitlist.py)
    reconciler  stale holds (recovery.py)
    retention   what no invariant needs after its bound (retention.py)
    outbox      booking events' side effects, unsettled payments, dead letters (outbox.py)
    discovery   therapists listed and searched by availability (discovery.py)
    webhook_endpoints, webhook_delivery
                the webhook endpoints operators manage, and the sending to them
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from booking_service.booking_flow import BookingFlow, FlowParts
from booking_service.calendar import Calendar
from booking_service.catalogue import Catalogue
from booking_service.changes import Changes
from booking_service.config import BookingSettings
from booking_service.discovery import Discovery
from booking_service.feeds import Feeds
from booking_service.metrics import BookingMetrics
from booking_service.outbox import Outbox
from booking_service.outcomes import Outcomes
from booking_service.payments import Credits, Payments
from booking_service.recovery import Reconciler
from booking_service.reminders import Reminders
from booking_service.retention import Retention
from booking_service.series import SeriesFlow
from booking_service.side_effects import LogNotifier, Notifier, VideoProvider
from booking_service.waitlist import Waitlist
from booking_service.webhook_delivery import WebhookDelivery
from booking_service.webhook_endpoints import WebhookEndpoints
from service_kit.database import Database

log = structlog.get_logger()

# Exit code of a deliberate crash at a crash point (fault tests only), like SIGKILL's 128 + 9.
CRASH_EXIT_CODE = 137


def utc_now() -> datetime:
    return datetime.now(UTC)


class BookingService:
    def __init__(
        self,
        database: Database,
        credits: Credits,
        settings: BookingSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        metrics: BookingMetrics | None = None,
        notifier: Notifier | None = None,
        video: VideoProvider | None = None,
    ) -> None:
        metrics = metrics if metrics is not None else BookingMetrics()
        crash_points = settings.crash_points

        def crash_if(point: str) -> None:
            """A deliberate process death at a protocol step, for fault tests only."""
            if point in crash_points:
                log.warning("crash_point_reached", point=point)
                os._exit(CRASH_EXIT_CODE)

        self.calendar = Calendar(
            database, settings.batching, lock_timeout_ms=settings.lock_timeout_ms, observer=metrics.batch_finished
        )
        self.catalogue = Catalogue(database, clock, settings.context_cache_size)
        payments = Payments(database, credits, self.calendar, clock, crash_if)
        parts = FlowParts(
            self.catalogue, self.calendar, credits, payments, clock, crash_if, video_rooms=video is not None
        )
        self.bookings = BookingFlow(parts)
        self.series = SeriesFlow(parts)
        self.changes = Changes(
            database,
            self.catalogue,
            self.calendar,
            payments,
            clock=clock,
            free_cancellation=timedelta(hours=settings.free_cancellation_hours),
        )
        self.outcomes = Outcomes(
            database,
            payments,
            clock=clock,
            free_cancellation=timedelta(hours=settings.free_cancellation_hours),
            sweep_after=timedelta(seconds=settings.outcome_sweep_after_s),
            batch_size=settings.reconcile_batch_size,
        )
        self.reminders = Reminders(
            database, clock=clock, offsets_s=settings.reminder_offsets_s, batch_size=settings.outbox_batch_size
        )
        self.feeds = Feeds(
            database,
            clock=clock,
            past=timedelta(weeks=settings.calendar_past_weeks),
            future=timedelta(weeks=settings.calendar_future_weeks),
        )
        self.waitlist = Waitlist(
            database,
            self.catalogue,
            self.bookings,
            clock=clock,
            offer_hold=timedelta(seconds=settings.waitlist_offer_hold_s),
            lock_timeout_ms=settings.lock_timeout_ms,
            batch_size=settings.reconcile_batch_size,
        )
        self.reconciler = Reconciler(
            database,
            self.calendar,
            credits,
            payments,
            metrics,
            clock=clock,
            reconcile_after_s=settings.reconcile_after_s,
            batch_size=settings.reconcile_batch_size,
        )
        self.discovery = Discovery(database, clock)
        self.webhook_endpoints = WebhookEndpoints(database)
        self.webhook_delivery = WebhookDelivery(
            database, settings, lambda succeeded: metrics.webhook_attempt(succeeded=succeeded)
        )
        self.outbox = Outbox(
            database,
            payments,
            settings,
            notifier if notifier is not None else LogNotifier(),
            video,
            self.webhook_delivery,
        )
        self.retention = Retention(database, settings.retention, metrics, clock=clock)

    async def close(self) -> None:
        """Stops the batching (after the server stopped taking calls), writing what waits, and
        closes the webhooks' HTTP client."""
        await self.calendar.close()
        await self.webhook_delivery.close()
