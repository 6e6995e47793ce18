"""What the protocol's database steps are asked, and what they answer. No I/O.

Every request (a create or a reschedule) has one answer: the booking it made or moved, or its
refusal. The locked step (booking.decide, migration 0005) is the one place where an answer is
given: under the therapist's calendar lock it returns the answer a request already has, or
records the one proposed. `Calendar` (booking_service/calendar.py) runs these for one request at
a time; concurrent requests travel together without the flow knowing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from booking_service.availability import Interval
from booking_service.domain import Booking, RequestIdReused, recorded_refusal
from service_kit.errors import DomainError


@dataclass(frozen=True)
class Refusal:
    """A refusal as it is recorded, to be given again to every copy of its request."""

    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: DomainError) -> Refusal:
        return cls(error.reason, error.message, dict(error.metadata))

    def error(self) -> DomainError:
        return recorded_refusal(self.reason, self.message, dict(self.metadata))


@dataclass(frozen=True)
class Answer:
    """A request's answer: the booking it made or moved, or its refusal; and what it asked for
    (None for a session booked by the previous version, which kept no fingerprint)."""

    fingerprint: str | None
    booking: Booking | None
    refusal: Refusal | None
    # A series answered with bookings: which occurrences it skipped ("occurrence_<index>": reason).
    details: Mapping[str, str] = field(default_factory=dict)

    def given_to(self, fingerprint: str, request_id: str) -> Booking:
        """The answer for a copy of the request that asked for `fingerprint`: its booking, or its
        refusal raised again; a copy that asked for something else reused the request id."""
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise RequestIdReused(request_id)
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.booking is not None, self
        return self.booking


@dataclass(frozen=True)
class Unanswered:
    """The first look at a create with no answer yet: whether its slot is taken (None: no range
    to check), and the therapist's schedule version (None: no such therapist)."""

    slot_taken: bool | None
    schedule_version: int | None


# --- Proposals: what the service asks the locked step to record. ---


@dataclass(frozen=True)
class Place:
    """A create: insert `booking` (its id is the request key) unless `blocked` is taken, in which
    case `if_taken` is the answer."""

    fingerprint: str
    booking: Booking
    blocked: Interval
    schedule_version: int
    event: Mapping[str, object]
    video_room_name: str | None
    if_taken: Refusal

    @property
    def request_key(self) -> uuid.UUID:
        return self.booking.booking_id

    @property
    def therapist_id(self) -> uuid.UUID:
        return self.booking.therapist_id


@dataclass(frozen=True)
class Move:
    """A reschedule: move `booking` (as read, at its reschedule_count) to `starts_at`..`ends_at`
    unless `blocked` is taken, in which case `if_taken` is the answer. A booking that changed since
    it was read, or that started by `now`, is not moved (Changed)."""

    request_key: uuid.UUID
    fingerprint: str
    booking: Booking
    starts_at: datetime
    ends_at: datetime
    blocked: Interval
    schedule_version: int
    now: datetime
    event: Mapping[str, object]
    if_taken: Refusal

    @property
    def therapist_id(self) -> uuid.UUID:
        return self.booking.therapist_id


@dataclass(frozen=True)
class Refuse:
    """Record `refusal` as the request's answer, unless it has one already. `booking_id` is the
    booking a reschedule concerns; None for a create. A refusal whose `fingerprint` is None
    answers every copy of the request, whatever it asked (the reconciler's abort: it does not
    know what the request asked)."""

    request_key: uuid.UUID
    fingerprint: str | None
    therapist_id: uuid.UUID
    booking_id: uuid.UUID | None
    refusal: Refusal


@dataclass(frozen=True)
class Occurrence:
    """One occurrence of a series as proposed: its booking (its id derived from the series key
    and its index), what it takes from the calendar (None: refused already, by the rules, a taken
    slot at the pre-check, or the credit service), its event and room, and its refusal (that
    refusal, or what a taken slot answers). The refusal's metadata names the occurrence."""

    booking: Booking
    blocked: Interval | None
    event: Mapping[str, object]
    video_room_name: str | None
    refusal: Refusal

    @property
    def index(self) -> int:
        assert self.booking.series_index is not None, self.booking
        return self.booking.series_index


@dataclass(frozen=True)
class PlaceSeries:
    """A series: its occurrences decided together, under one lock, as one answer for the series
    key. All or nothing: any occurrence refused or taken refuses the series, naming each. With
    `skip_unavailable`, the others are placed and the refused ones skipped (all refused: the
    series is refused)."""

    request_key: uuid.UUID
    fingerprint: str
    therapist_id: uuid.UUID
    schedule_version: int
    skip_unavailable: bool
    occurrences: tuple[Occurrence, ...]

    @property
    def if_taken(self) -> Refusal:
        """The answer when the exclusion constraint (the last line) refuses an occurrence."""
        return Refusal("SLOT_UNAVAILABLE", "an occurrence of the series is taken (including buffers)")


Proposal = Place | Move | Refuse | PlaceSeries


# --- Decisions: what the locked step did. ---


@dataclass(frozen=True)
class Placed:
    booking: Booking


@dataclass(frozen=True)
class Moved:
    booking: Booking


@dataclass(frozen=True)
class Answered:
    """The request's answer, found or just recorded (a proposed refusal, or a taken slot)."""

    answer: Answer


@dataclass(frozen=True)
class Stale:
    """The therapist's schedule changed since the rules were checked: nothing was written."""


@dataclass(frozen=True)
class Changed:
    """The booking to move changed since it was read (cancelled, started, moved): nothing was written."""


@dataclass(frozen=True)
class Busy:
    """Another transaction held the therapist's lock and the step did not wait: nothing was written."""


@dataclass(frozen=True)
class SeriesDecided:
    """A series' decision: `placed` when this call placed it (its holds are to be committed), else
    its answer found or its refusal recorded now (`answer.refusal`). `bookings`: the occurrences
    that have a session, by index; `skipped`: the occurrences not booked, by index, with their
    refusal's reason."""

    placed: bool
    answer: Answer
    bookings: tuple[Booking, ...]
    skipped: Mapping[int, str]


Decision = Placed | Moved | Answered | Stale | Changed | Busy | SeriesDecided
