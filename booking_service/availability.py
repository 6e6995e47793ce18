"""Therapist availability: what a session takes from the calendar, whether it may be booked,
and the free slots. Built on schedule.py (weekly hours, overrides, buffers, notice, horizon) and
local_time.py (zones, local times); their names are re-exported here, the module every caller
uses.

Pure domain logic (standard library only, no I/O). Every instant is a timezone-aware UTC
``datetime`` (see local_time.py); ``max_slots <= 0`` is a contract violation (asserted).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime, timedelta

from booking_service.local_time import (
    RESOLUTION,
    ZERO,
    AmbiguousLocalTime,
    AvailabilityError,
    Disambiguation,
    InvalidSchedule,
    NonexistentLocalTime,
    OutsideAvailability,
    TooFarAhead,
    TooSoon,
    UnknownTimeZone,
    iso_z,
    local_rendering,
    require_utc,
    resolve_local,
    zone,
)
from booking_service.schedule import (
    Interval,
    LocalWindow,
    Schedule,
    WeeklyWindow,
    availability_intervals,
    check_session_duration,
    merge,
    merged_availability,
)

__all__ = [
    "AmbiguousLocalTime",
    "AvailabilityError",
    "Disambiguation",
    "Interval",
    "InvalidSchedule",
    "LocalWindow",
    "NonexistentLocalTime",
    "OutsideAvailability",
    "Schedule",
    "TooFarAhead",
    "TooSoon",
    "UnknownTimeZone",
    "WeeklyWindow",
    "availability_intervals",
    "check_bookable",
    "free_slots",
    "local_rendering",
    "resolve_local",
    "session_blocked_interval",
    "zone",
]

# ------------------------------------------------------------------------ sessions


def session_blocked_interval(schedule: Schedule, start: datetime, duration: timedelta) -> Interval:
    """``[start - buffer_before, start + duration + buffer_after)``, in real elapsed time.

    Two sessions conflict iff their blocked intervals overlap, i.e. consecutive
    sessions need a gap of at least ``buffer_after + buffer_before``. The
    database's EXCLUDE constraint must use this same range.
    """
    schedule.validate()
    start = require_utc(start, "start")
    check_session_duration(duration)
    return Interval(start - schedule.buffer_before, start + duration + schedule.buffer_after)


def check_bookable(schedule: Schedule, start: datetime, duration: timedelta, now: datetime) -> None:
    """Raise unless a session ``[start, start + duration)`` may be booked at ``now``.

    Checks, in order: duration > 0 (``InvalidSchedule``, field "duration");
    ``start >= now + minimum_notice`` (``TooSoon``); ``start <= now +
    booking_horizon`` (``TooFarAhead``); the session lies within one merged
    availability interval (``OutsideAvailability``). Buffers may extend outside
    availability. Conflicts with other sessions are not checked here.
    """
    schedule.validate()
    start = require_utc(start, "start")
    now = require_utc(now, "now")
    check_session_duration(duration)
    earliest = now + schedule.minimum_notice
    if start < earliest:
        raise TooSoon(
            f"sessions need {schedule.minimum_notice} notice; the earliest start now is {iso_z(earliest)}",
            field="start",
            metadata={"earliest_start": iso_z(earliest)},
        )
    latest = now + schedule.booking_horizon
    if start > latest:
        raise TooFarAhead(
            f"sessions can be booked at most {schedule.booking_horizon} ahead; the latest start now is {iso_z(latest)}",
            field="start",
            metadata={"latest_start": iso_z(latest)},
        )
    end = start + duration
    # Clipped to the session itself, the merged availability covers it iff it
    # comes back as exactly one interval equal to the session.
    covered = availability_intervals(schedule, start, end)
    if covered != [Interval(start, end)]:
        local_start = local_rendering(start, schedule.time_zone)
        local_end = local_rendering(end, schedule.time_zone)
        raise OutsideAvailability(
            f"{local_start} to {local_end} is not within the therapist's available hours",
            field="start",
            metadata={"time_zone": schedule.time_zone, "local_start": local_start, "local_end": local_end},
        )


def _grid_at_or_after(anchor: datetime, step: timedelta, bound: datetime) -> datetime:
    """Smallest ``anchor + k * step`` (k >= 0) that is ``>= bound``."""
    if bound <= anchor:
        return anchor
    return anchor - ((anchor - bound) // step) * step


# The agreed API is positional; RUF100 is silenced too because ad-hoc runs that
# do not enable PLR0917 would otherwise flag this noqa as unused.
def free_slots(  # noqa: PLR0917, RUF100
    schedule: Schedule,
    duration: timedelta,
    range_start: datetime,
    range_end: datetime,
    now: datetime,
    busy: Sequence[Interval],
    step: timedelta | None = None,
    max_slots: int = 1000,
) -> list[Interval]:
    """Bookable session intervals of length ``duration``, sorted by start, at most ``max_slots``.

    Candidates start at the start of each merged availability interval and then
    every ``step`` (default ``duration``) of real time; the grid is anchored at
    the availability start, not at ``range_start`` or ``now``, so it is stable
    across queries (for availability that runs continuously across the
    expansion edge, the anchor is the first window start on the local date
    before ``range_start``/``now + minimum_notice``). A candidate is kept if it
    fits in that availability interval, starts in ``[range_start, range_end)``,
    satisfies notice and horizon, and its blocked interval (with buffers)
    overlaps nothing in ``busy`` (blocked intervals of existing sessions).
    """
    schedule.validate()
    check_session_duration(duration)
    step = duration if step is None else step
    if not isinstance(step, timedelta) or step <= ZERO:
        raise InvalidSchedule(f"step must be positive, got {step!r}", field="step")
    # A hard bound on the response size, so it must be a real positive bound.
    assert isinstance(max_slots, int), f"max_slots must be an int, got {max_slots!r}"
    assert max_slots > 0, f"max_slots must be positive, got {max_slots}"
    range_start = require_utc(range_start, "range_start")
    range_end = require_utc(range_end, "range_end")
    now = require_utc(now, "now")
    earliest = max(range_start, now + schedule.minimum_notice)
    # Starts must be < range_end and <= now + horizon; instants have
    # microsecond resolution, so "< range_end" is "<= range_end - 1 us".
    latest = min(range_end - RESOLUTION, now + schedule.booking_horizon)
    if earliest > latest:
        return []
    blocked = merge((interval.start, interval.end) for interval in busy)
    blocked_starts = [start for start, _ in blocked]
    tz = zone(schedule.time_zone)
    slots: list[Interval] = []
    for available_start, available_end in merged_availability(schedule, tz, earliest, latest + duration):
        last_start = min(latest, available_end - duration)
        candidate = _grid_at_or_after(available_start, step, earliest)
        while candidate <= last_start:
            block_start = candidate - schedule.buffer_before
            block_end = candidate + duration + schedule.buffer_after
            # ``blocked`` is disjoint and sorted, so only the last busy interval
            # starting before block_end can reach back into the block.
            index = bisect_left(blocked_starts, block_end) - 1
            if index >= 0 and blocked[index][1] > block_start:
                # Jump to the first grid point whose block clears this busy
                # interval instead of walking the grid through it.
                clear_from = blocked[index][1] + schedule.buffer_before
                candidate = _grid_at_or_after(available_start, step, max(clear_from, candidate + step))
                continue
            slots.append(Interval(candidate, candidate + duration))
            if len(slots) >= max_slots:
                return slots
            candidate += step
    return slots
