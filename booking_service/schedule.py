"""A therapist's schedule (weekly hours and date overrides in local wall-clock time), its
validation, and its expansion into bookable UTC intervals.

Pure domain logic (standard library only, no I/O). Schedules are written in the therapist's
local wall-clock time (naive ``time`` values) plus an IANA zone name; they are converted to UTC
per local calendar date, so "09:00-17:00" stays 09:00-17:00 local on both sides of a DST change.
An empty ``Interval`` is a contract violation (asserted), as in local_time.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from itertools import pairwise
from types import MappingProxyType
from zoneinfo import ZoneInfo

from booking_service.local_time import (
    ONE_DAY,
    ZERO,
    InvalidSchedule,
    gap_end_instant,
    iso_z,
    require_utc,
    utc_candidates,
    zone,
)

# ------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class LocalWindow:
    """Wall-clock hours within one local day, ``[start, end)``; naive times.

    ``end == time.max`` (23:59:59.999999) means "until midnight": the window then
    ends at the next local day's 00:00, so it touches (and merges with) a window
    starting at 00:00 the following day. Checked by ``Schedule.validate``.
    """

    start: time
    end: time


@dataclass(frozen=True)
class WeeklyWindow:
    """A recurring ``LocalWindow`` on ``weekday`` (0 = Monday .. 6 = Sunday)."""

    weekday: int
    start: time
    end: time


@dataclass(frozen=True)
class Interval:
    """Half-open UTC interval ``[start, end)``, ``start < end``; normalised to ``timezone.utc``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        start = require_utc(self.start, "Interval.start")
        end = require_utc(self.end, "Interval.end")
        assert start < end, f"Interval must be non-empty, got [{iso_z(start)}, {iso_z(end)})"
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    def overlaps(self, other: Interval) -> bool:
        # Half-open: intervals that merely touch do not overlap.
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True)
class Schedule:
    """A therapist's bookable hours.

    ``overrides[d]`` replaces the weekly windows for local date ``d`` entirely:
    ``()`` is a day off, otherwise those windows are that day's hours.
    Construction copies ``weekly``/``overrides`` into immutable containers but
    does not validate; call ``validate()`` (every public function here does).
    """

    time_zone: str
    weekly: tuple[WeeklyWindow, ...]
    overrides: Mapping[date, tuple[LocalWindow, ...]]
    buffer_before: timedelta = timedelta(0)
    buffer_after: timedelta = timedelta(0)
    minimum_notice: timedelta = timedelta(0)
    booking_horizon: timedelta = timedelta(days=90)

    def __post_init__(self) -> None:
        # Frozen is only skin-deep with a caller-owned dict; snapshot it.
        object.__setattr__(self, "weekly", tuple(self.weekly))
        frozen = {day: tuple(windows) for day, windows in self.overrides.items()}
        object.__setattr__(self, "overrides", MappingProxyType(frozen))

    def validate(self) -> None:
        """Raise ``UnknownTimeZone``/``InvalidSchedule`` naming the offending field. A schedule
        is immutable, so one that passed once passes again: the check runs once per instance
        (the service keeps schedules in memory and checks every booking against one)."""
        if self.__dict__.get("_valid"):
            return
        zone(self.time_zone)
        self._validate_weekly()
        self._validate_overrides()
        for name in ("buffer_before", "buffer_after", "minimum_notice"):
            _check_duration(getattr(self, name), name, allow_zero=True)
        _check_duration(self.booking_horizon, "booking_horizon", allow_zero=False)
        object.__setattr__(self, "_valid", True)

    def _validate_weekly(self) -> None:
        by_weekday: dict[int, list[tuple[time, time, str]]] = {}
        for index, window in enumerate(self.weekly):
            path = f"weekly[{index}]"
            if not isinstance(window, WeeklyWindow):
                raise InvalidSchedule(f"{path} must be a WeeklyWindow", field=path)
            weekday = window.weekday
            if isinstance(weekday, bool) or not isinstance(weekday, int) or not 0 <= weekday <= 6:
                raise InvalidSchedule(
                    f"{path}.weekday must be 0 (Monday) .. 6 (Sunday), got {weekday!r}",
                    field=f"{path}.weekday",
                )
            _check_window_times(window.start, window.end, path)
            by_weekday.setdefault(weekday, []).append((window.start, window.end, path))
        for windows in by_weekday.values():
            _check_no_overlap(windows)

    def _validate_overrides(self) -> None:
        for day, windows in self.overrides.items():
            # datetime is a date subclass, but a datetime key would never match
            # the plain dates used during expansion.
            if not isinstance(day, date) or isinstance(day, datetime):
                raise InvalidSchedule(f"override keys must be dates, got {day!r}", field="overrides")
            day_path = f"overrides[{day.isoformat()}]"
            checked: list[tuple[time, time, str]] = []
            for index, window in enumerate(windows):
                path = f"{day_path}[{index}]"
                if not isinstance(window, LocalWindow):
                    raise InvalidSchedule(f"{path} must be a LocalWindow", field=path)
                _check_window_times(window.start, window.end, path)
                checked.append((window.start, window.end, path))
            _check_no_overlap(checked)


def _check_window_times(start: time, end: time, path: str) -> None:
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, time) or value.tzinfo is not None:
            raise InvalidSchedule(
                f"{path}.{name} must be a naive wall-clock time, got {value!r}",
                field=f"{path}.{name}",
            )
    if end <= start:
        raise InvalidSchedule(
            f"{path} must end after it starts (got {start.isoformat()}-{end.isoformat()}); "
            "split windows that cross midnight",
            field=f"{path}.end",
        )


def _check_no_overlap(windows: list[tuple[time, time, str]]) -> None:
    # Touching windows (09:00-12:00, 12:00-13:00) are fine: they merge.
    ordered = sorted(windows, key=lambda window: (window[0], window[1]))
    for (_, previous_end, previous_path), (start, _, path) in pairwise(ordered):
        if start < previous_end:
            raise InvalidSchedule(
                f"{path} overlaps {previous_path} on the same day",
                field=path,
                metadata={"conflicts_with": previous_path},
            )


def _check_duration(value: timedelta, name: str, *, allow_zero: bool) -> None:
    if not isinstance(value, timedelta):
        raise InvalidSchedule(f"{name} must be a timedelta, got {value!r}", field=name)
    if value < ZERO or (value == ZERO and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise InvalidSchedule(f"{name} must be {bound}, got {value}", field=name)


def check_session_duration(duration: timedelta) -> None:
    if not isinstance(duration, timedelta) or duration <= ZERO:
        raise InvalidSchedule(f"duration must be positive, got {duration!r}", field="duration")


# ----------------------------------------------------------------------- expansion


def _boundary_instant(tz: ZoneInfo, local: datetime, *, is_end: bool) -> datetime:
    """UTC instant for a window boundary; see ``availability_intervals`` for the rules."""
    valid, lowest, highest = utc_candidates(local, tz)
    if not valid:
        return gap_end_instant(tz, lowest, highest)
    # Overlap: start at the first occurrence, end at the second, so the window
    # keeps (at least) its full wall-clock length.
    return valid[-1] if is_end else valid[0]


def _window_instants(tz: ZoneInfo, day: date, start: time, end: time) -> tuple[datetime, datetime] | None:
    try:
        start_local = datetime.combine(day, start)
        end_local = datetime.combine(day + ONE_DAY, time(0)) if end == time.max else datetime.combine(day, end)
        start_instant = _boundary_instant(tz, start_local, is_end=False)
        end_instant = _boundary_instant(tz, end_local, is_end=True)
    except OverflowError:
        # Only at the very ends of datetime's range; such a window is unusable.
        return None
    # A window entirely inside a gap collapses to nothing.
    return (start_instant, end_instant) if start_instant < end_instant else None


def _local_date(instant: datetime, tz: ZoneInfo) -> date:
    try:
        return instant.astimezone(tz).date()
    except OverflowError:
        # At the edge of datetime's range; the UTC date is within a day and the
        # caller pads by a day anyway.
        return instant.date()


def _shift_date(day: date, days: int) -> date:
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return date.max if days > 0 else date.min


def merge(intervals: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sort and merge overlapping or touching intervals."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def merged_availability(
    schedule: Schedule, tz: ZoneInfo, low: datetime, high: datetime
) -> list[tuple[datetime, datetime]]:
    """Merged, unclipped availability from every local date that could touch ``[low, high]``.

    One day of padding each side catches windows ending at midnight
    (``time.max``) and keeps results independent of how the range cuts a day.
    """
    weekly: dict[int, list[WeeklyWindow]] = {}
    for weekly_window in schedule.weekly:
        weekly.setdefault(weekly_window.weekday, []).append(weekly_window)
    raw: list[tuple[datetime, datetime]] = []
    day = _shift_date(_local_date(low, tz), -1)
    last_day = _shift_date(_local_date(high, tz), 1)
    while day <= last_day:
        windows: Sequence[LocalWindow | WeeklyWindow] = (
            schedule.overrides[day] if day in schedule.overrides else weekly.get(day.weekday(), [])
        )
        for window in windows:
            instants = _window_instants(tz, day, window.start, window.end)
            if instants is not None:
                raw.append(instants)
        if day == date.max:
            break
        day += ONE_DAY
    return merge(raw)


def availability_intervals(schedule: Schedule, range_start: datetime, range_end: datetime) -> list[Interval]:
    """Bookable UTC intervals within ``[range_start, range_end)``: sorted, disjoint, clipped.

    Each local calendar date in the therapist's zone uses its override windows
    if it has an override, else its weekday's weekly windows; each window is
    converted to UTC separately for its own date, so wall-clock hours are kept
    across DST changes (their UTC instants shift instead). Touching or
    overlapping intervals are merged. An empty or reversed range gives ``[]``.

    Window boundaries at wall times that do not occur once:

    * In a spring-forward gap (e.g. 01:30 in London on 2026-03-29), a start or
      end boundary moves to the instant the gap ends (the first valid instant,
      03-29T01:00Z = 02:00 BST). So 00:00-04:00 that day lasts 3 real hours, a
      01:30-03:00 window becomes [01:00Z, 02:00Z), and a window lying entirely
      in the gap (01:15-01:45) disappears.
    * In a fall-back overlap (01:30 in London on 2026-10-25), a start uses the
      EARLIER instant (first occurrence) and an end the LATER instant (second
      occurrence), so the window never loses wall-clock time: 01:30-03:00 that
      day is [00:30Z, 03:00Z), 2.5 real hours.
    * An end of ``time.max`` means the next local midnight (converted with the
      same rules).

    Intervals whose end is not after their start are never produced.
    """
    schedule.validate()
    range_start = require_utc(range_start, "range_start")
    range_end = require_utc(range_end, "range_end")
    if range_end <= range_start:
        return []
    tz = zone(schedule.time_zone)
    clipped: list[Interval] = []
    for available_start, available_end in merged_availability(schedule, tz, range_start, range_end):
        start, end = max(available_start, range_start), min(available_end, range_end)
        if start < end:
            clipped.append(Interval(start, end))
    return clipped
