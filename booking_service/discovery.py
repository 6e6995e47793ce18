"""Discovery: which therapists there are (ListTherapists), and who is free when
(SearchAvailability): "who can see me for 50 minutes between Tuesday 18:00 and Thursday 20:00".

The search examines therapists in the listing's order (oldest first), a chunk at a time, and
stops at `MAX_THERAPISTS_EXAMINED` per call, whatever it found: its work is bounded by that and
by `MAX_SEARCH_RANGE`, not by how many therapists match. The page token carries on after the
last therapist examined, so a page may hold fewer results than asked for, even none, and still
have a next page (AIP-158). Each therapist's slots are computed exactly as ListAvailableSlots
computes them (`catalogue.free_slots` over `catalogue.busy_window`, the same schedule and the
same busy ranges), so every slot found here is one ListAvailableSlots lists. The starts lie on
the grid common to the therapist's matching session types (`common_step`), so each one found
can be booked with any of the types answered with it.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from booking_service import availability
from booking_service.availability import DEFAULT_START_STEP
from booking_service.catalogue import busy_window, free_slots
from booking_service.domain import SessionType, Therapist, schedule_of
from booking_service.store import catalogue as catalogue_store
from booking_service.store import discovery as store
from booking_service.store.discovery import TherapistFilter
from service_kit.database import Database
from service_kit.pagination import Page

# The bound on one search's work: therapists examined per call (documented in docs/http-api.md).
MAX_THERAPISTS_EXAMINED = 50
# The widest range one search covers (each therapist's schedule is expanded over it).
MAX_SEARCH_RANGE = timedelta(days=14)
# Therapists read per round trip: enough that a call at its bound takes two trips.
MIN_CHUNK = 25
# Any zone puts an instant within a day of its UTC date; availability pads one more day.
_DATE_PADDING = timedelta(days=2)
_FIRST_CURSOR = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


@dataclass(frozen=True)
class AvailabilityQuery:
    duration: timedelta
    start: datetime
    end: datetime
    where: TherapistFilter
    slots_per_therapist: int
    page_size: int


@dataclass(frozen=True)
class Available:
    """A therapist free in the range: the fitting session types, cheapest first, and the first
    free slots."""

    therapist: Therapist
    session_types: list[SessionType]
    slots: list[availability.Interval]


@dataclass(frozen=True)
class SearchPage:
    results: list[Available]
    examined: int
    # (created_at, therapist_id) of the last therapist examined, when some may follow.
    next_cursor: tuple[datetime, uuid.UUID] | None


class Discovery:
    def __init__(self, database: Database, clock: Callable[[], datetime]) -> None:
        self._database = database
        self._clock = clock

    async def list_therapists(
        self, where: TherapistFilter, after: tuple[datetime, uuid.UUID] | None, page_size: int
    ) -> Page[Therapist]:
        async with self._database.pool.acquire() as connection:
            found = await store.list_therapists(connection, where, after or _FIRST_CURSOR, page_size + 1)
        return Page.from_rows(found, page_size)

    async def search(self, query: AvailabilityQuery, after: tuple[datetime, uuid.UUID] | None) -> SearchPage:
        """One page of therapists with free slots, examining at most MAX_THERAPISTS_EXAMINED."""
        assert query.end - query.start <= MAX_SEARCH_RANGE, query
        assert query.page_size > 0 and query.slots_per_therapist > 0, query
        where = replace(query.where, duration_minutes=int(query.duration.total_seconds()) // 60, include_archived=False)
        now = self._clock()
        cursor = after or _FIRST_CURSOR
        results: list[Available] = []
        examined = 0
        exhausted = False
        while examined < MAX_THERAPISTS_EXAMINED and len(results) < query.page_size and not exhausted:
            chunk = min(MAX_THERAPISTS_EXAMINED - examined, max(query.page_size - len(results), MIN_CHUNK))
            read = await self._read_chunk(query, where, cursor, chunk)
            exhausted = len(read) < chunk
            for candidate, schedule, busy in read:
                # Each therapist's slots are a few milliseconds of Python: let the other calls of
                # this process run between two, so that a search never holds the loop for long.
                await asyncio.sleep(0)
                examined += 1
                cursor = (candidate.therapist.created_at, candidate.therapist.therapist_id)
                slots = free_slots(
                    schedule,
                    query.duration,
                    query.start,
                    query.end,
                    now,
                    busy,
                    common_step(candidate.session_types),
                    max_slots=query.slots_per_therapist,
                )
                if slots and candidate.session_types:
                    results.append(Available(candidate.therapist, candidate.session_types, slots))
                    if len(results) == query.page_size:
                        exhausted = exhausted and candidate is read[-1][0]
                        break
        return SearchPage(results, examined, None if exhausted else cursor)

    async def _read_chunk(
        self, query: AvailabilityQuery, where: TherapistFilter, cursor: tuple[datetime, uuid.UUID], chunk: int
    ) -> list[tuple[store.Candidate, availability.Schedule, list[tuple[datetime, datetime]]]]:
        """The next `chunk` therapists after `cursor`, each with its schedule and its busy ranges,
        in three statements; the connection goes back to the pool before any slot is computed."""
        async with self._database.pool.acquire() as connection:
            therapists = await store.list_therapists(connection, where, cursor, chunk)
            if not therapists:
                return []
            first_date, last_date = (query.start - _DATE_PADDING).date(), (query.end + _DATE_PADDING).date()
            candidates = await store.candidates(connection, therapists, where, first_date, last_date)
            schedules = [schedule_of(c.therapist, c.weekly, c.overrides) for c in candidates]
            busy = await catalogue_store.busy_ranges(
                connection,
                [
                    (c.therapist.therapist_id, *busy_window(schedule, query.duration, query.start, query.end))
                    for c, schedule in zip(candidates, schedules, strict=True)
                ],
            )
        return [
            (c, schedule, busy[c.therapist.therapist_id]) for c, schedule in zip(candidates, schedules, strict=True)
        ]


def common_step(session_types: Sequence[SessionType]) -> timedelta:
    """The grid on which a start is bookable with every one of `session_types`: the least common
    multiple of their steps (each divides an hour, so this is at most an hour), the default grid
    when there are none."""
    if not session_types:
        return DEFAULT_START_STEP
    return timedelta(minutes=math.lcm(*(session_type.start_step_minutes for session_type in session_types)))
