"""Request ids, and what a request asked for. No I/O.

A `request_id` is an idempotency key scoped to its caller (docs/design.md, "One answer per
request"). The request key is derived from the two, so every copy of a request, on any replica,
after any crash, finds the same key without a row written first: a create's booking id is its
request key, and so is the reservation id of its hold. The fingerprint is what the request asked
for, so that the same key with other values is refused (REQUEST_ID_REUSED) rather than answered.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

# Fixed for ever: another namespace would give every request already answered a new key.
REQUEST_KEY_NAMESPACE = uuid.UUID("5e8303a7-000e-444e-b17e-69b28e0f3f79")
# Fixed for ever, like the request key's: an occurrence's booking id is derived from its series key.
OCCURRENCE_NAMESPACE = uuid.UUID("0c6b1f1e-7d0a-4c55-9a8e-5a3c2f7e9b41")
# Holds made by this protocol name their therapist and booking (and an occurrence's, its series).
# The previous version's holds are
# "booking:<id>" (see `hold_of`); its reconciler takes only those, so it never touches ours.
_HOLD_PREFIX = "therapist:"
_HOLD_SEPARATOR = "/booking:"
_SERIES_SEPARATOR = "/series:"
_LEGACY_HOLD_PREFIX = "booking:"


def canonical_caller(subject: str) -> str:
    """A caller's identity as keys use it: UUIDs in one form, whatever form the token spelt."""
    try:
        return str(uuid.UUID(subject))
    except ValueError:
        return subject


def request_key(caller: str, request_id: str) -> uuid.UUID:
    """The key of `request_id` sent by `caller` (a name-based UUID, RFC 9562 version 5)."""
    return uuid.uuid5(REQUEST_KEY_NAMESPACE, f"{canonical_caller(caller)}\n{request_id}")


def fingerprint(*parts: object) -> str:
    """What an idempotent request asked for, to refuse a reused key with other values."""
    return hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()


@dataclass(frozen=True)
class NewBooking:
    """What a CreateBooking asks for, and who asks."""

    caller: str
    request_id: str
    client_id: uuid.UUID
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    start: datetime

    @cached_property
    def key(self) -> uuid.UUID:
        return request_key(self.caller, self.request_id)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(
            "create_booking", self.client_id, self.therapist_id, self.session_type_id, self.start.isoformat()
        )


@dataclass(frozen=True)
class NewStart:
    """What a RescheduleBooking asks for, and who asks."""

    caller: str
    request_id: str
    booking_id: uuid.UUID
    start: datetime

    @cached_property
    def key(self) -> uuid.UUID:
        return request_key(self.caller, self.request_id)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint("reschedule_booking", self.booking_id, self.start.isoformat())


@dataclass(frozen=True)
class NewSeries:
    """What a CreateBookingSeries asks for, and who asks: `occurrences` sessions at the local time
    of `first_start` in the therapist's zone, every `interval_weeks` weeks. `skip_unavailable`:
    book the occurrences that are free and report the others (else all or nothing)."""

    caller: str
    request_id: str
    client_id: uuid.UUID
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    first_start: datetime
    occurrences: int
    interval_weeks: int
    skip_unavailable: bool

    @property
    def key(self) -> uuid.UUID:
        """The series' request key: its series id."""
        return request_key(self.caller, self.request_id)

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            "create_booking_series",
            self.client_id,
            self.therapist_id,
            self.session_type_id,
            self.first_start.isoformat(),
            self.occurrences,
            self.interval_weeks,
            self.skip_unavailable,
        )

    def occurrence_id(self, index: int) -> uuid.UUID:
        return occurrence_id(self.key, index)


@dataclass(frozen=True)
class NewWaitlistEntry:
    """What a JoinWaitlist asks for, and who asks."""

    caller: str
    request_id: str
    client_id: uuid.UUID
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    wanted_from: datetime
    wanted_until: datetime

    @property
    def key(self) -> uuid.UUID:
        return request_key(self.caller, self.request_id)

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            "join_waitlist",
            self.client_id,
            self.therapist_id,
            self.session_type_id,
            self.wanted_from.isoformat(),
            self.wanted_until.isoformat(),
        )


def occurrence_id(series_id: uuid.UUID, index: int) -> uuid.UUID:
    """The booking id of a series' occurrence (index from 0): every copy of the request finds it."""
    return uuid.uuid5(OCCURRENCE_NAMESPACE, f"{series_id}/{index}")


def hold_reference(therapist_id: uuid.UUID, booking_id: uuid.UUID, series_id: uuid.UUID | None = None) -> str:
    """The reference of a booking's credit hold: the reconciler reads whose calendar decides it,
    and for a series' occurrence, which series' answer does."""
    series = "" if series_id is None else f"{_SERIES_SEPARATOR}{series_id}"
    return f"{_HOLD_PREFIX}{therapist_id}{series}{_HOLD_SEPARATOR}{booking_id}"


@dataclass(frozen=True)
class HoldOwner:
    """The booking a hold pays for, and the therapist whose calendar lock decides it."""

    therapist_id: uuid.UUID
    booking_id: uuid.UUID


@dataclass(frozen=True)
class SeriesHold:
    """The occurrence a hold pays for, its series (whose request key is answered for all of its
    occurrences at once) and the therapist whose calendar lock decides it."""

    therapist_id: uuid.UUID
    series_id: uuid.UUID
    booking_id: uuid.UUID


@dataclass(frozen=True)
class LegacyHold:
    """A hold of the previous version ("booking:<id>"), decided through booking.decisions."""

    booking_id: uuid.UUID


def hold_of(reference: str) -> HoldOwner | SeriesHold | LegacyHold | None:
    """Whose hold a credit reservation is, from its reference; None: not a booking's."""
    try:
        if reference.startswith(_HOLD_PREFIX) and _HOLD_SEPARATOR in reference:
            owner, booking = reference.removeprefix(_HOLD_PREFIX).split(_HOLD_SEPARATOR, 1)
            if _SERIES_SEPARATOR in owner:
                therapist, series = owner.split(_SERIES_SEPARATOR, 1)
                return SeriesHold(uuid.UUID(therapist), uuid.UUID(series), uuid.UUID(booking))
            return HoldOwner(uuid.UUID(owner), uuid.UUID(booking))
        if reference.startswith(_LEGACY_HOLD_PREFIX):
            return LegacyHold(uuid.UUID(reference.removeprefix(_LEGACY_HOLD_PREFIX)))
    except ValueError:
        return None
    return None
