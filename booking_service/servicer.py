"""booking.v1.BookingService over gRPC: each handler checks its request, calls one use case and
answers; the one table of status codes. Translations live in messages.py (a schedule's in
schedule_messages.py), access rules in access.py; the discovery and webhook endpoint handlers in
discovery_servicer.py and webhook_servicer.py, the practice's in practice_servicer.py and
waitlist_servicer.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import grpc

from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service import availability, domain, holds
from booking_service.discovery_servicer import DiscoveryHandlers
from booking_service.domain import (
    MAX_OVERRIDE_WINDOWS,
    MAX_SLOT_RANGE,
    MAX_WEEKLY_WINDOWS,
    DateOverride,
    SessionType,
    Therapist,
    WeeklyWindowMinutes,
)
from booking_service.messages import (
    MAX_NAME_LENGTH,
    STATUS_FROM_PROTO,
    UPDATABLE_FIELDS,
    booking_message,
    check_therapist_zone,
    dead_letter_message,
    session_type_message,
    shown,
    slot_message,
    start_of,
    therapist_fields,
    therapist_message,
)
from booking_service.practice import START_STEPS_MINUTES
from booking_service.practice_servicer import PracticeRpcs, session_type_policy
from booking_service.requests import NewBooking, NewStart
from booking_service.schedule_messages import (
    in_request_terms,
    override_message,
    parse_date,
    parse_window,
    weekly_message,
)
from booking_service.service import BookingService
from booking_service.waitlist_servicer import WaitlistRpcs
from booking_service.webhook_servicer import WebhookHandlers
from service_kit import pagination
from service_kit.auth import current_principal
from service_kit.errors import DeadlineExceeded, DomainError, InvalidArgument, Unavailable
from service_kit.validation import Checks

SERVICE_NAME = booking_pb2.DESCRIPTOR.services_by_name["BookingService"].full_name
ERROR_DOMAIN = SERVICE_NAME
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# The one table from domain errors to status codes (subclasses inherit their parent's code).
ERROR_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotFound: grpc.StatusCode.NOT_FOUND,
    domain.RequestIdReused: grpc.StatusCode.ALREADY_EXISTS,
    domain.Refused: grpc.StatusCode.FAILED_PRECONDITION,
    domain.BookingAborted: grpc.StatusCode.ABORTED,
    domain.CalendarBusy: grpc.StatusCode.ABORTED,
    holds.CreditServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    holds.CreditServiceTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    holds.UnexpectedCreditAnswer: grpc.StatusCode.INTERNAL,
    holds.ReservationGone: grpc.StatusCode.INTERNAL,
    holds.HoldReused: grpc.StatusCode.INTERNAL,
    domain.SessionsOverlap: grpc.StatusCode.INTERNAL,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Context = grpc.aio.ServicerContext[Any, Any]


class BookingServicer(
    DiscoveryHandlers, WebhookHandlers, PracticeRpcs, WaitlistRpcs, booking_pb2_grpc.BookingServiceServicer
):
    def __init__(self, service: BookingService) -> None:
        self._service = service

    async def CreateTherapist(
        self, request: booking_pb2.CreateTherapistRequest, context: Context
    ) -> booking_pb2.CreateTherapistResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        values = therapist_fields(checks, "therapist", request.therapist, UPDATABLE_FIELDS)
        checks.done()
        check_therapist_zone(values)
        now = datetime.now(UTC)
        therapist = Therapist(therapist_id=uuid.uuid4(), created_at=now, updated_at=now, **values)
        created = await self._service.catalogue.create_therapist(request_id, therapist)
        return booking_pb2.CreateTherapistResponse(therapist=therapist_message(created))

    async def GetTherapist(
        self, request: booking_pb2.GetTherapistRequest, context: Context
    ) -> booking_pb2.GetTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        return booking_pb2.GetTherapistResponse(
            therapist=therapist_message(await self._service.catalogue.therapist(therapist_id))
        )

    async def UpdateTherapist(
        self, request: booking_pb2.UpdateTherapistRequest, context: Context
    ) -> booking_pb2.UpdateTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist.therapist_id", request.therapist.therapist_id)
        paths = tuple(request.update_mask.paths)
        unknown = [p for p in paths if p not in UPDATABLE_FIELDS]
        if not paths:
            checks.fail("update_mask", f"must name the fields to change: {', '.join(UPDATABLE_FIELDS)}")
        elif unknown:
            checks.fail(
                "update_mask",
                f"cannot change {shown(unknown)}; changeable: {', '.join(UPDATABLE_FIELDS)}",
            )
        values = therapist_fields(checks, "therapist", request.therapist, tuple(p for p in paths if p not in unknown))
        checks.done()
        check_therapist_zone(values)
        updated = await self._service.catalogue.update_therapist(therapist_id, values)
        return booking_pb2.UpdateTherapistResponse(therapist=therapist_message(updated))

    async def SetWeeklySchedule(
        self, request: booking_pb2.SetWeeklyScheduleRequest, context: Context
    ) -> booking_pb2.SetWeeklyScheduleResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        if len(request.windows) > MAX_WEEKLY_WINDOWS:
            checks.fail("windows", f"at most {MAX_WEEKLY_WINDOWS} windows")
        windows = []
        for index, window in enumerate(request.windows[:MAX_WEEKLY_WINDOWS]):
            field = f"windows[{index}]"
            weekday = checks.enum(f"{field}.day_of_week", window.day_of_week, booking_pb2.DayOfWeek.Name)
            start, end = parse_window(checks, f"{field}.window", window.window)
            windows.append(WeeklyWindowMinutes(weekday, start, end))
        checks.done()
        try:
            stored = await self._service.catalogue.set_weekly_schedule(therapist_id, windows)
        except InvalidArgument as error:
            raise in_request_terms(error) from None
        return booking_pb2.SetWeeklyScheduleResponse(windows=[weekly_message(w) for w in stored])

    async def SetDateOverride(
        self, request: booking_pb2.SetDateOverrideRequest, context: Context
    ) -> booking_pb2.SetDateOverrideResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        local_date = parse_date(checks, "date", request.date)
        if len(request.windows) > MAX_OVERRIDE_WINDOWS:
            checks.fail("windows", f"at most {MAX_OVERRIDE_WINDOWS} windows")
        windows = tuple(
            parse_window(checks, f"windows[{i}]", w) for i, w in enumerate(request.windows[:MAX_OVERRIDE_WINDOWS])
        )
        checks.done()
        try:
            stored = await self._service.catalogue.set_date_override(therapist_id, DateOverride(local_date, windows))
        except InvalidArgument as error:
            raise in_request_terms(error) from None
        return booking_pb2.SetDateOverrideResponse(date_override=override_message(stored))

    async def DeleteDateOverride(
        self, request: booking_pb2.DeleteDateOverrideRequest, context: Context
    ) -> booking_pb2.DeleteDateOverrideResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        local_date = parse_date(checks, "date", request.date)
        checks.done()
        await self._service.catalogue.delete_date_override(therapist_id, local_date)
        return booking_pb2.DeleteDateOverrideResponse()

    async def GetSchedule(
        self, request: booking_pb2.GetScheduleRequest, context: Context
    ) -> booking_pb2.GetScheduleResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        therapist, weekly, overrides = await self._service.catalogue.schedule(therapist_id)
        return booking_pb2.GetScheduleResponse(
            time_zone=therapist.time_zone,
            weekly_windows=[weekly_message(w) for w in weekly],
            date_overrides=[override_message(o) for o in overrides],
        )

    async def CreateSessionType(
        self, request: booking_pb2.CreateSessionTypeRequest, context: Context
    ) -> booking_pb2.CreateSessionTypeResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        request_id = checks.request_id("request_id", request.request_id)
        given = request.session_type
        name = checks.text("session_type.name", given.name, max_length=MAX_NAME_LENGTH, required=True)
        duration = checks.integer("session_type.duration_minutes", given.duration_minutes, minimum=5, maximum=480)
        cost = checks.integer("session_type.credit_cost", given.credit_cost, minimum=1, maximum=10_000)
        notice, late_refund, no_show_refund = session_type_policy(checks, given)
        step = given.start_step_minutes or START_STEPS_MINUTES[2]
        if step not in START_STEPS_MINUTES:
            checks.fail("session_type.start_step_minutes", f"must be one of {', '.join(map(str, START_STEPS_MINUTES))}")
        checks.done()
        created = await self._service.catalogue.create_session_type(
            request_id,
            SessionType(
                uuid.uuid4(),
                therapist_id,
                name,
                duration,
                cost,
                late_cancel_notice_minutes=notice,
                late_cancel_refund_percent=late_refund,
                no_show_refund_percent=no_show_refund,
                start_step_minutes=step,
            ),
        )
        return booking_pb2.CreateSessionTypeResponse(session_type=session_type_message(created))

    async def ListSessionTypes(
        self, request: booking_pb2.ListSessionTypesRequest, context: Context
    ) -> booking_pb2.ListSessionTypesResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        found = await self._service.catalogue.session_types(therapist_id, include_retired=request.include_retired)
        return booking_pb2.ListSessionTypesResponse(session_types=[session_type_message(s) for s in found])

    async def ListAvailableSlots(
        self, request: booking_pb2.ListAvailableSlotsRequest, context: Context
    ) -> booking_pb2.ListAvailableSlotsResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        start = checks.instant("start_time", request.start_time)
        end = checks.instant("end_time", request.end_time)
        if not checks.violations and not start < end <= start + MAX_SLOT_RANGE:
            checks.fail("end_time", f"must be after start_time and at most {MAX_SLOT_RANGE.days} days after it")
        display_zone = request.time_zone  # checked below as an IANA name, exactly as given
        checks.done()
        if display_zone:
            try:
                availability.zone(display_zone)
            except availability.AvailabilityError as error:
                raise domain.domain_error(error) from None
        therapist, slots = await self._service.catalogue.available_slots(therapist_id, session_type_id, start, end)
        zone_name = display_zone or therapist.time_zone
        return booking_pb2.ListAvailableSlotsResponse(
            time_zone=zone_name, slots=[slot_message(slot, zone_name) for slot in slots]
        )

    async def CreateBooking(
        self, request: booking_pb2.CreateBookingRequest, context: Context
    ) -> booking_pb2.CreateBookingResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        client_id = checks.uuid("client_id", request.client_id)
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        start = start_of(checks, request)
        checks.done()
        caller = current_principal().subject
        booking = await self._service.bookings.create(
            NewBooking(caller, request_id, client_id, therapist_id, session_type_id, start)
        )
        return booking_pb2.CreateBookingResponse(booking=booking_message(booking))

    async def GetBooking(
        self, request: booking_pb2.GetBookingRequest, context: Context
    ) -> booking_pb2.GetBookingResponse:
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        checks.done()
        return booking_pb2.GetBookingResponse(booking=booking_message(await self._owned_booking(booking_id)))

    async def ListBookings(
        self, request: booking_pb2.ListBookingsRequest, context: Context
    ) -> booking_pb2.ListBookingsResponse:
        checks = Checks()
        client_id = checks.optional_uuid("client_id", request.client_id)
        therapist_id = checks.optional_uuid("therapist_id", request.therapist_id)
        if bool(request.client_id) == bool(request.therapist_id):
            checks.fail("client_id", "give exactly one of client_id and therapist_id")
        start_after = checks.instant("start_after", request.start_after) if request.HasField("start_after") else None
        start_before = (
            checks.instant("start_before", request.start_before) if request.HasField("start_before") else None
        )
        status = checks.enum("status", request.status, booking_pb2.BookingStatus.Name, allow_unspecified=True)
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        filters = (client_id, therapist_id, start_after, start_before, status)
        after = pagination.decode_instant_and_id(request.page_token, filters)
        page = await self._service.changes.list_bookings(
            client_id=client_id,
            therapist_id=therapist_id,
            start_after=start_after,
            start_before=start_before,
            status=STATUS_FROM_PROTO.get(status),
            after=after,
            page_size=page_size,
        )
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.starts_at, last.booking_id, filters)
        return booking_pb2.ListBookingsResponse(
            bookings=[booking_message(b) for b in page.items], next_page_token=next_token
        )

    async def CancelBooking(
        self, request: booking_pb2.CancelBookingRequest, context: Context
    ) -> booking_pb2.CancelBookingResponse:
        booking_id, actor, reason = await self._cancellation(request)
        booking = await self._service.changes.cancel(booking_id, actor, reason)
        return booking_pb2.CancelBookingResponse(booking=booking_message(booking))

    async def RescheduleBooking(
        self, request: booking_pb2.RescheduleBookingRequest, context: Context
    ) -> booking_pb2.RescheduleBookingResponse:
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        request_id = checks.request_id("request_id", request.request_id)
        start = start_of(checks, request)
        checks.done()
        await self._owned_booking(booking_id)
        caller = current_principal().subject
        booking = await self._service.changes.reschedule(NewStart(caller, request_id, booking_id, start))
        return booking_pb2.RescheduleBookingResponse(booking=booking_message(booking))

    async def ListDeadLetters(
        self, request: booking_pb2.ListDeadLettersRequest, context: Context
    ) -> booking_pb2.ListDeadLettersResponse:
        checks = Checks()
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        page = await self._service.outbox.dead_letters(
            pagination.decode_instant_and_id(request.page_token, ()), page_size
        )
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.updated_at, last.event_id, ())
        return booking_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_message(letter) for letter in page.items], next_page_token=next_token
        )

    async def RetryDeadLetter(
        self, request: booking_pb2.RetryDeadLetterRequest, context: Context
    ) -> booking_pb2.RetryDeadLetterResponse:
        checks = Checks()
        event_id = checks.uuid("event_id", request.event_id)
        checks.done()
        letter = await self._service.outbox.retry_dead_letter(event_id)
        return booking_pb2.RetryDeadLetterResponse(dead_letter=dead_letter_message(letter))
