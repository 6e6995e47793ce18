"""A practice's domain: weekly series, session outcomes and their policies, reminders. No I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from booking_service.domain import Booking

# A weekly series: at most this many occurrences (half a year of weekly sessions), one or two
# weeks apart.
MAX_SERIES_OCCURRENCES = 26
SERIES_INTERVAL_WEEKS = (1, 2)


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
