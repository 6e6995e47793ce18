"""Therapist availability: weekly hours, date overrides, buffers, notice and horizon.

Pure domain logic (standard library only, no I/O) shared by the booking service
handlers. Conventions:

* Every instant entering or leaving this module is a timezone-aware UTC
  ``datetime``. Instants are normalised to ``datetime.timezone.utc`` on entry, so
  all arithmetic below is real elapsed time (aware arithmetic on a ``ZoneInfo``
  datetime would be wall-clock arithmetic and silently wrong across DST).
* Schedules are written in the therapist's local wall-clock time (naive
  ``time`` values) plus an IANA zone name; they are converted to UTC per local
  calendar date, so "09:00-17:00" stays 09:00-17:00 local on both sides of a DST
  change.
* Caller mistakes in user-facing data raise an ``AvailabilityError`` subclass with
  a stable ``reason`` and the offending ``field``. Contract violations by the
  calling code (naive or non-UTC instants, a tz-aware ``local`` in
  ``resolve_local``, an empty ``Interval``, ``max_slots <= 0``) are asserted:
  they are bugs in the caller, not client errors.
"""

from __future__ import annotations

import enum
import functools
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from types import MappingProxyType
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

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

_ONE_DAY = timedelta(days=1)
# datetime's resolution; used to turn "< x" into "<= x - _RESOLUTION" and as the
# precision of the transition search.
_RESOLUTION = timedelta(microseconds=1)
_ZERO = timedelta(0)


# --------------------------------------------------------------------------- errors


class AvailabilityError(Exception):
    """Base class: a client-visible availability/scheduling error.

    ``reason`` is a stable UPPER_SNAKE identifier (suitable for an ErrorInfo
    reason), ``field`` names the offending request/schedule field when there is
    one, and ``metadata`` holds machine-readable details (all strings).
    """

    # Subclasses override; the base value only exists so a stray base instance
    # still has a usable reason.
    reason: ClassVar[str] = "AVAILABILITY_ERROR"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructor arguments are lost by Exception's default
        # pickling; keep them so errors survive process boundaries intact.
        return (type(self), (self.message,), {"field": self.field, "metadata": self.metadata})


class UnknownTimeZone(AvailabilityError):
    reason = "UNKNOWN_TIME_ZONE"


class NonexistentLocalTime(AvailabilityError):
    """The wall-clock time falls in a spring-forward gap."""

    reason = "NONEXISTENT_LOCAL_TIME"


class AmbiguousLocalTime(AvailabilityError):
    """The wall-clock time occurs twice (fall-back) and no disambiguation was given."""

    reason = "AMBIGUOUS_LOCAL_TIME"


class InvalidSchedule(AvailabilityError):
    reason = "INVALID_SCHEDULE"


class OutsideAvailability(AvailabilityError):
    reason = "OUTSIDE_AVAILABILITY"


class TooSoon(AvailabilityError):
    reason = "INSUFFICIENT_NOTICE"


class TooFarAhead(AvailabilityError):
    reason = "BEYOND_BOOKING_HORIZON"


class Disambiguation(enum.Enum):
    UNSPECIFIED = 0
    EARLIER = 1
    LATER = 2


# ----------------------------------------------------------------------- time zones

# Every IANA zone name uses only these characters; screening them first keeps
# odd input (":", NUL, spaces, "\\") away from the filesystem lookup entirely.
_ZONE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/_-+")
_MAX_ZONE_NAME_LENGTH = 64
# "localtime" is the host's configured zone (not a stable IANA name); "Factory"
# is tzdata's placeholder for "no zone known" (abbreviation "-00"), not a place;
# "posixrules" is a file of default rules. "right/*" zones count leap seconds,
# which Python datetimes do not, so their UTC conversions would be off by ~27 s;
# "posix/*" repeats every zone under a second name.
_REJECTED_ZONE_NAMES = frozenset({"localtime", "Factory", "posixrules"})
_REJECTED_ZONE_PREFIXES = ("right/", "posix/")


@functools.cache
def _iana_names() -> frozenset[str]:
    """The zone and link names of the installed tz database (read once, on first use).

    Links ("UTC", "US/Eastern", "Europe/Kiev") are accepted as well as zones: tzdata itself
    turns zones into links between releases (Europe/Amsterdam became a link to
    Europe/Brussels in 2022b), so refusing links would refuse names people use
    and names already stored. A name is kept and returned as given.
    """
    return frozenset(available_timezones())


def zone(name: str) -> ZoneInfo:
    """Return the ``ZoneInfo`` for an IANA name or raise ``UnknownTimeZone(field="time_zone")``."""
    if not _is_plausible_zone_name(name):
        raise _unknown_zone(name)
    try:
        return ZoneInfo(name)
    # ZoneInfo raises ZoneInfoNotFoundError for missing keys, ValueError for
    # malformed keys or non-TZif files (e.g. "zone.tab"), OSError for odd
    # filesystem situations; all mean "not a usable zone" to the client.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise _unknown_zone(name) from exc


def _is_plausible_zone_name(name: object) -> bool:
    if not isinstance(name, str) or not name or len(name) > _MAX_ZONE_NAME_LENGTH:
        return False
    if not set(name) <= _ZONE_NAME_CHARS:
        return False
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return False
    if ".." in name or name in _REJECTED_ZONE_NAMES or name.startswith(_REJECTED_ZONE_PREFIXES):
        return False
    return name in _iana_names()


def _unknown_zone(name: object) -> UnknownTimeZone:
    shown = str(name)[:_MAX_ZONE_NAME_LENGTH]
    return UnknownTimeZone(
        f"unknown time zone {shown!r}: expected an IANA name such as 'Europe/London'",
        field="time_zone",
        metadata={"time_zone": shown},
    )


# ------------------------------------------------------------- instant conversions


def _require_utc(value: datetime, name: str) -> datetime:
    """Check an instant is aware with a zero UTC offset and normalise it to ``timezone.utc``."""
    assert isinstance(value, datetime), f"{name} must be a datetime, got {value!r}"
    # utcoffset() is None for naive datetimes, which fails this too.
    assert value.utcoffset() == _ZERO, f"{name} must be a timezone-aware UTC datetime, got {value!r}"
    return value.astimezone(UTC)


def _iso_z(instant: datetime) -> str:
    return instant.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def _utc_candidates(local: datetime, tz: ZoneInfo) -> tuple[list[datetime], datetime, datetime]:
    """Map a naive wall time to UTC.

    Returns ``(valid, lowest, highest)``: ``valid`` holds the sorted distinct UTC
    instants that really show this wall time (0 in a gap, 2 in an overlap, else
    1); ``lowest``/``highest`` are the raw fold=0/fold=1 conversions, which
    bracket the transition when the time is in a gap. Validity is decided by
    round-tripping rather than trusting ``fold`` semantics alone.
    """
    raw = [local.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)]
    valid = sorted({instant for instant in raw if _wall(instant, tz) == local})
    return valid, min(raw), max(raw)


def _gap_end_instant(tz: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """First instant carrying ``after``'s UTC offset, searched in ``(before, after]``.

    For a wall time inside a gap, the fold=1 conversion lies before the
    transition and the fold=0 one at or after it, so this finds the transition:
    the instant the gap ends. zoneinfo does not expose transitions, hence the
    bisection (about 40 steps even for a day-long gap).
    """
    target = after.astimezone(tz).utcoffset()
    while after - before > _RESOLUTION:
        middle = before + (after - before) / 2
        if middle.astimezone(tz).utcoffset() == target:
            after = middle
        else:
            before = middle
    return after


def resolve_local(
    local: datetime,
    time_zone: str,
    disambiguation: Disambiguation = Disambiguation.UNSPECIFIED,
    *,
    field: str = "local_start",
) -> datetime:
    """Convert a naive wall-clock ``local`` in ``time_zone`` to a UTC instant.

    A time in a spring-forward gap raises ``NonexistentLocalTime``. A time in a
    fall-back overlap raises ``AmbiguousLocalTime`` (metadata ``earlier_instant``
    and ``later_instant``) unless ``disambiguation`` picks EARLIER (first
    occurrence, the pre-transition offset) or LATER (second occurrence).
    """
    assert isinstance(local, datetime), f"{field} must be a datetime, got {local!r}"
    assert local.tzinfo is None, f"{field} must be a naive wall-clock datetime, got {local!r}"
    tz = zone(time_zone)
    details = {"time_zone": time_zone, "local_time": local.isoformat()}
    try:
        valid, lowest, highest = _utc_candidates(local, tz)
    except OverflowError as exc:
        # Near year 1 / 9999 the UTC instant is not representable at all.
        raise NonexistentLocalTime(
            f"{local.isoformat()} in {time_zone} is outside the representable range",
            field=field,
            metadata=details,
        ) from exc
    if not valid:
        raise _nonexistent(tz, lowest, highest, field, details)
    if len(valid) == 1:
        return valid[0]
    if disambiguation is Disambiguation.EARLIER:
        return valid[0]
    if disambiguation is Disambiguation.LATER:
        return valid[-1]
    raise AmbiguousLocalTime(
        f"{local.isoformat()} occurs twice in {time_zone} (clocks go back); "
        f"it is either {_iso_z(valid[0])} or {_iso_z(valid[-1])}: choose EARLIER or LATER",
        field=field,
        metadata={
            **details,
            "earlier_instant": _iso_z(valid[0]),
            "later_instant": _iso_z(valid[-1]),
        },
    )


def _nonexistent(
    tz: ZoneInfo, lowest: datetime, highest: datetime, field: str, details: dict[str, str]
) -> NonexistentLocalTime:
    transition = _gap_end_instant(tz, lowest, highest)
    offset_before = (transition - _RESOLUTION).astimezone(tz).utcoffset() or _ZERO
    gap_start = (transition + offset_before).replace(tzinfo=None)
    gap_end = _wall(transition, tz)
    return NonexistentLocalTime(
        f"{details['local_time']} does not exist in {details['time_zone']}: clocks jump "
        f"from {gap_start.isoformat()} to {gap_end.isoformat()} (at {_iso_z(transition)})",
        field=field,
        metadata={
            **details,
            "gap_start": gap_start.isoformat(),
            "gap_end": gap_end.isoformat(),
        },
    )


def local_rendering(instant: datetime, time_zone: str) -> str:
    """ISO 8601 wall time with offset, e.g. ``2026-03-29T09:00:00+01:00``."""
    return _require_utc(instant, "instant").astimezone(zone(time_zone)).isoformat()


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
        start = _require_utc(self.start, "Interval.start")
        end = _require_utc(self.end, "Interval.end")
        assert start < end, f"Interval must be non-empty, got [{_iso_z(start)}, {_iso_z(end)})"
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
    if value < _ZERO or (value == _ZERO and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise InvalidSchedule(f"{name} must be {bound}, got {value}", field=name)


def _check_session_duration(duration: timedelta) -> None:
    if not isinstance(duration, timedelta) or duration <= _ZERO:
        raise InvalidSchedule(f"duration must be positive, got {duration!r}", field="duration")


# ----------------------------------------------------------------------- expansion


def _boundary_instant(tz: ZoneInfo, local: datetime, *, is_end: bool) -> datetime:
    """UTC instant for a window boundary; see ``availability_intervals`` for the rules."""
    valid, lowest, highest = _utc_candidates(local, tz)
    if not valid:
        return _gap_end_instant(tz, lowest, highest)
    # Overlap: start at the first occurrence, end at the second, so the window
    # keeps (at least) its full wall-clock length.
    return valid[-1] if is_end else valid[0]


def _window_instants(tz: ZoneInfo, day: date, start: time, end: time) -> tuple[datetime, datetime] | None:
    try:
        start_local = datetime.combine(day, start)
        end_local = datetime.combine(day + _ONE_DAY, time(0)) if end == time.max else datetime.combine(day, end)
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


def _merge(intervals: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sort and merge overlapping or touching intervals."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _merged_availability(
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
        day += _ONE_DAY
    return _merge(raw)


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
    range_start = _require_utc(range_start, "range_start")
    range_end = _require_utc(range_end, "range_end")
    if range_end <= range_start:
        return []
    tz = zone(schedule.time_zone)
    clipped: list[Interval] = []
    for available_start, available_end in _merged_availability(schedule, tz, range_start, range_end):
        start, end = max(available_start, range_start), min(available_end, range_end)
        if start < end:
            clipped.append(Interval(start, end))
    return clipped


# ------------------------------------------------------------------------ sessions


def session_blocked_interval(schedule: Schedule, start: datetime, duration: timedelta) -> Interval:
    """``[start - buffer_before, start + duration + buffer_after)``, in real elapsed time.

    Two sessions conflict iff their blocked intervals overlap, i.e. consecutive
    sessions need a gap of at least ``buffer_after + buffer_before``. The
    database's EXCLUDE constraint must use this same range.
    """
    schedule.validate()
    start = _require_utc(start, "start")
    _check_session_duration(duration)
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
    start = _require_utc(start, "start")
    now = _require_utc(now, "now")
    _check_session_duration(duration)
    earliest = now + schedule.minimum_notice
    if start < earliest:
        raise TooSoon(
            f"sessions need {schedule.minimum_notice} notice; the earliest start now is {_iso_z(earliest)}",
            field="start",
            metadata={"earliest_start": _iso_z(earliest)},
        )
    latest = now + schedule.booking_horizon
    if start > latest:
        raise TooFarAhead(
            f"sessions can be booked at most {schedule.booking_horizon} ahead; "
            f"the latest start now is {_iso_z(latest)}",
            field="start",
            metadata={"latest_start": _iso_z(latest)},
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
    _check_session_duration(duration)
    step = duration if step is None else step
    if not isinstance(step, timedelta) or step <= _ZERO:
        raise InvalidSchedule(f"step must be positive, got {step!r}", field="step")
    # A hard bound on the response size, so it must be a real positive bound.
    assert isinstance(max_slots, int), f"max_slots must be an int, got {max_slots!r}"
    assert max_slots > 0, f"max_slots must be positive, got {max_slots}"
    range_start = _require_utc(range_start, "range_start")
    range_end = _require_utc(range_end, "range_end")
    now = _require_utc(now, "now")
    earliest = max(range_start, now + schedule.minimum_notice)
    # Starts must be < range_end and <= now + horizon; instants have
    # microsecond resolution, so "< range_end" is "<= range_end - 1 us".
    latest = min(range_end - _RESOLUTION, now + schedule.booking_horizon)
    if earliest > latest:
        return []
    blocked = _merge((interval.start, interval.end) for interval in busy)
    blocked_starts = [start for start, _ in blocked]
    tz = zone(schedule.time_zone)
    slots: list[Interval] = []
    for available_start, available_end in _merged_availability(schedule, tz, earliest, latest + duration):
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
