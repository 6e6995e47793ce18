"""A practice's domain: weekly series, session outcomes and their policies, reminders. No I/O."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from booking_service.domain import Actor, Booking, NotFound, Refused, SessionOutcome, SessionType

# A weekly series: at most this many occurrences (half a year of weekly sessions), one or two
# weeks apart.
MAX_SERIES_OCCURRENCES = 26
SERIES_INTERVAL_WEEKS = (1, 2)
# The steps a session type's grid of starts may take: divisors of an hour.
START_STEPS_MINUTES = (5, 10, 15, 20, 30, 60)


@dataclass(frozen=True)
class SkippedOccurrence:
    """An occurrence of a series that was not booked (book-what-is-free), and why."""

    index: int
    starts_at: datetime
    reason: str


@dataclass(frozen=True)
class BookedSeries:
    """A series' answer: its id (the series' request key), its occurrences' bookings by index,
    and the occurrences it skipped."""

    series_id: uuid.UUID
    bookings: tuple[Booking, ...]
    skipped: tuple[SkippedOccurrence, ...]


@dataclass(frozen=True)
class Policy:
    """A session type's refund policy: a client cancelling later than `late_notice` before the
    start gets `late_refund_percent` of the cost back (earlier: all of it); a no-show gets
    `no_show_refund_percent`. Refunds are whole credits, rounded down."""

    late_notice: timedelta
    late_refund_percent: int
    no_show_refund_percent: int

    @classmethod
    def of(cls, session_type: SessionType, default_late_notice: timedelta) -> Policy:
        minutes = session_type.late_cancel_notice_minutes
        return cls(
            default_late_notice if minutes is None else timedelta(minutes=minutes),
            session_type.late_cancel_refund_percent,
            session_type.no_show_refund_percent,
        )

    def cancellation_refund(self, booking: Booking, actor: Actor, now: datetime) -> int:
        """A therapist, an admin or the system cancelling refunds in full; a client in time, in
        full; a client late, the late percentage."""
        if actor is not Actor.CLIENT or booking.starts_at - now >= self.late_notice:
            return booking.credit_cost
        return booking.credit_cost * self.late_refund_percent // 100

    def outcome_refund(self, booking: Booking, outcome: SessionOutcome) -> int:
        if outcome is SessionOutcome.NO_SHOW:
            return booking.credit_cost * self.no_show_refund_percent // 100
        return 0


class SessionNotStarted(Refused):
    reason = "SESSION_NOT_STARTED"

    def __init__(self, booking_id: uuid.UUID, starts_at: datetime) -> None:
        super().__init__(
            f"booking {booking_id} starts at {starts_at.isoformat()}; its outcome can be recorded once it started",
            metadata={"booking_id": str(booking_id)},
        )


class OutcomeAlreadyRecorded(Refused):
    reason = "OUTCOME_ALREADY_RECORDED"

    def __init__(self, booking_id: uuid.UUID, outcome: SessionOutcome) -> None:
        super().__init__(
            f"booking {booking_id} was already recorded as {outcome.value}",
            metadata={"booking_id": str(booking_id), "outcome": outcome.name},
        )


class WaitlistStatus(enum.Enum):
    WAITING = "waiting"
    OFFERED = "offered"
    BOOKED = "booked"
    LEFT = "left"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Offer:
    """A held slot offered to a waitlist entry, until `expires_at`."""

    offer_id: uuid.UUID
    entry_id: uuid.UUID
    therapist_id: uuid.UUID
    starts_at: datetime
    expires_at: datetime
    status: str  # open, taken, expired, withdrawn


@dataclass(frozen=True)
class WaitlistEntry:
    """A client waiting for a start in [wanted_from, wanted_until) of a session type of a
    therapist; its open offer, if it has one. Its id is its request key."""

    entry_id: uuid.UUID
    request_id: str
    fingerprint: str
    client_id: uuid.UUID
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    wanted_from: datetime
    wanted_until: datetime
    status: WaitlistStatus
    booking_id: uuid.UUID | None
    created_at: datetime
    offer: Offer | None = None


class WaitlistEntryNotFound(NotFound):
    reason = "WAITLIST_ENTRY_NOT_FOUND"

    def __init__(self, entry_id: uuid.UUID) -> None:
        super().__init__("waitlist entry", entry_id)


class OfferNotFound(NotFound):
    reason = "OFFER_NOT_FOUND"

    def __init__(self, offer_id: uuid.UUID) -> None:
        super().__init__("offer", offer_id)


class OfferNotOpen(Refused):
    """The offer expired, was withdrawn, or was taken by another request."""

    reason = "OFFER_NOT_OPEN"

    def __init__(self, offer_id: uuid.UUID, status: str) -> None:
        super().__init__(f"offer {offer_id} is {status}; join the waitlist again", metadata={"offer_id": str(offer_id)})
