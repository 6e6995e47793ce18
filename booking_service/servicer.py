"""booking.v1.BookingService over gRPC: protobuf <-> domain, and the one table of status codes."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from booking.v1 import booking_pb2, booking_pb2_grpc
from booking_service import availability, domain
from booking_service.credits import ReservationGone, UnexpectedCreditAnswer
from booking_service.domain import (
    MAX_OVERRIDE_WINDOWS,
    MAX_SLOT_RANGE,
    MAX_WEEKLY_WINDOWS,
    MINUTES_PER_DAY,
    DateOverride,
    SessionType,
    Therapist,
    WeeklyWindowMinutes,
)
from booking_service.service import BookingService
from booking_service.store import DeadLetter
from service_kit import pagination
from service_kit.auth import (
    ADMIN,
    CLIENT,
    THERAPIST,
    AccessRules,
    PermissionDenied,
    Principal,
    anyone_with,
    current_principal,
    either,
    own,
)
from service_kit.errors import DeadlineExceeded, DomainError, FieldViolation, InvalidArgument, Unavailable
from service_kit.validation import EARLIEST_INSTANT, LATEST_INSTANT, Checks

SERVICE_NAME = booking_pb2.DESCRIPTOR.services_by_name["BookingService"].full_name
ERROR_DOMAIN = SERVICE_NAME
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_NAME_LENGTH = 200
MAX_SHOWN_NAMES = 5
MAX_SHOWN_NAME_LENGTH = 64

# Who may call what (docs/security.md). The catalogue (therapists, schedules, session types,
# slots) is readable by every signed-in caller; a therapist changes only its own; a client books
# only for itself. Get, cancel and reschedule need the booking to know whose it is: the rule lets
# the roles in, the servicer checks the owner (NOT_FOUND for another's, so it looks missing).
_READERS = anyone_with(CLIENT, THERAPIST, ADMIN)
_THERAPIST_SELF = either(anyone_with(ADMIN), own(THERAPIST, "therapist_id"))
ACCESS_RULES: AccessRules = {
    "CreateTherapist": anyone_with(ADMIN),
    "GetTherapist": _READERS,
    "UpdateTherapist": either(anyone_with(ADMIN), own(THERAPIST, "therapist.therapist_id")),
    "SetWeeklySchedule": _THERAPIST_SELF,
    "SetDateOverride": _THERAPIST_SELF,
    "DeleteDateOverride": _THERAPIST_SELF,
    "GetSchedule": _READERS,
    "CreateSessionType": _THERAPIST_SELF,
    "ListSessionTypes": _READERS,
    "ListAvailableSlots": _READERS,
    "CreateBooking": either(anyone_with(ADMIN), own(CLIENT, "client_id")),
    "GetBooking": _READERS,
    "ListBookings": either(
        anyone_with(ADMIN),
        lambda principal, request: not request.therapist_id and own(CLIENT, "client_id")(principal, request),
        lambda principal, request: not request.client_id and own(THERAPIST, "therapist_id")(principal, request),
    ),
    "CancelBooking": _READERS,
    "RescheduleBooking": _READERS,
    # Operators only: dead letters carry other people's bookings.
    "ListDeadLetters": anyone_with(ADMIN),
    "RetryDeadLetter": anyone_with(ADMIN),
}
# Which cancellation actor each role may speak as (an admin may act for anyone).
_ACTORS_OF_ROLE = {
    CLIENT: {booking_pb2.CANCELLATION_ACTOR_CLIENT},
    THERAPIST: {booking_pb2.CANCELLATION_ACTOR_THERAPIST},
    ADMIN: {
        booking_pb2.CANCELLATION_ACTOR_CLIENT,
        booking_pb2.CANCELLATION_ACTOR_THERAPIST,
        booking_pb2.CANCELLATION_ACTOR_ADMIN,
    },
}

# The one table from domain errors to status codes (subclasses inherit their parent's code).
ERROR_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotFound: grpc.StatusCode.NOT_FOUND,
    domain.RequestIdReused: grpc.StatusCode.ALREADY_EXISTS,
    domain.Refused: grpc.StatusCode.FAILED_PRECONDITION,
    domain.BookingAborted: grpc.StatusCode.ABORTED,
    domain.CreditServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    domain.CreditServiceTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnexpectedCreditAnswer: grpc.StatusCode.INTERNAL,
    ReservationGone: grpc.StatusCode.INTERNAL,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_HOUR_MINUTE = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
# How availability's schedule rules name a window (see booking_service.availability.Schedule).
_SCHEDULE_PATH = re.compile(r"\b(?:weekly|overrides\[[^\]]*\])\[(\d+)\]")
_LOCAL_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")
_UPDATABLE_FIELDS = (
    "display_name",
    "time_zone",
    "buffer_before_minutes",
    "buffer_after_minutes",
    "minimum_notice_minutes",
    "booking_horizon_days",
)
_STATUS_TO_PROTO = {
    domain.BookingStatus.CONFIRMED: booking_pb2.BOOKING_STATUS_CONFIRMED,
    domain.BookingStatus.CANCELLED: booking_pb2.BOOKING_STATUS_CANCELLED,
}
_STATUS_FROM_PROTO = {number: status for status, number in _STATUS_TO_PROTO.items()}
_PAYMENT_TO_PROTO = {
    domain.PaymentStatus.COMMITTING: booking_pb2.PAYMENT_STATUS_COMMITTING,
    domain.PaymentStatus.PAID: booking_pb2.PAYMENT_STATUS_PAID,
    domain.PaymentStatus.REFUNDING: booking_pb2.PAYMENT_STATUS_REFUNDING,
    domain.PaymentStatus.REFUNDED: booking_pb2.PAYMENT_STATUS_REFUNDED,
}
_ACTOR_TO_PROTO = {
    domain.Actor.CLIENT: booking_pb2.CANCELLATION_ACTOR_CLIENT,
    domain.Actor.THERAPIST: booking_pb2.CANCELLATION_ACTOR_THERAPIST,
    domain.Actor.ADMIN: booking_pb2.CANCELLATION_ACTOR_ADMIN,
    domain.Actor.SYSTEM: booking_pb2.CANCELLATION_ACTOR_SYSTEM,
}
_ACTOR_FROM_PROTO = {number: actor for actor, number in _ACTOR_TO_PROTO.items() if actor is not domain.Actor.SYSTEM}
_REASON_TO_PROTO = {
    domain.CancelReason.SCHEDULE_CONFLICT: booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
    domain.CancelReason.ILLNESS: booking_pb2.CANCELLATION_REASON_ILLNESS,
    domain.CancelReason.NO_LONGER_NEEDED: booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
    domain.CancelReason.THERAPIST_UNAVAILABLE: booking_pb2.CANCELLATION_REASON_THERAPIST_UNAVAILABLE,
    domain.CancelReason.ADMINISTRATIVE: booking_pb2.CANCELLATION_REASON_ADMINISTRATIVE,
    domain.CancelReason.OTHER: booking_pb2.CANCELLATION_REASON_OTHER,
    domain.CancelReason.PAYMENT_FAILED: booking_pb2.CANCELLATION_REASON_PAYMENT_FAILED,
}
_REASON_FROM_PROTO = {
    number: reason for reason, number in _REASON_TO_PROTO.items() if reason is not domain.CancelReason.PAYMENT_FAILED
}
_VIDEO_ROOM_TO_PROTO = {
    domain.VideoRoomState.PENDING: booking_pb2.VIDEO_ROOM_STATE_PENDING,
    domain.VideoRoomState.READY: booking_pb2.VIDEO_ROOM_STATE_READY,
    domain.VideoRoomState.FAILED: booking_pb2.VIDEO_ROOM_STATE_FAILED,
    domain.VideoRoomState.DELETED: booking_pb2.VIDEO_ROOM_STATE_DELETED,
}
_DISAMBIGUATION = {
    booking_pb2.DISAMBIGUATION_UNSPECIFIED: availability.Disambiguation.UNSPECIFIED,
    booking_pb2.DISAMBIGUATION_EARLIER: availability.Disambiguation.EARLIER,
    booking_pb2.DISAMBIGUATION_LATER: availability.Disambiguation.LATER,
}

Context = grpc.aio.ServicerContext[Any, Any]


def timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(instant.astimezone(UTC))
    return message


def therapist_message(therapist: Therapist) -> booking_pb2.Therapist:
    return booking_pb2.Therapist(
        therapist_id=str(therapist.therapist_id),
        display_name=therapist.display_name,
        time_zone=therapist.time_zone,
        buffer_before_minutes=therapist.buffer_before_minutes,
        buffer_after_minutes=therapist.buffer_after_minutes,
        minimum_notice_minutes=therapist.minimum_notice_minutes,
        booking_horizon_days=therapist.booking_horizon_days,
        create_time=timestamp(therapist.created_at),
        update_time=timestamp(therapist.updated_at),
    )


def session_type_message(session_type: SessionType) -> booking_pb2.SessionType:
    return booking_pb2.SessionType(
        session_type_id=str(session_type.session_type_id),
        therapist_id=str(session_type.therapist_id),
        name=session_type.name,
        duration_minutes=session_type.duration_minutes,
        credit_cost=session_type.credit_cost,
    )


def booking_message(booking: domain.Booking) -> booking_pb2.Booking:
    message = booking_pb2.Booking(
        booking_id=str(booking.booking_id),
        request_id=booking.request_id,
        client_id=str(booking.client_id),
        therapist_id=str(booking.therapist_id),
        session_type_id=str(booking.session_type_id),
        start_time=timestamp(booking.starts_at),
        end_time=timestamp(booking.ends_at),
        local_start=availability.local_rendering(booking.starts_at, booking.time_zone),
        time_zone=booking.time_zone,
        status=_STATUS_TO_PROTO[booking.status],
        credit_cost=booking.credit_cost,
        payment_status=_PAYMENT_TO_PROTO[booking.payment_status],
        create_time=timestamp(booking.created_at),
        update_time=timestamp(booking.updated_at),
        reschedule_count=booking.reschedule_count,
        video_room=video_room_message(booking.video_room),
    )
    if booking.cancelled_at is not None:
        assert booking.cancelled_by is not None and booking.cancel_reason is not None
        message.cancellation.CopyFrom(
            booking_pb2.Cancellation(
                actor=_ACTOR_TO_PROTO[booking.cancelled_by],
                reason=_REASON_TO_PROTO[booking.cancel_reason],
                refunded_credits=booking.refunded_credits,
                cancel_time=timestamp(booking.cancelled_at),
            )
        )
    return message


def video_room_message(room: domain.VideoRoom | None) -> booking_pb2.VideoRoom:
    if room is None:
        return booking_pb2.VideoRoom(state=booking_pb2.VIDEO_ROOM_STATE_DISABLED)
    return booking_pb2.VideoRoom(
        state=_VIDEO_ROOM_TO_PROTO[room.state], url=room.url or "", failure_reason=room.failure_reason or ""
    )


def dead_letter_message(letter: DeadLetter) -> booking_pb2.DeadLetter:
    return booking_pb2.DeadLetter(
        event_id=str(letter.event_id),
        kind=letter.kind,
        booking_id=str(letter.booking_id),
        attempts=letter.attempts,
        last_error=letter.last_error or "",
        create_time=timestamp(letter.created_at),
        update_time=timestamp(letter.updated_at),
    )


def _minute_text(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def window_message(start_minute: int, end_minute: int) -> booking_pb2.TimeWindow:
    return booking_pb2.TimeWindow(start_time=_minute_text(start_minute), end_time=_minute_text(end_minute))


def _parse_minute(checks: Checks, field: str, text: str, *, allow_end_of_day: bool) -> int:
    match = _HOUR_MINUTE.match(text)
    if match is None:
        checks.fail(field, 'must be "HH:MM" (24-hour), e.g. "09:30"')
        return 0
    minute = int(match.group(1)) * 60 + int(match.group(2))
    if minute > MINUTES_PER_DAY or (minute == MINUTES_PER_DAY and not allow_end_of_day):
        checks.fail(field, "must be at most 24:00 (as an end) or 23:59 (as a start)")
        return 0
    return minute


def _parse_window(checks: Checks, field: str, window: booking_pb2.TimeWindow) -> tuple[int, int]:
    start = _parse_minute(checks, f"{field}.start_time", window.start_time, allow_end_of_day=False)
    end = _parse_minute(checks, f"{field}.end_time", window.end_time, allow_end_of_day=True)
    if start >= end and _HOUR_MINUTE.match(window.start_time) and _HOUR_MINUTE.match(window.end_time):
        checks.fail(f"{field}.end_time", "must be after start_time")
    return start, end


def _parse_date(checks: Checks, field: str, text: str) -> str:
    try:
        parsed = date.fromisoformat(text)
    except ValueError:
        checks.fail(field, 'must be a date "YYYY-MM-DD"')
        return "2000-01-01"
    if len(text) != len("YYYY-MM-DD") or not 2000 <= parsed.year < 2100:
        checks.fail(field, 'must be a date "YYYY-MM-DD" between 2000 and 2099')
    return parsed.isoformat()


def _therapist_fields(
    checks: Checks, field: str, message: booking_pb2.Therapist, paths: tuple[str, ...]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in paths:
        value = getattr(message, path)
        name = f"{field}.{path}"
        if path == "display_name":
            values[path] = checks.text(name, value, max_length=MAX_NAME_LENGTH, required=True)
        elif path == "time_zone":
            # Kept exactly as given (no normalising): _check_therapist_zone accepts only IANA names.
            if not value:
                checks.fail(name, "is required (an IANA time zone name, e.g. Europe/London)")
            values[path] = value
        elif path in ("buffer_before_minutes", "buffer_after_minutes"):
            values[path] = checks.integer(name, value, minimum=0, maximum=240)
        elif path == "minimum_notice_minutes":
            values[path] = checks.integer(name, value, minimum=0, maximum=43200)
        elif path == "booking_horizon_days":
            values[path] = checks.integer(name, value, minimum=1, maximum=730)
    return values


def _check_therapist_zone(values: dict[str, Any]) -> None:
    """The zone, checked here so the refusal names the request's field, therapist.time_zone
    (the service checks again and names its own parameter, time_zone, which is no request field)."""
    if "time_zone" not in values:
        return
    try:
        availability.zone(values["time_zone"])
    except availability.UnknownTimeZone as error:
        error.field = "therapist.time_zone"
        raise domain.domain_error(error) from None


def _start(checks: Checks, request: Any) -> datetime:
    """The `start` oneof: an instant, or a local time in a named zone, resolved here at the edge."""
    which = request.WhichOneof("start")
    if which == "start_time":
        return checks.instant("start_time", request.start_time)
    if which != "local_start":
        checks.fail("start_time", "is required: give start_time (an instant) or local_start")
        return EARLIEST_INSTANT
    local = request.local_start
    if not _LOCAL_DATE_TIME.fullmatch(local.date_time):
        checks.fail("local_start.date_time", 'must be "YYYY-MM-DDTHH:MM[:SS]" without an offset')
        return EARLIEST_INSTANT
    disambiguation = checks.enum(
        "local_start.disambiguation",
        local.disambiguation,
        booking_pb2.Disambiguation.Name,
        allow_unspecified=True,
    )
    try:
        naive = datetime.fromisoformat(local.date_time)
    except ValueError:
        checks.fail("local_start.date_time", "is not a valid date and time")
        return EARLIEST_INSTANT
    if not EARLIEST_INSTANT.year <= naive.year < LATEST_INSTANT.year:
        # Bounded before any arithmetic: near year 9999 a zone's offset overflows datetime.
        checks.fail("local_start.date_time", f"must be between {EARLIEST_INSTANT.year} and {LATEST_INSTANT.year - 1}")
        return EARLIEST_INSTANT
    checks.done()  # resolve only a well-formed local time
    try:
        instant = availability.resolve_local(
            naive, local.time_zone, _DISAMBIGUATION[disambiguation], field="local_start"
        )
    except availability.AvailabilityError as error:
        if isinstance(error, availability.UnknownTimeZone):
            # availability names its own parameter; the request's field is local_start.time_zone.
            error.field = "local_start.time_zone"
        raise domain.domain_error(error) from None
    # 2000-01-01T00:00 in UTC+14 is still 1999 in UTC: the instant itself must be in the window too.
    return checks.within_instant_window("local_start.date_time", instant)


class BookingServicer(booking_pb2_grpc.BookingServiceServicer):
    def __init__(self, service: BookingService) -> None:
        self._service = service

    async def CreateTherapist(
        self, request: booking_pb2.CreateTherapistRequest, context: Context
    ) -> booking_pb2.CreateTherapistResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        values = _therapist_fields(checks, "therapist", request.therapist, _UPDATABLE_FIELDS)
        checks.done()
        _check_therapist_zone(values)
        now = datetime.now(UTC)
        therapist = Therapist(therapist_id=uuid.uuid4(), created_at=now, updated_at=now, **values)
        created = await self._service.create_therapist(request_id, therapist)
        return booking_pb2.CreateTherapistResponse(therapist=therapist_message(created))

    async def GetTherapist(
        self, request: booking_pb2.GetTherapistRequest, context: Context
    ) -> booking_pb2.GetTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        return booking_pb2.GetTherapistResponse(
            therapist=therapist_message(await self._service.therapist(therapist_id))
        )

    async def UpdateTherapist(
        self, request: booking_pb2.UpdateTherapistRequest, context: Context
    ) -> booking_pb2.UpdateTherapistResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist.therapist_id", request.therapist.therapist_id)
        paths = tuple(request.update_mask.paths)
        unknown = [p for p in paths if p not in _UPDATABLE_FIELDS]
        if not paths:
            checks.fail("update_mask", f"must name the fields to change: {', '.join(_UPDATABLE_FIELDS)}")
        elif unknown:
            checks.fail(
                "update_mask",
                f"cannot change {_shown(unknown)}; changeable: {', '.join(_UPDATABLE_FIELDS)}",
            )
        values = _therapist_fields(checks, "therapist", request.therapist, tuple(p for p in paths if p not in unknown))
        checks.done()
        _check_therapist_zone(values)
        updated = await self._service.update_therapist(therapist_id, values)
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
            start, end = _parse_window(checks, f"{field}.window", window.window)
            windows.append(WeeklyWindowMinutes(weekday, start, end))
        checks.done()
        try:
            stored = await self._service.set_weekly_schedule(therapist_id, windows)
        except InvalidArgument as error:
            raise _in_request_terms(error) from None
        return booking_pb2.SetWeeklyScheduleResponse(windows=[_weekly_message(w) for w in stored])

    async def SetDateOverride(
        self, request: booking_pb2.SetDateOverrideRequest, context: Context
    ) -> booking_pb2.SetDateOverrideResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        local_date = _parse_date(checks, "date", request.date)
        if len(request.windows) > MAX_OVERRIDE_WINDOWS:
            checks.fail("windows", f"at most {MAX_OVERRIDE_WINDOWS} windows")
        windows = tuple(
            _parse_window(checks, f"windows[{i}]", w) for i, w in enumerate(request.windows[:MAX_OVERRIDE_WINDOWS])
        )
        checks.done()
        try:
            stored = await self._service.set_date_override(therapist_id, DateOverride(local_date, windows))
        except InvalidArgument as error:
            raise _in_request_terms(error) from None
        return booking_pb2.SetDateOverrideResponse(date_override=_override_message(stored))

    async def DeleteDateOverride(
        self, request: booking_pb2.DeleteDateOverrideRequest, context: Context
    ) -> booking_pb2.DeleteDateOverrideResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        local_date = _parse_date(checks, "date", request.date)
        checks.done()
        await self._service.delete_date_override(therapist_id, local_date)
        return booking_pb2.DeleteDateOverrideResponse()

    async def GetSchedule(
        self, request: booking_pb2.GetScheduleRequest, context: Context
    ) -> booking_pb2.GetScheduleResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        therapist, weekly, overrides = await self._service.schedule(therapist_id)
        return booking_pb2.GetScheduleResponse(
            time_zone=therapist.time_zone,
            weekly_windows=[_weekly_message(w) for w in weekly],
            date_overrides=[_override_message(o) for o in overrides],
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
        checks.done()
        created = await self._service.create_session_type(
            request_id, SessionType(uuid.uuid4(), therapist_id, name, duration, cost)
        )
        return booking_pb2.CreateSessionTypeResponse(session_type=session_type_message(created))

    async def ListSessionTypes(
        self, request: booking_pb2.ListSessionTypesRequest, context: Context
    ) -> booking_pb2.ListSessionTypesResponse:
        checks = Checks()
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        checks.done()
        found = await self._service.session_types(therapist_id)
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
        therapist, slots = await self._service.available_slots(therapist_id, session_type_id, start, end)
        zone_name = display_zone or therapist.time_zone
        return booking_pb2.ListAvailableSlotsResponse(
            time_zone=zone_name,
            slots=[
                booking_pb2.Slot(
                    start_time=timestamp(slot.start),
                    end_time=timestamp(slot.end),
                    local_start=availability.local_rendering(slot.start, zone_name),
                    local_end=availability.local_rendering(slot.end, zone_name),
                )
                for slot in slots
            ],
        )

    async def CreateBooking(
        self, request: booking_pb2.CreateBookingRequest, context: Context
    ) -> booking_pb2.CreateBookingResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        client_id = checks.uuid("client_id", request.client_id)
        therapist_id = checks.uuid("therapist_id", request.therapist_id)
        session_type_id = checks.uuid("session_type_id", request.session_type_id)
        start = _start(checks, request)
        checks.done()
        booking = await self._service.create_booking(request_id, client_id, therapist_id, session_type_id, start)
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
        page = await self._service.list_bookings(
            client_id=client_id,
            therapist_id=therapist_id,
            start_after=start_after,
            start_before=start_before,
            status=_STATUS_FROM_PROTO.get(status),
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
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        actor = checks.enum("actor", request.actor, booking_pb2.CancellationActor.Name)
        reason = checks.enum("reason", request.reason, booking_pb2.CancellationReason.Name)
        if actor and actor not in _ACTOR_FROM_PROTO:
            checks.fail("actor", "must be CLIENT, THERAPIST or ADMIN")
        if reason and reason not in _REASON_FROM_PROTO:
            checks.fail("reason", "is set by the system only")
        checks.done()
        await self._owned_booking(booking_id)
        principal = current_principal()
        if not any(actor in _ACTORS_OF_ROLE.get(role, ()) for role in principal.roles):
            raise PermissionDenied("the caller may not cancel as this actor", metadata={"field": "actor"})
        booking = await self._service.cancel_booking(
            booking_id,
            _ACTOR_FROM_PROTO[actor],
            _REASON_FROM_PROTO[reason],
        )
        return booking_pb2.CancelBookingResponse(booking=booking_message(booking))

    async def RescheduleBooking(
        self, request: booking_pb2.RescheduleBookingRequest, context: Context
    ) -> booking_pb2.RescheduleBookingResponse:
        checks = Checks()
        booking_id = checks.uuid("booking_id", request.booking_id)
        request_id = checks.request_id("request_id", request.request_id)
        start = _start(checks, request)
        checks.done()
        await self._owned_booking(booking_id)
        booking = await self._service.reschedule_booking(booking_id, request_id, start)
        return booking_pb2.RescheduleBookingResponse(booking=booking_message(booking))

    async def ListDeadLetters(
        self, request: booking_pb2.ListDeadLettersRequest, context: Context
    ) -> booking_pb2.ListDeadLettersResponse:
        checks = Checks()
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        page = await self._service.dead_letters(pagination.decode_instant_and_id(request.page_token, ()), page_size)
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
        letter = await self._service.retry_dead_letter(event_id)
        return booking_pb2.RetryDeadLetterResponse(dead_letter=dead_letter_message(letter))

    async def _owned_booking(self, booking_id: uuid.UUID) -> domain.Booking:
        """The booking, if the caller may see it; another's is NOT_FOUND, exactly as a missing one.
        (Who a booking belongs to never changes, so this read cannot go stale before the change.)"""
        booking = await self._service.booking(booking_id)
        if not _may_see(current_principal(), booking):
            raise domain.BookingNotFound(booking_id)
        return booking


def _may_see(principal: Principal, booking: domain.Booking) -> bool:
    return (
        principal.has(ADMIN)
        or (principal.has(CLIENT) and principal.is_subject(str(booking.client_id)))
        or (principal.has(THERAPIST) and principal.is_subject(str(booking.therapist_id)))
    )


def _in_request_terms(error: InvalidArgument) -> InvalidArgument:
    """A schedule rule's refusal with its paths (weekly[1], overrides[2030-01-02][1]) renamed to
    the request's field, windows[1]: the service receives the request's windows in order."""

    def rename(text: str) -> str:
        return _SCHEDULE_PATH.sub(r"windows[\1]", text)

    renamed = InvalidArgument(
        [FieldViolation(rename(v.field), rename(v.description)) for v in error.violations], reason=error.reason
    )
    renamed.metadata.update({key: rename(value) for key, value in error.metadata.items() if key != "field"})
    return renamed


def _shown(names: list[str]) -> str:
    """Names from a request, cut short: echoing them whole let a huge update_mask path blow the
    status past the client's metadata limit (a bare RESOURCE_EXHAUSTED instead of the refusal)."""
    shown = ", ".join(repr(name[:MAX_SHOWN_NAME_LENGTH]) for name in names[:MAX_SHOWN_NAMES])
    return shown + (", ..." if len(names) > MAX_SHOWN_NAMES else "")


def _weekly_message(window: WeeklyWindowMinutes) -> booking_pb2.WeeklyWindow:
    return booking_pb2.WeeklyWindow(
        day_of_week=window.weekday,  # type: ignore[arg-type]  # ISO weekday == DayOfWeek number
        window=window_message(window.start_minute, window.end_minute),
    )


def _override_message(override: DateOverride) -> booking_pb2.DateOverride:
    return booking_pb2.DateOverride(
        date=override.local_date, windows=[window_message(start, end) for start, end in override.windows]
    )
