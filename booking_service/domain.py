"""The booking domain: therapists, session types, bookings, the cancellation policy, errors.

No I/O here. Time rules live in `availability`; this module turns their errors into the
service's domain errors so the servicer's one table can map them.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from booking_service import availability
from service_kit.errors import DomainError, FieldViolation, InvalidArgument

MAX_WEEKLY_WINDOWS = 50
MAX_OVERRIDE_WINDOWS = 10
MAX_SLOT_RANGE = timedelta(days=31)
MINUTES_PER_DAY = 1440


class BookingStatus(enum.Enum):
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"


class PaymentStatus(enum.Enum):
    COMMITTING = "committing"
    PAID = "paid"
    REFUNDING = "refunding"
    REFUNDED = "refunded"


class SessionOutcome(enum.Enum):
    """What happened, once the session started (recorded by its therapist, an admin, or the sweeper)."""

    COMPLETED = "completed"
    NO_SHOW = "no_show"


class Actor(enum.Enum):
    CLIENT = "client"
    THERAPIST = "therapist"
    ADMIN = "admin"
    SYSTEM = "system"


class CancelReason(enum.Enum):
    SCHEDULE_CONFLICT = "schedule_conflict"
    ILLNESS = "illness"
    NO_LONGER_NEEDED = "no_longer_needed"
    THERAPIST_UNAVAILABLE = "therapist_unavailable"
    ADMINISTRATIVE = "administrative"
    OTHER = "other"
    PAYMENT_FAILED = "payment_failed"


@dataclass(frozen=True)
class Therapist:
    therapist_id: uuid.UUID
    display_name: str
    time_zone: str
    buffer_before_minutes: int
    buffer_after_minutes: int
    minimum_notice_minutes: int
    booking_horizon_days: int
    created_at: datetime
    updated_at: datetime
    # BCP 47 tags and lowercase tags, each sorted and without repeats (what the listing filters on).
    languages: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()
    # Set while archived: not listed, not bookable; the bookings stay.
    archived_at: datetime | None = None


@dataclass(frozen=True)
class SessionType:
    session_type_id: uuid.UUID
    therapist_id: uuid.UUID
    name: str
    duration_minutes: int
    credit_cost: int
    # Set once retired: not bookable; the bookings stay.
    retired_at: datetime | None = None
    # A client cancelling later than this before the start gets late_cancel_refund_percent back;
    # None: the service's BOOKING_FREE_CANCELLATION_HOURS. A no-show gets no_show_refund_percent.
    late_cancel_notice_minutes: int | None = None
    late_cancel_refund_percent: int = 0
    no_show_refund_percent: int = 0
    # Starts lie every this many minutes of the therapist's local time (a divisor of 60).
    start_step_minutes: int = 15

    @property
    def duration(self) -> timedelta:
        return timedelta(minutes=self.duration_minutes)

    @property
    def start_step(self) -> timedelta:
        return timedelta(minutes=self.start_step_minutes)


@dataclass(frozen=True)
class WeeklyWindowMinutes:
    """A weekly window as stored: ISO weekday 1..7, minutes after local midnight."""

    weekday: int
    start_minute: int
    end_minute: int


@dataclass(frozen=True)
class DateOverride:
    local_date: str  # YYYY-MM-DD
    windows: tuple[tuple[int, int], ...]  # (start_minute, end_minute)


@dataclass(frozen=True)
class Booking:
    booking_id: uuid.UUID
    request_id: str
    client_id: uuid.UUID
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    starts_at: datetime
    ends_at: datetime
    time_zone: str
    credit_cost: int
    status: BookingStatus
    payment_status: PaymentStatus
    cancelled_by: Actor | None
    cancel_reason: CancelReason | None
    refunded_credits: int
    cancelled_at: datetime | None
    reschedule_count: int
    created_at: datetime
    updated_at: datetime
    # None: no room is kept for this booking (no provider, or booked before rooms existed).
    video_room: VideoRoom | None = None
    # The weekly series it is an occurrence of (its request key), and which one (from 0).
    series_id: uuid.UUID | None = None
    series_index: int | None = None
    # What happened (None: not recorded yet), who said so, and when.
    outcome: SessionOutcome | None = None
    outcome_by: Actor | None = None
    outcome_at: datetime | None = None


class VideoRoomState(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


@dataclass(frozen=True)
class VideoRoom:
    state: VideoRoomState
    url: str | None
    failure_reason: str | None


def minute_to_time(minute: int) -> time:
    """Minutes after midnight as a wall-clock time; 1440 (24:00) is the last instant of the day."""
    assert 0 <= minute <= MINUTES_PER_DAY
    if minute == MINUTES_PER_DAY:
        return time.max
    return time(minute // 60, minute % 60)


def schedule_of(
    therapist: Therapist, weekly: list[WeeklyWindowMinutes], overrides: list[DateOverride]
) -> availability.Schedule:
    return availability.Schedule(
        time_zone=therapist.time_zone,
        weekly=tuple(
            availability.WeeklyWindow(w.weekday - 1, minute_to_time(w.start_minute), minute_to_time(w.end_minute))
            for w in weekly
        ),
        overrides={
            date.fromisoformat(o.local_date): tuple(
                availability.LocalWindow(minute_to_time(start), minute_to_time(end)) for start, end in o.windows
            )
            for o in overrides
        },
        buffer_before=timedelta(minutes=therapist.buffer_before_minutes),
        buffer_after=timedelta(minutes=therapist.buffer_after_minutes),
        minimum_notice=timedelta(minutes=therapist.minimum_notice_minutes),
        booking_horizon=timedelta(days=therapist.booking_horizon_days),
    )


# --- Domain errors. The servicer's table maps each to a status code. ---


class NotFound(DomainError):
    def __init__(self, kind: str, identifier: uuid.UUID) -> None:
        super().__init__(f"no {kind} {identifier}", metadata={f"{kind.replace(' ', '_')}_id": str(identifier)})


class TherapistNotFound(NotFound):
    reason = "THERAPIST_NOT_FOUND"

    def __init__(self, therapist_id: uuid.UUID) -> None:
        super().__init__("therapist", therapist_id)


class SessionTypeNotFound(NotFound):
    reason = "SESSION_TYPE_NOT_FOUND"

    def __init__(self, session_type_id: uuid.UUID) -> None:
        super().__init__("session type", session_type_id)


class DeadLetterNotFound(NotFound):
    reason = "DEAD_LETTER_NOT_FOUND"

    def __init__(self, event_id: uuid.UUID) -> None:
        super().__init__("dead letter", event_id)


class BookingNotFound(NotFound):
    reason = "BOOKING_NOT_FOUND"

    def __init__(self, booking_id: uuid.UUID) -> None:
        super().__init__("booking", booking_id)


class RequestIdReused(DomainError):
    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used with other values; use a new request_id",
            metadata={"request_id": request_id},
        )


class Refused(DomainError):
    """The request is well-formed but the system's state refuses it (FAILED_PRECONDITION)."""


class SlotUnavailable(Refused):
    reason = "SLOT_UNAVAILABLE"

    def __init__(self, start: datetime) -> None:
        super().__init__(
            f"the therapist is already booked at {start.isoformat()} (including buffers)",
            metadata={"start_time": start.isoformat()},
        )


class OutsideSchedule(Refused):
    """OUTSIDE_AVAILABILITY, INSUFFICIENT_NOTICE, BEYOND_BOOKING_HORIZON or START_OFF_GRID (availability)."""

    def __init__(self, error: availability.AvailabilityError) -> None:
        super().__init__(str(error), metadata=error.metadata)
        self.reason = error.reason  # type: ignore[misc]  # the finer reason of this instance


class TherapistArchived(Refused):
    """An archived therapist takes no new session (a booking, or a booking moved to a new time)."""

    reason = "THERAPIST_ARCHIVED"

    def __init__(self, therapist_id: uuid.UUID) -> None:
        super().__init__(
            f"therapist {therapist_id} is archived and takes no bookings", metadata={"therapist_id": str(therapist_id)}
        )


class SessionTypeRetired(Refused):
    """A retired session type can no longer be booked; its bookings stay as they are."""

    reason = "SESSION_TYPE_RETIRED"

    def __init__(self, session_type_id: uuid.UUID) -> None:
        super().__init__(
            f"session type {session_type_id} is retired and can no longer be booked",
            metadata={"session_type_id": str(session_type_id)},
        )


class InsufficientCredits(Refused):
    reason = "INSUFFICIENT_CREDITS"


class NoCreditAccount(Refused):
    reason = "ACCOUNT_NOT_FOUND"


class BookingNotActive(Refused):
    reason = "BOOKING_CANCELLED"

    def __init__(self, booking_id: uuid.UUID) -> None:
        super().__init__(f"booking {booking_id} is cancelled", metadata={"booking_id": str(booking_id)})


class SessionAlreadyStarted(Refused):
    reason = "SESSION_ALREADY_STARTED"

    def __init__(self, booking_id: uuid.UUID, starts_at: datetime) -> None:
        super().__init__(
            f"booking {booking_id} started at {starts_at.isoformat()}; it can no longer change",
            metadata={"booking_id": str(booking_id)},
        )


class BookingAborted(DomainError):
    """The request was given up after a failure left it unanswered for longer than the
    reconciler waits (BOOKING_RECONCILE_AFTER_S): its hold was released, and this is its answer
    for good. ABORTED: book again with a new request_id."""

    reason = "BOOKING_ABORTED"

    def __init__(self) -> None:
        super().__init__(
            "this booking request was given up after a failure and its credits released; "
            "book again with a new request_id"
        )


class CalendarBusy(DomainError):
    """The therapist's calendar stayed locked longer than BOOKING_LOCK_TIMEOUT_MS, or its
    schedule kept changing: the request has no answer yet, and any hold it made is kept for a
    retry. ABORTED: retry with the same request_id."""

    reason = "CALENDAR_BUSY"


class SessionsOverlap(DomainError):
    """The exclusion constraint (the last line) refused a session that the locked check let
    through. Translated from the driver by the store; the calendar answers it as SLOT_UNAVAILABLE."""

    reason = "SLOT_UNAVAILABLE"


def domain_error(error: availability.AvailabilityError) -> DomainError:
    """Availability errors as domain errors: bad input names its field; the rest are refusals."""
    if isinstance(
        error,
        availability.OutsideAvailability | availability.TooSoon | availability.TooFarAhead | availability.OffGrid,
    ):
        return OutsideSchedule(error)
    invalid = InvalidArgument([FieldViolation(error.field or "request", str(error))], reason=error.reason)
    invalid.metadata.update(error.metadata)
    return invalid


# The refusals recorded as a request's answer (booking.request_answers), by reason, so that a
# repeat raises the very refusal the first copy got. Anything else recorded (a reason of a newer
# version) comes back as a plain FAILED_PRECONDITION refusal with its own reason and message.
_RECORDED_REFUSALS: dict[str, type[DomainError]] = {
    SlotUnavailable.reason: SlotUnavailable,
    "OUTSIDE_AVAILABILITY": OutsideSchedule,
    "INSUFFICIENT_NOTICE": OutsideSchedule,
    "BEYOND_BOOKING_HORIZON": OutsideSchedule,
    "START_OFF_GRID": OutsideSchedule,
    InsufficientCredits.reason: InsufficientCredits,
    NoCreditAccount.reason: NoCreditAccount,
    BookingNotActive.reason: BookingNotActive,
    SessionAlreadyStarted.reason: SessionAlreadyStarted,
    TherapistArchived.reason: TherapistArchived,
    SessionTypeRetired.reason: SessionTypeRetired,
    BookingAborted.reason: BookingAborted,
}


def is_recorded(error: DomainError) -> bool:
    """Whether a refusal is final for its request id (recorded as its answer). Bad input and
    unknown ids are not: nothing started under the request, so nothing is recorded."""
    return isinstance(error, Refused | BookingAborted)


def recorded_refusal(reason: str, message: str, metadata: dict[str, str]) -> DomainError:
    """A recorded refusal, raised again as the same class with the same reason, text and metadata."""
    kind = _RECORDED_REFUSALS.get(reason, Refused)
    refusal = kind.__new__(kind)
    DomainError.__init__(refusal, message, metadata=metadata)
    refusal.reason = reason  # type: ignore[misc]  # the finer reason of this instance (OutsideSchedule's)
    return refusal
