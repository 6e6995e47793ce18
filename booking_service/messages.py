"""booking.v1 messages and domain values: the servicer's translations, both ways.

Domain values become messages (`*_message`); request fields become domain values, each bad field
a BadRequest violation (`service_kit.validation.Checks`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from booking.v1 import booking_pb2
from booking_service import availability, domain
from booking_service.domain import SessionType, Therapist
from booking_service.practice import BookedSeries
from booking_service.store.outbox import DeadLetter
from service_kit.validation import EARLIEST_INSTANT, LATEST_INSTANT, Checks

MAX_NAME_LENGTH = 200
MAX_SHOWN_NAMES = 5
MAX_SHOWN_NAME_LENGTH = 64

_LOCAL_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")
UPDATABLE_FIELDS = (
    "display_name",
    "time_zone",
    "buffer_before_minutes",
    "buffer_after_minutes",
    "minimum_notice_minutes",
    "booking_horizon_days",
    "languages",
    "specialties",
)
SESSION_TYPE_UPDATABLE_FIELDS = (
    "name",
    "credit_cost",
    "late_cancellation_notice_minutes",
    "late_cancellation_refund_percent",
    "no_show_refund_percent",
)
MAX_LANGUAGES = 10
MAX_SPECIALTIES = 20
MAX_SPECIALTY_LENGTH = 50
MAX_FILTER_ZONES = 20
# A BCP 47 tag as a marketplace uses them: a language, then up to two subtags (script, region).
_LANGUAGE_TAG = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,2}$")
_SPECIALTY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_STATUS_TO_PROTO = {
    domain.BookingStatus.CONFIRMED: booking_pb2.BOOKING_STATUS_CONFIRMED,
    domain.BookingStatus.CANCELLED: booking_pb2.BOOKING_STATUS_CANCELLED,
}
STATUS_FROM_PROTO = {number: status for status, number in _STATUS_TO_PROTO.items()}
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
ACTOR_FROM_PROTO = {number: actor for actor, number in _ACTOR_TO_PROTO.items() if actor is not domain.Actor.SYSTEM}
_REASON_TO_PROTO = {
    domain.CancelReason.SCHEDULE_CONFLICT: booking_pb2.CANCELLATION_REASON_SCHEDULE_CONFLICT,
    domain.CancelReason.ILLNESS: booking_pb2.CANCELLATION_REASON_ILLNESS,
    domain.CancelReason.NO_LONGER_NEEDED: booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
    domain.CancelReason.THERAPIST_UNAVAILABLE: booking_pb2.CANCELLATION_REASON_THERAPIST_UNAVAILABLE,
    domain.CancelReason.ADMINISTRATIVE: booking_pb2.CANCELLATION_REASON_ADMINISTRATIVE,
    domain.CancelReason.OTHER: booking_pb2.CANCELLATION_REASON_OTHER,
    domain.CancelReason.PAYMENT_FAILED: booking_pb2.CANCELLATION_REASON_PAYMENT_FAILED,
}
REASON_FROM_PROTO = {
    number: reason for reason, number in _REASON_TO_PROTO.items() if reason is not domain.CancelReason.PAYMENT_FAILED
}
_OUTCOME_TO_PROTO = {
    domain.SessionOutcome.COMPLETED: booking_pb2.SESSION_OUTCOME_COMPLETED,
    domain.SessionOutcome.NO_SHOW: booking_pb2.SESSION_OUTCOME_NO_SHOW,
}
OUTCOME_FROM_PROTO = {number: outcome for outcome, number in _OUTCOME_TO_PROTO.items()}
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
        languages=therapist.languages,
        specialties=therapist.specialties,
        archive_time=timestamp(therapist.archived_at) if therapist.archived_at else None,
    )


def session_type_message(session_type: SessionType) -> booking_pb2.SessionType:
    return booking_pb2.SessionType(
        session_type_id=str(session_type.session_type_id),
        therapist_id=str(session_type.therapist_id),
        name=session_type.name,
        duration_minutes=session_type.duration_minutes,
        credit_cost=session_type.credit_cost,
        retire_time=timestamp(session_type.retired_at) if session_type.retired_at else None,
        late_cancellation_notice_minutes=session_type.late_cancel_notice_minutes,
        late_cancellation_refund_percent=session_type.late_cancel_refund_percent,
        no_show_refund_percent=session_type.no_show_refund_percent,
        start_step_minutes=session_type.start_step_minutes,
    )


def slot_message(slot: availability.Interval, zone_name: str) -> booking_pb2.Slot:
    """A free slot, with its local times in `zone_name`."""
    return booking_pb2.Slot(
        start_time=timestamp(slot.start),
        end_time=timestamp(slot.end),
        local_start=availability.local_rendering(slot.start, zone_name),
        local_end=availability.local_rendering(slot.end, zone_name),
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
        series_id="" if booking.series_id is None else str(booking.series_id),
        series_index=booking.series_index or 0,
    )
    if booking.outcome is not None:
        assert booking.outcome_at is not None
        message.outcome = _OUTCOME_TO_PROTO[booking.outcome]
        message.outcome_time.CopyFrom(timestamp(booking.outcome_at))
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


def series_message(series: BookedSeries) -> booking_pb2.CreateBookingSeriesResponse:
    return booking_pb2.CreateBookingSeriesResponse(
        series_id=str(series.series_id),
        bookings=[booking_message(b) for b in series.bookings],
        skipped=[
            booking_pb2.SkippedOccurrence(
                series_index=skipped.index, start_time=timestamp(skipped.starts_at), reason=skipped.reason
            )
            for skipped in series.skipped
        ],
    )


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


def therapist_fields(
    checks: Checks, field: str, message: booking_pb2.Therapist, paths: tuple[str, ...]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in paths:
        value = getattr(message, path)
        name = f"{field}.{path}"
        if path == "display_name":
            values[path] = checks.text(name, value, max_length=MAX_NAME_LENGTH, required=True)
        elif path == "time_zone":
            # Kept exactly as given (no normalising): check_therapist_zone accepts only IANA names.
            if not value:
                checks.fail(name, "is required (an IANA time zone name, e.g. Europe/London)")
            values[path] = value
        elif path in ("buffer_before_minutes", "buffer_after_minutes"):
            values[path] = checks.integer(name, value, minimum=0, maximum=240)
        elif path == "minimum_notice_minutes":
            values[path] = checks.integer(name, value, minimum=0, maximum=43200)
        elif path == "booking_horizon_days":
            values[path] = checks.integer(name, value, minimum=1, maximum=730)
        elif path == "languages":
            values[path] = languages(checks, name, value)
        elif path == "specialties":
            values[path] = specialties(checks, name, value)
    return values


def languages(checks: Checks, field: str, values: Sequence[str]) -> tuple[str, ...]:
    """BCP 47 tags, sorted and without repeats (so equal sets compare equal)."""
    return _tags(checks, field, values, _LANGUAGE_TAG, MAX_LANGUAGES, 'a BCP 47 language tag such as "en" or "pt-BR"')


def specialties(checks: Checks, field: str, values: Sequence[str]) -> tuple[str, ...]:
    return _tags(
        checks, field, values, _SPECIALTY, MAX_SPECIALTIES, 'a lowercase tag such as "anxiety" or "couples-therapy"'
    )


def _tags(
    checks: Checks, field: str, values: Sequence[str], form: re.Pattern[str], max_items: int, what: str
) -> tuple[str, ...]:
    if len(values) > max_items:
        checks.fail(field, f"at most {max_items} values")
    for index, value in enumerate(values[:max_items]):
        if len(value) > MAX_SPECIALTY_LENGTH or not form.fullmatch(value):
            checks.fail(f"{field}[{index}]", f"must be {what}")
    return tuple(sorted(set(values[:max_items])))


def time_zones(checks: Checks, field: str, values: Sequence[str]) -> tuple[str, ...]:
    """IANA zone names, as a filter: each must be one (a misspelt zone would match nothing)."""
    if len(values) > MAX_FILTER_ZONES:
        checks.fail(field, f"at most {MAX_FILTER_ZONES} values")
    for index, value in enumerate(values[:MAX_FILTER_ZONES]):
        try:
            availability.zone(value)
        except availability.UnknownTimeZone:
            checks.fail(f"{field}[{index}]", "must be an IANA time zone name, e.g. Europe/London")
    return tuple(sorted(set(values[:MAX_FILTER_ZONES])))


def check_therapist_zone(values: dict[str, Any]) -> None:
    """The zone, checked here so the refusal names the request's field, therapist.time_zone
    (the service checks again and names its own parameter, time_zone, which is no request field)."""
    if "time_zone" not in values:
        return
    try:
        availability.zone(values["time_zone"])
    except availability.UnknownTimeZone as error:
        error.field = "therapist.time_zone"
        raise domain.domain_error(error) from None


def start_of(checks: Checks, request: Any) -> datetime:
    """The `start` oneof: an instant, or a local time in a named zone, resolved here at the edge."""
    which = request.WhichOneof("start")
    if which == "start_time":
        return checks.instant("start_time", request.start_time)
    if which != "local_start":
        checks.fail("start_time", "is required: give start_time (an instant) or local_start")
        return EARLIEST_INSTANT
    return local_instant(checks, "local_start", request.local_start)


def local_instant(checks: Checks, name: str, local: booking_pb2.LocalDateTime) -> datetime:
    """A LocalDateTime field (`name`) as an instant: checked, then resolved in its zone (a time in
    a DST gap, or one that occurs twice without a disambiguation, is refused naming the field)."""
    if not _LOCAL_DATE_TIME.fullmatch(local.date_time):
        checks.fail(f"{name}.date_time", 'must be "YYYY-MM-DDTHH:MM[:SS]" without an offset')
        return EARLIEST_INSTANT
    disambiguation = checks.enum(
        f"{name}.disambiguation",
        local.disambiguation,
        booking_pb2.Disambiguation.Name,
        allow_unspecified=True,
    )
    try:
        naive = datetime.fromisoformat(local.date_time)
    except ValueError:
        checks.fail(f"{name}.date_time", "is not a valid date and time")
        return EARLIEST_INSTANT
    if not EARLIEST_INSTANT.year <= naive.year < LATEST_INSTANT.year:
        # Bounded before any arithmetic: near year 9999 a zone's offset overflows datetime.
        checks.fail(f"{name}.date_time", f"must be between {EARLIEST_INSTANT.year} and {LATEST_INSTANT.year - 1}")
        return EARLIEST_INSTANT
    checks.done()  # resolve only a well-formed local time
    try:
        instant = availability.resolve_local(naive, local.time_zone, _DISAMBIGUATION[disambiguation], field=name)
    except availability.AvailabilityError as error:
        if isinstance(error, availability.UnknownTimeZone):
            # availability names its own parameter; the request's field is <name>.time_zone.
            error.field = f"{name}.time_zone"
        raise domain.domain_error(error) from None
    # 2000-01-01T00:00 in UTC+14 is still 1999 in UTC: the instant itself must be in the window too.
    return checks.within_instant_window(f"{name}.date_time", instant)


def shown(names: list[str]) -> str:
    """Names from a request, cut short: echoing them whole let a huge update_mask path blow the
    status past the client's metadata limit (a bare RESOURCE_EXHAUSTED instead of the refusal)."""
    shown = ", ".join(repr(name[:MAX_SHOWN_NAME_LENGTH]) for name in names[:MAX_SHOWN_NAMES])
    return shown + (", ..." if len(names) > MAX_SHOWN_NAMES else "")
