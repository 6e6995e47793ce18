"""Time zones and local wall-clock times: IANA zone names, local times resolved to instants
(gaps refused, overlaps disambiguated), instants rendered in a zone, and the errors of the
availability rules (availability.py, schedule.py).

Pure domain logic (standard library only, no I/O). Conventions:

* Every instant entering or leaving this module is a timezone-aware UTC
  ``datetime``. Instants are normalised to ``datetime.timezone.utc`` on entry, so
  all arithmetic is real elapsed time (aware arithmetic on a ``ZoneInfo``
  datetime would be wall-clock arithmetic and silently wrong across DST).
* Caller mistakes in user-facing data raise an ``AvailabilityError`` subclass with
  a stable ``reason`` and the offending ``field``. Contract violations by the
  calling code (naive or non-UTC instants, a tz-aware ``local`` in
  ``resolve_local``) are asserted: they are bugs in the caller, not client errors.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

ONE_DAY = timedelta(days=1)
# datetime's resolution; used to turn "< x" into "<= x - RESOLUTION" and as the
# precision of the transition search.
RESOLUTION = timedelta(microseconds=1)
ZERO = timedelta(0)

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


class OffGrid(AvailabilityError):
    """The start is not on the session type's grid of starts (availability.grid_start_at_or_after)."""

    reason = "START_OFF_GRID"


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


def require_utc(value: datetime, name: str) -> datetime:
    """Check an instant is aware with a zero UTC offset and normalise it to ``timezone.utc``."""
    assert isinstance(value, datetime), f"{name} must be a datetime, got {value!r}"
    # utcoffset() is None for naive datetimes, which fails this too.
    assert value.utcoffset() == ZERO, f"{name} must be a timezone-aware UTC datetime, got {value!r}"
    return value.astimezone(UTC)


def iso_z(instant: datetime) -> str:
    return instant.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def utc_candidates(local: datetime, tz: ZoneInfo) -> tuple[list[datetime], datetime, datetime]:
    """Map a naive wall time to UTC.

    Returns ``(valid, lowest, highest)``: ``valid`` holds the sorted distinct UTC
    instants that really show this wall time (0 in a gap, 2 in an overlap, else
    1); ``lowest``/``highest`` are the raw fold=0/fold=1 conversions, which
    bracket the transition when the time is in a gap. Validity is decided by
    round-tripping rather than trusting ``fold`` semantics alone.
    """
    raw = [local.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)]
    valid = sorted({instant for instant in raw if wall(instant, tz) == local})
    return valid, min(raw), max(raw)


def gap_end_instant(tz: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """First instant carrying ``after``'s UTC offset, searched in ``(before, after]``.

    For a wall time inside a gap, the fold=1 conversion lies before the
    transition and the fold=0 one at or after it, so this finds the transition:
    the instant the gap ends. zoneinfo does not expose transitions, hence the
    bisection (about 40 steps even for a day-long gap).
    """
    target = after.astimezone(tz).utcoffset()
    while after - before > RESOLUTION:
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
        valid, lowest, highest = utc_candidates(local, tz)
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
        f"it is either {iso_z(valid[0])} or {iso_z(valid[-1])}: choose EARLIER or LATER",
        field=field,
        metadata={
            **details,
            "earlier_instant": iso_z(valid[0]),
            "later_instant": iso_z(valid[-1]),
        },
    )


def _nonexistent(
    tz: ZoneInfo, lowest: datetime, highest: datetime, field: str, details: dict[str, str]
) -> NonexistentLocalTime:
    transition = gap_end_instant(tz, lowest, highest)
    offset_before = (transition - RESOLUTION).astimezone(tz).utcoffset() or ZERO
    gap_start = (transition + offset_before).replace(tzinfo=None)
    gap_end = wall(transition, tz)
    return NonexistentLocalTime(
        f"{details['local_time']} does not exist in {details['time_zone']}: clocks jump "
        f"from {gap_start.isoformat()} to {gap_end.isoformat()} (at {iso_z(transition)})",
        field=field,
        metadata={
            **details,
            "gap_start": gap_start.isoformat(),
            "gap_end": gap_end.isoformat(),
        },
    )


def local_rendering(instant: datetime, time_zone: str) -> str:
    """ISO 8601 wall time with offset, e.g. ``2026-03-29T09:00:00+01:00``."""
    return require_utc(instant, "instant").astimezone(zone(time_zone)).isoformat()


def spoken(duration: timedelta) -> str:
    """A duration as people say it in a message: "24 hours", "90 days", "1 hour 30 minutes",
    "45 minutes" (not ``1 day, 0:00:00``). Whole days from 2 days up, else hours and minutes."""
    total_s = int(duration.total_seconds())
    if total_s % 86_400 == 0 and total_s >= 2 * 86_400:
        return _count(total_s // 86_400, "day")
    hours, rest_s = divmod(total_s, 3_600)
    minutes, seconds = divmod(rest_s, 60)
    parts = [_count(hours, "hour")] if hours else []
    if minutes:
        parts.append(_count(minutes, "minute"))
    if seconds or not parts:
        parts.append(_count(seconds, "second"))
    return " ".join(parts)


def _count(number: int, unit: str) -> str:
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"
