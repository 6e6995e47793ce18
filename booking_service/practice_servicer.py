"""booking.v1.BookingService's RPCs of a practice (weekly series, outcomes, calendar feeds, the
waitlist): each checks its request, calls one use case and answers, as servicer.py does, which
mixes them in; and the checks of a booking's owner and of a cancellation, which both use."""

from __future__ import annotations

import re
import uuid
from typing import Any

import grpc
from google.api import httpbody_pb2

from booking.v1 import booking_pb2
from booking_service import domain
from booking_service.access import ACTORS_OF_ROLE, may_see
from booking_service.feeds import TOKEN_LENGTH, FeedOwner, feed_path
from booking_service.messages import (
    ACTOR_FROM_PROTO,
    OUTCOME_FROM_PROTO,
    REASON_FROM_PROTO,
    booking_message,
    series_message,
    start_of,
)
from booking_service.practice import MAX_SERIES_OCCURRENCES, SERIES_INTERVAL_WEEKS
from booking_service.requests import NewSeries
from booking_service.service import BookingService
from service_kit.auth import ADMIN, PermissionDenied, current_principal
from service_kit.validation import Checks

Context = grpc.aio.ServicerContext[Any, Any]
FEED_TOKEN = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")
CALENDAR_CONTENT_TYPE = "text/calendar; charset=utf-8"


def session_type_policy(checks: Checks, given: booking_pb2.SessionType) -> tuple[int | None, int, int]:
    """The refund policy fields of a session type to create, checked: the late-cancellation notice
    (None: the service's default), the late-cancellation and the no-show refund percentages."""
    field = "session_type."
    notice = None
    if given.HasField("late_cancellation_notice_minutes"):
        minutes = given.late_cancellation_notice_minutes
        notice = checks.integer(f"{field}late_cancellation_notice_minutes", minutes, minimum=0, maximum=43200)
    late = checks.integer(
        f"{field}late_cancellation_refund_percent", given.late_cancellation_refund_percent, minimum=0, maximum=100
    )
    no_show = checks.integer(f"{field}no_show_refund_percent", given.no_show_refund_percent, minimum=0, maximum=100)
    return notice, late, no_show


class PracticeRpcs:
    _service: BookingService

    async def CreateBookingSeries(
        self, request: booking_pb2.CreateBookingSeriesRequest, context: Context
    ) -> booking_pb2.CreateBookingSeriesResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        client_id = checks.uuid("client_id", request.client_id)
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        occurrences = checks.integer("occurrences", request.occurrences, minimum=2, maximum=MAX_SERIES_OCCURRENCES)
        interval_weeks = request.interval_weeks or SERIES_INTERVAL_WEEKS[0]
        if interval_weeks not in SERIES_INTERVAL_WEEKS:
            checks.fail("interval_weeks", "must be 1 (every week) or 2 (every other week)")
        start = start_of(checks, request)
        checks.done()
        caller = current_principal().subject
        series = await self._service.series.create(
            NewSeries(
                caller,
                request_id,
                client_id,
                therapist_id,
                session_type_id,
                start,
                occurrences,
                interval_weeks,
                request.skip_unavailable,
            )
        )
        return series_message(series)

    async def RecordSessionOutcome(
        self, request: booking_pb2.RecordSessionOutcomeRequest, context: Context
    ) -> booking_pb2.RecordSessionOutcomeResponse:
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        outcome = checks.enum("outcome", request.outcome, booking_pb2.SessionOutcome.Name)
        checks.done()
        await self._owned_booking(booking_id)
        actor = domain.Actor.ADMIN if current_principal().has(ADMIN) else domain.Actor.THERAPIST
        booking = await self._service.outcomes.record(booking_id, OUTCOME_FROM_PROTO[outcome], actor)
        return booking_pb2.RecordSessionOutcomeResponse(booking=booking_message(booking))

    async def RotateCalendarFeed(
        self, request: booking_pb2.RotateCalendarFeedRequest, context: Context
    ) -> booking_pb2.RotateCalendarFeedResponse:
        checks = Checks()
        which = request.WhichOneof("owner")
        if which is None:
            checks.fail("therapist_id", "give the feed's owner: therapist_id or client_id")
            checks.done()
        owner = FeedOwner.THERAPIST if which == "therapist_id" else FeedOwner.CLIENT
        owner_id = checks.uuid(str(which), getattr(request, str(which)))
        checks.done()
        token = await self._service.feeds.rotate(owner, owner_id)
        return booking_pb2.RotateCalendarFeedResponse(feed_token=token, feed_path=feed_path(token))

    async def GetCalendarFeed(
        self, request: booking_pb2.GetCalendarFeedRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        checks = Checks()
        if not FEED_TOKEN.fullmatch(request.feed_token):
            checks.fail("feed_token", f"must be the {TOKEN_LENGTH}-character token RotateCalendarFeed gave")
        checks.done()
        body = await self._service.feeds.render(request.feed_token)
        return httpbody_pb2.HttpBody(content_type=CALENDAR_CONTENT_TYPE, data=body)

    async def CancelFollowingBookings(
        self, request: booking_pb2.CancelFollowingBookingsRequest, context: Context
    ) -> booking_pb2.CancelFollowingBookingsResponse:
        booking_id, actor, reason = await self._cancellation(request)
        cancelled = await self._service.changes.cancel_following(booking_id, actor, reason)
        return booking_pb2.CancelFollowingBookingsResponse(bookings=[booking_message(b) for b in cancelled])

    async def _cancellation(
        self, request: booking_pb2.CancelBookingRequest | booking_pb2.CancelFollowingBookingsRequest
    ) -> tuple[uuid.UUID, domain.Actor, domain.CancelReason]:
        """A cancellation's fields, checked: a booking the caller may see, and an actor it may be."""
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        actor = checks.enum("actor", request.actor, booking_pb2.CancellationActor.Name)
        reason = checks.enum("reason", request.reason, booking_pb2.CancellationReason.Name)
        if actor and actor not in ACTOR_FROM_PROTO:
            checks.fail("actor", "must be CLIENT, THERAPIST or ADMIN")
        if reason and reason not in REASON_FROM_PROTO:
            checks.fail("reason", "is set by the system only")
        checks.done()
        await self._owned_booking(booking_id)
        principal = current_principal()
        if not any(actor in ACTORS_OF_ROLE.get(role, ()) for role in principal.roles):
            raise PermissionDenied("the caller may not cancel as this actor", metadata={"field": "actor"})
        return booking_id, ACTOR_FROM_PROTO[actor], REASON_FROM_PROTO[reason]

    async def _owned_booking(self, booking_id: uuid.UUID) -> domain.Booking:
        """The booking, if the caller may see it; another's is NOT_FOUND, exactly as a missing one.
        (Who a booking belongs to never changes, so this read cannot go stale before the change.)"""
        booking = await self._service.changes.booking(booking_id)
        if not may_see(current_principal(), booking):
            raise domain.BookingNotFound(booking_id)
        return booking
