"""What a booking's rules read, kept in memory between bookings. No I/O here.

A booking checks its start against the therapist's schedule (zone, weekly windows, date
overrides, buffers, notice, horizon) and the session type's duration and cost. Reading all that
is one of the dearest parts of a booking (docs/performance.md), and it changes rarely, so the
service keeps it here, tagged with the therapist's `schedule_version` (migration 0004). Nothing
is trusted on memory alone: every claim names the version its rules were checked against, and
the database refuses the claim as stale when the version moved on (any change to the therapist,
its schedule or one of its session types moves it: migrations 0004 and 0006), after which the
service reads the schedule again. So a booking is decided on what the database holds at the
claim, exactly as without this cache: a price changed or a session type retired on one replica
is obeyed by the next booking on every other.

Bounded (TIGER_STYLE): at most `max_therapists` therapists, each with at most
`MAX_SESSION_TYPES_PER_THERAPIST` session types; the oldest entry goes first.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from booking_service.availability import Schedule
from booking_service.domain import Refused, SessionType, SessionTypeRetired, Therapist, TherapistArchived

MAX_SESSION_TYPES_PER_THERAPIST = 64


@dataclass(frozen=True)
class BookingRules:
    """The inputs of one booking's rules, as of the therapist's `schedule_version`."""

    therapist: Therapist
    session_type: SessionType
    schedule: Schedule
    schedule_version: int

    def therapist_closed(self) -> Refused | None:
        """Why the therapist takes no new session at all (archived), if it does not."""
        if self.therapist.archived_at is not None:
            return TherapistArchived(self.therapist.therapist_id)
        return None

    def closed(self) -> Refused | None:
        """Why no new session of this type can be booked (the therapist archived, the type
        retired), if none can: a refusal of the rules, recorded as the request's answer."""
        if self.session_type.retired_at is not None:
            return self.therapist_closed() or SessionTypeRetired(self.session_type.session_type_id)
        return self.therapist_closed()


@dataclass
class _TherapistEntry:
    therapist: Therapist
    schedule: Schedule
    schedule_version: int
    # The session types read at this schedule_version: a change to one moves the version on.
    session_types: dict[uuid.UUID, SessionType] = field(default_factory=dict)


class RulesCache:
    def __init__(self, max_therapists: int) -> None:
        assert max_therapists >= 0
        self._max_therapists = max_therapists
        self._therapists: dict[uuid.UUID, _TherapistEntry] = {}

    def __len__(self) -> int:
        return len(self._therapists)

    def get(self, therapist_id: uuid.UUID, session_type_id: uuid.UUID) -> BookingRules | None:
        entry = self._therapists.get(therapist_id)
        if entry is None:
            return None
        session_type = entry.session_types.get(session_type_id)
        if session_type is None:
            return None
        return BookingRules(entry.therapist, session_type, entry.schedule, entry.schedule_version)

    def put(self, rules: BookingRules) -> None:
        if self._max_therapists == 0:
            return
        therapist_id = rules.therapist.therapist_id
        assert rules.session_type.therapist_id == therapist_id, rules
        entry = self._therapists.get(therapist_id)
        if entry is None or entry.schedule_version != rules.schedule_version:
            if entry is None and len(self._therapists) >= self._max_therapists:
                del self._therapists[next(iter(self._therapists))]  # the oldest (dicts keep order)
            entry = _TherapistEntry(rules.therapist, rules.schedule, rules.schedule_version)
            self._therapists[therapist_id] = entry
        if len(entry.session_types) >= MAX_SESSION_TYPES_PER_THERAPIST:
            del entry.session_types[next(iter(entry.session_types))]
        entry.session_types[rules.session_type.session_type_id] = rules.session_type

    def forget(self, therapist_id: uuid.UUID) -> None:
        """The database said this therapist's schedule moved on: read it again next time."""
        self._therapists.pop(therapist_id, None)
