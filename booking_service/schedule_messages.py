"""booking.v1 schedule messages and the stored schedule, both ways: weekly windows and date
overrides as messages, "HH:MM" windows and "YYYY-MM-DD" dates from a request (each bad field a
BadRequest violation), and a schedule rule's refusal renamed to the request's fields."""

from __future__ import annotations

import re
from datetime import date

from booking.v1 import booking_pb2
from booking_service.domain import MINUTES_PER_DAY, DateOverride, WeeklyWindowMinutes
from service_kit.errors import FieldViolation, InvalidArgument
from service_kit.validation import Checks

_HOUR_MINUTE = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
# How availability's schedule rules name a window (see booking_service.availability.Schedule).
_SCHEDULE_PATH = re.compile(r"\b(?:weekly|overrides\[[^\]]*\])\[(\d+)\]")


def _minute_text(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def window_message(start_minute: int, end_minute: int) -> booking_pb2.TimeWindow:
    return booking_pb2.TimeWindow(start_time=_minute_text(start_minute), end_time=_minute_text(end_minute))


def weekly_message(window: WeeklyWindowMinutes) -> booking_pb2.WeeklyWindow:
    return booking_pb2.WeeklyWindow(
        day_of_week=window.weekday,  # type: ignore[arg-type]  # ISO weekday == DayOfWeek number
        window=window_message(window.start_minute, window.end_minute),
    )


def override_message(override: DateOverride) -> booking_pb2.DateOverride:
    return booking_pb2.DateOverride(
        date=override.local_date, windows=[window_message(start, end) for start, end in override.windows]
    )


def _parse_minute(checks: Checks, field: str, text: str, *, allow_end_of_day: bool) -> int:
    match = _HOUR_MINUTE.match(text)
    if match is None:
        checks.fail(field, 'must be "HH:MM" (24-hour), e.g. "09:30"')
        return 0
    minute = int(match.group(1)) * 60 + int(match.group(2))
    if minute > MINUTES_PER_DAY or (minute == MINUTES_PER_DAY and not allow_end_of_day):
        checks.fail(field, "must be at most 24:00 (as an end) or 23:59 (as a start)")
        return 0
    return minute


def parse_window(checks: Checks, field: str, window: booking_pb2.TimeWindow) -> tuple[int, int]:
    start = _parse_minute(checks, f"{field}.start_time", window.start_time, allow_end_of_day=False)
    end = _parse_minute(checks, f"{field}.end_time", window.end_time, allow_end_of_day=True)
    if start >= end and _HOUR_MINUTE.match(window.start_time) and _HOUR_MINUTE.match(window.end_time):
        checks.fail(f"{field}.end_time", "must be after start_time")
    return start, end


def parse_date(checks: Checks, field: str, text: str) -> str:
    try:
        parsed = date.fromisoformat(text)
    except ValueError:
        checks.fail(field, 'must be a date "YYYY-MM-DD"')
        return "2000-01-01"
    if len(text) != len("YYYY-MM-DD") or not 2000 <= parsed.year < 2100:
        checks.fail(field, 'must be a date "YYYY-MM-DD" between 2000 and 2099')
    return parsed.isoformat()


def in_request_terms(error: InvalidArgument) -> InvalidArgument:
    """A schedule rule's refusal with its paths (weekly[1], overrides[2030-01-02][1]) renamed to
    the request's field, windows[1]: the service receives the request's windows in order."""

    def rename(text: str) -> str:
        return _SCHEDULE_PATH.sub(r"windows[\1]", text)

    renamed = InvalidArgument(
        [FieldViolation(rename(v.field), rename(v.description)) for v in error.violations], reason=error.reason
    )
    renamed.metadata.update({key: rename(value) for key, value in error.metadata.items() if key != "field"})
    return renamed
