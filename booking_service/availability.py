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
    OffGrid,
    OutsideAvailability,
    TooFarAhead,
    TooSoon,
    UnknownTimeZone,
    gap_end_instant,
    iso_z,
    local_rendering,
    require_utc,
    resolve_local,
    spoken,
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
    "DEFAULT_START_STEP",
    "AmbiguousLocalTime",
    "AvailabilityError",
    "Disambiguation",
    "Interval",
    "InvalidSchedule",
    "LocalWindow",
    "NonexistentLocalTime",
    "OffGrid",
    "OutsideAvailability",
    "Schedule",
    "TooFarAhead",
    "TooSoon",
    "UnknownTimeZone",
    "WeeklyWindow",
    "availability_intervals",
    "check_bookable",
    "free_slots",
    "grid_start_at_or_after",
    "local_rendering",
    "on_grid",
    "resolve_local",
    "session_blocked_interval",
    "zone",
]

# The grid of starts of a session type that does not say otherwise.
DEFAULT_START_STEP = timedelta(minutes=15)
_MINUTE = timedelta(minutes=1)
_MINUTES_PER_DAY = 1440
# Each turn of the grid search either answers or crosses one change of the zone's offset.
_MAX_OFFSET_CHANGES = 8

# ------------------------------------------------------------------------ the grid


def grid_start_at_or_after(instant: datetime, time_zone: str, step: timedelta) -> datetime:
    """The first bookable start at or after ``instant``: THE definition of the grid of starts,
    which the listing walks and the check asks (``on_grid``).

    Starts lie every ``step`` (whole minutes) of the therapist's local wall-clock time, counted
    from each local midnight (00:00, 00:15, 00:30, ... for 15 minutes), so 09:00 stays on the grid
    across a DST change. A wall time that occurs twice (clocks going back) is on the grid twice;
    one in a gap (clocks going forward) does not occur. Works in UTC within each span of one UTC
    offset, and starts again where the offset changes.
    """
    instant = require_utc(instant, "instant")
    assert step >= _MINUTE and step % _MINUTE == ZERO, f"step must be whole minutes, got {step!r}"
    tz = zone(time_zone)
    step_minutes = step // _MINUTE
    # Whole UTC minutes: every offset since 1972 is whole minutes, so these are whole wall minutes too.
    candidate = instant + (-(instant - instant.replace(second=0, microsecond=0)) % _MINUTE)
    for _ in range(_MAX_OFFSET_CHANGES):
        wall = candidate.astimezone(tz)
        minute_of_day = wall.hour * 60 + wall.minute
        ahead = min(-minute_of_day % step_minutes, _MINUTES_PER_DAY - minute_of_day)
        found = candidate + ahead * _MINUTE
        if found.astimezone(tz).utcoffset() == wall.utcoffset():
            return found
        candidate = gap_end_instant(tz, candidate, found)  # the offset changed on the way
    raise AssertionError(f"no grid start found after {iso_z(instant)} in {time_zone}")


def on_grid(instant: datetime, time_zone: str, step: timedelta) -> bool:
    """Whether ``instant`` is a start of the grid (``grid_start_at_or_after``)."""
    return grid_start_at_or_after(instant, time_zone, step) == require_utc(instant, "instant")


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


def check_bookable(
    schedule: Schedule, start: datetime, duration: timedelta, now: datetime, *, step: timedelta = DEFAULT_START_STEP
) -> None:
    """Raise unless a session ``[start, start + duration)`` may be booked at ``now``.

    Checks, in order: duration > 0 (``InvalidSchedule``, field "duration");
    ``start >= now + minimum_notice`` (``TooSoon``); ``start <= now +
    booking_horizon`` (``TooFarAhead``); the session lies within one merged
    availability interval (``OutsideAvailability``); the start is on the grid of
    ``step`` (``OffGrid``; ``grid_start_at_or_after``, which the listing walks).
    Buffers may extend outside availability. Conflicts with other sessions are
    not checked here.
    """
    schedule.validate()
    start = require_utc(start, "start")
    now = require_utc(now, "now")
    check_session_duration(duration)
    earliest = now + schedule.minimum_notice
    if start < earliest:
        raise TooSoon(
            f"sessions need {spoken(schedule.minimum_notice)} notice; the earliest start now is {iso_z(earliest)}",
            field="start",
            metadata={"earliest_start": iso_z(earliest)},
        )
    latest = now + schedule.booking_horizon
    if start > latest:
        raise TooFarAhead(
            f"sessions can be booked at most {spoken(schedule.booking_horizon)} ahead; "
            f"the latest start now is {iso_z(latest)}",
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
    if not on_grid(start, schedule.time_zone, step):
        local_start = local_rendering(start, schedule.time_zone)
        before = grid_start_at_or_after(start - step, schedule.time_zone, step)
        after = grid_start_at_or_after(start, schedule.time_zone, step)
        raise OffGrid(
            f"{local_start} is not a start of this session type: starts are every {spoken(step)} "
            f"from local midnight, e.g. {local_rendering(before, schedule.time_zone)} or "
            f"{local_rendering(after, schedule.time_zone)}",
            field="start",
            metadata={
                "time_zone": schedule.time_zone,
                "local_start": local_start,
                "step_minutes": str(step // _MINUTE),
            },
        )


# The agreed API is positional; RUF100 is silenced too because ad-hoc runs that
# do not enable PLR0917 would otherwise flag this noqa as unused.
def free_slots(  # noqa: PLR0917, RUF100
    schedule: Schedule,
    duration: timedelta,
    range_start: datetime,
    range_end: datetime,
    now: datetime,
    busy: Sequence[Interval],
    step: timedelta = DEFAULT_START_STEP,
    max_slots: int = 1000,
) -> list[Interval]:
    """Bookable session intervals of length ``duration``, sorted by start, at most ``max_slots``.

    Candidates are the starts of the grid of ``step`` in the therapist's local time
    (``grid_start_at_or_after``, the definition ``check_bookable`` asks too), so the listing
    offers exactly the starts a booking may take. A candidate is kept if it fits in one merged
    availability interval, starts in ``[range_start, range_end)``, satisfies notice and horizon,
    and its blocked interval (with buffers) overlaps nothing in ``busy`` (blocked intervals of
    existing sessions).
    """
    schedule.validate()
    check_session_duration(duration)
    if not isinstance(step, timedelta) or step < _MINUTE or step % _MINUTE != ZERO:
        raise InvalidSchedule(f"step must be whole minutes, got {step!r}", field="step")
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
        candidate = grid_start_at_or_after(max(available_start, earliest), schedule.time_zone, step)
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
                candidate = grid_start_at_or_after(max(clear_from, candidate + RESOLUTION), schedule.time_zone, step)
                continue
            slots.append(Interval(candidate, candidate + duration))
            if len(slots) >= max_slots:
                return slots
            candidate = grid_start_at_or_after(candidate + RESOLUTION, schedule.time_zone, step)
    return slots
