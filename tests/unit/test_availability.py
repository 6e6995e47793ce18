"""Unit tests for booking_service.availability (pure, synchronous, fast)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from booking_service.availability import (
    AmbiguousLocalTime,
    AvailabilityError,
    Disambiguation,
    Interval,
    InvalidSchedule,
    LocalWindow,
    NonexistentLocalTime,
    OffGrid,
    OutsideAvailability,
    Schedule,
    TooFarAhead,
    TooSoon,
    UnknownTimeZone,
    WeeklyWindow,
    availability_intervals,
    check_bookable,
    free_slots,
    grid_start_at_or_after,
    local_rendering,
    on_grid,
    resolve_local,
    session_blocked_interval,
    zone,
)

LONDON = "Europe/London"
NEW_YORK = "America/New_York"
SYDNEY = "Australia/Sydney"
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def every_day(*hours: tuple[time, time]) -> tuple[WeeklyWindow, ...]:
    return tuple(WeeklyWindow(weekday, start, end) for weekday in range(7) for start, end in hours)


MORNING_AND_AFTERNOON = every_day((time(9), time(12)), (time(14), time(18)))


def make_schedule(
    time_zone: str,
    weekly: tuple[WeeklyWindow, ...] = MORNING_AND_AFTERNOON,
    overrides: dict[date, tuple[LocalWindow, ...]] | None = None,
    **policy: timedelta,
) -> Schedule:
    return Schedule(time_zone=time_zone, weekly=weekly, overrides=overrides or {}, **policy)


def local_day_range(time_zone: str, day: date) -> tuple[datetime, datetime]:
    """UTC instants of local midnight at the start and end of ``day``."""
    return (
        resolve_local(datetime.combine(day, time(0)), time_zone),
        resolve_local(datetime.combine(day + timedelta(days=1), time(0)), time_zone),
    )


def intervals_on(schedule: Schedule, day: date) -> list[tuple[datetime, datetime]]:
    start, end = local_day_range(schedule.time_zone, day)
    return [(interval.start, interval.end) for interval in availability_intervals(schedule, start, end)]


def single_day(time_zone: str, day: date, *windows: tuple[time, time]) -> Schedule:
    """A schedule with no weekly hours and only ``windows`` on ``day``."""
    return make_schedule(time_zone, weekly=(), overrides={day: tuple(LocalWindow(s, e) for s, e in windows)})


def wide_range(day: date) -> tuple[datetime, datetime]:
    """A UTC range comfortably containing every instant of local ``day`` in any zone."""
    midnight = utc(day.year, day.month, day.day)
    return midnight - timedelta(days=2), midnight + timedelta(days=3)


# ------------------------------------------------------------------ DST expansion

DST_CASES = [
    # zone, day before, transition day, day after, UTC before, UTC after
    pytest.param(
        LONDON,
        date(2026, 3, 28),
        date(2026, 3, 29),
        date(2026, 3, 30),
        [(utc(2026, 3, 28, 9), utc(2026, 3, 28, 12)), (utc(2026, 3, 28, 14), utc(2026, 3, 28, 18))],
        [(utc(2026, 3, 30, 8), utc(2026, 3, 30, 11)), (utc(2026, 3, 30, 13), utc(2026, 3, 30, 17))],
        id="london-spring-forward",
    ),
    pytest.param(
        LONDON,
        date(2026, 10, 24),
        date(2026, 10, 25),
        date(2026, 10, 26),
        [(utc(2026, 10, 24, 8), utc(2026, 10, 24, 11)), (utc(2026, 10, 24, 13), utc(2026, 10, 24, 17))],
        [(utc(2026, 10, 26, 9), utc(2026, 10, 26, 12)), (utc(2026, 10, 26, 14), utc(2026, 10, 26, 18))],
        id="london-fall-back",
    ),
    pytest.param(
        NEW_YORK,
        date(2026, 3, 7),
        date(2026, 3, 8),
        date(2026, 3, 9),
        [(utc(2026, 3, 7, 14), utc(2026, 3, 7, 17)), (utc(2026, 3, 7, 19), utc(2026, 3, 7, 23))],
        [(utc(2026, 3, 9, 13), utc(2026, 3, 9, 16)), (utc(2026, 3, 9, 18), utc(2026, 3, 9, 22))],
        id="new-york-spring-forward",
    ),
    pytest.param(
        NEW_YORK,
        date(2026, 10, 31),
        date(2026, 11, 1),
        date(2026, 11, 2),
        [(utc(2026, 10, 31, 13), utc(2026, 10, 31, 16)), (utc(2026, 10, 31, 18), utc(2026, 10, 31, 22))],
        [(utc(2026, 11, 2, 14), utc(2026, 11, 2, 17)), (utc(2026, 11, 2, 19), utc(2026, 11, 2, 23))],
        id="new-york-fall-back",
    ),
    pytest.param(
        SYDNEY,
        date(2026, 4, 4),
        date(2026, 4, 5),
        date(2026, 4, 6),
        [(utc(2026, 4, 3, 22), utc(2026, 4, 4, 1)), (utc(2026, 4, 4, 3), utc(2026, 4, 4, 7))],
        [(utc(2026, 4, 5, 23), utc(2026, 4, 6, 2)), (utc(2026, 4, 6, 4), utc(2026, 4, 6, 8))],
        id="sydney-fall-back-dst-ends",
    ),
    pytest.param(
        SYDNEY,
        date(2026, 10, 3),
        date(2026, 10, 4),
        date(2026, 10, 5),
        [(utc(2026, 10, 2, 23), utc(2026, 10, 3, 2)), (utc(2026, 10, 3, 4), utc(2026, 10, 3, 8))],
        [(utc(2026, 10, 4, 22), utc(2026, 10, 5, 1)), (utc(2026, 10, 5, 3), utc(2026, 10, 5, 7))],
        id="sydney-spring-forward",
    ),
]


@pytest.mark.parametrize(
    ("time_zone", "day_before", "transition_day", "day_after", "utc_before", "utc_after"), DST_CASES
)
def test_weekly_hours_keep_wall_clock_across_dst(
    *,
    time_zone: str,
    day_before: date,
    transition_day: date,
    day_after: date,
    utc_before: list[tuple[datetime, datetime]],
    utc_after: list[tuple[datetime, datetime]],
) -> None:
    schedule = make_schedule(time_zone)

    before = intervals_on(schedule, day_before)
    after = intervals_on(schedule, day_after)

    assert before == utc_before
    assert after == utc_after
    # Same wall-clock hours on both sides ...
    wall = [(time(9), time(12)), (time(14), time(18))]
    for intervals in (before, after):
        rendered = [
            (
                datetime.fromisoformat(local_rendering(s, time_zone)).time(),
                datetime.fromisoformat(local_rendering(e, time_zone)).time(),
            )
            for s, e in intervals
        ]
        assert rendered == wall
    # ... so every UTC boundary moves by exactly one hour (beyond the two days).
    shifts = {
        (a - b) - timedelta(days=2)
        for (b_start, b_end), (a_start, a_end) in zip(before, after, strict=True)
        for b, a in ((b_start, a_start), (b_end, a_end))
    }
    assert shifts in ({HOUR}, {-HOUR})
    # The transitions happen at night, so the transition day already has the new offset.
    shifted_back = [(s - timedelta(days=1), e - timedelta(days=1)) for s, e in after]
    assert intervals_on(schedule, transition_day) == shifted_back


def test_expansion_is_clipped_sorted_and_merged() -> None:
    schedule = make_schedule(LONDON, weekly=every_day((time(9), time(12)), (time(12), time(13))))

    intervals = availability_intervals(schedule, utc(2026, 1, 14, 10), utc(2026, 1, 15, 9, 30))

    assert [(i.start, i.end) for i in intervals] == [
        (utc(2026, 1, 14, 10), utc(2026, 1, 14, 13)),  # clipped start; touching windows merged
        (utc(2026, 1, 15, 9), utc(2026, 1, 15, 9, 30)),  # clipped end
    ]
    assert all(i.start.tzinfo is UTC for i in intervals)


def test_empty_or_reversed_range_gives_nothing() -> None:
    schedule = make_schedule(LONDON)
    assert availability_intervals(schedule, utc(2026, 1, 14, 10), utc(2026, 1, 14, 10)) == []
    assert availability_intervals(schedule, utc(2026, 1, 14, 11), utc(2026, 1, 14, 10)) == []


def test_window_ending_at_time_max_runs_to_midnight_and_merges_with_next_day() -> None:
    # 2026-06-01 is a Monday; London is on BST (UTC+1).
    schedule = make_schedule(
        LONDON,
        weekly=(WeeklyWindow(0, time(20), time.max), WeeklyWindow(1, time(0), time(2))),
    )

    intervals = availability_intervals(schedule, utc(2026, 6, 1), utc(2026, 6, 3))

    assert [(i.start, i.end) for i in intervals] == [(utc(2026, 6, 1, 19), utc(2026, 6, 2, 1))]
    check_bookable(schedule, utc(2026, 6, 1, 22), 2 * HOUR, now=utc(2026, 5, 1))


# ----------------------------------------------------------------- resolve_local


@pytest.mark.parametrize(
    ("time_zone", "local", "gap_start", "gap_end"),
    [
        (LONDON, datetime(2026, 3, 29, 1, 30), "2026-03-29T01:00:00", "2026-03-29T02:00:00"),
        (NEW_YORK, datetime(2026, 3, 8, 2, 30), "2026-03-08T02:00:00", "2026-03-08T03:00:00"),
        (SYDNEY, datetime(2026, 10, 4, 2, 30), "2026-10-04T02:00:00", "2026-10-04T03:00:00"),
        # Chile springs forward at midnight: 00:00 itself does not exist.
        ("America/Santiago", datetime(2026, 9, 6, 0, 0), "2026-09-06T00:00:00", "2026-09-06T01:00:00"),
    ],
)
def test_resolve_local_rejects_time_in_gap(time_zone: str, local: datetime, gap_start: str, gap_end: str) -> None:
    for disambiguation in Disambiguation:
        with pytest.raises(NonexistentLocalTime) as caught:
            resolve_local(local, time_zone, disambiguation)
        error = caught.value
        assert error.reason == "NONEXISTENT_LOCAL_TIME"
        assert error.field == "local_start"
        assert error.metadata == {
            "time_zone": time_zone,
            "local_time": local.isoformat(),
            "gap_start": gap_start,
            "gap_end": gap_end,
        }
        assert gap_start in str(error)
        assert gap_end in str(error)


@pytest.mark.parametrize(
    ("time_zone", "local", "earlier", "later", "earlier_offset", "later_offset"),
    [
        (
            LONDON,
            datetime(2026, 10, 25, 1, 30),
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 25, 1, 30),
            "+01:00",
            "+00:00",
        ),
        (
            NEW_YORK,
            datetime(2026, 11, 1, 1, 30),
            utc(2026, 11, 1, 5, 30),
            utc(2026, 11, 1, 6, 30),
            "-04:00",
            "-05:00",
        ),
        (
            SYDNEY,
            datetime(2026, 4, 5, 2, 30),
            utc(2026, 4, 4, 15, 30),
            utc(2026, 4, 4, 16, 30),
            "+11:00",
            "+10:00",
        ),
    ],
)
def test_resolve_local_ambiguous_time(
    *,
    time_zone: str,
    local: datetime,
    earlier: datetime,
    later: datetime,
    earlier_offset: str,
    later_offset: str,
) -> None:
    with pytest.raises(AmbiguousLocalTime) as caught:
        resolve_local(local, time_zone, field="requested_start")
    error = caught.value
    assert error.reason == "AMBIGUOUS_LOCAL_TIME"
    assert error.field == "requested_start"
    assert error.metadata["earlier_instant"] == earlier.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error.metadata["later_instant"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error.metadata["time_zone"] == time_zone

    first = resolve_local(local, time_zone, Disambiguation.EARLIER)
    second = resolve_local(local, time_zone, Disambiguation.LATER)
    assert (first, second) == (earlier, later)
    assert second - first == HOUR
    assert first.tzinfo is UTC
    assert local_rendering(first, time_zone) == local.isoformat() + earlier_offset
    assert local_rendering(second, time_zone) == local.isoformat() + later_offset


def test_resolve_local_ordinary_time_ignores_disambiguation() -> None:
    for disambiguation in Disambiguation:
        assert resolve_local(datetime(2026, 7, 1, 9), LONDON, disambiguation) == utc(2026, 7, 1, 8)
    # The input's own fold attribute does not matter either.
    assert resolve_local(datetime(2026, 7, 1, 9, fold=1), NEW_YORK) == utc(2026, 7, 1, 13)


def test_resolve_local_contract_and_zone_errors() -> None:
    with pytest.raises(AssertionError):
        resolve_local(datetime(2026, 7, 1, 9, tzinfo=UTC), LONDON)
    with pytest.raises(UnknownTimeZone) as caught:
        resolve_local(datetime(2026, 7, 1, 9), "Mars/Olympus")
    assert caught.value.field == "time_zone"


def test_resolve_local_unrepresentable_instant() -> None:
    with pytest.raises(NonexistentLocalTime):
        resolve_local(datetime(1, 1, 1), "Asia/Tokyo")


def test_local_rendering() -> None:
    assert local_rendering(utc(2026, 3, 29, 7), "Europe/Berlin") == "2026-03-29T09:00:00+02:00"
    assert local_rendering(utc(2026, 3, 29, 8), LONDON) == "2026-03-29T09:00:00+01:00"
    assert local_rendering(utc(2026, 1, 5, 14), NEW_YORK) == "2026-01-05T09:00:00-05:00"


# -------------------------------------------------------- sessions spanning DST


def test_window_and_session_across_spring_forward_use_real_time() -> None:
    day = date(2026, 3, 29)
    schedule = single_day(LONDON, day, (time(0), time(4)))
    now = utc(2026, 3, 1)

    assert intervals_on(schedule, day) == [(utc(2026, 3, 29, 0), utc(2026, 3, 29, 3))]  # 3 real hours

    start = resolve_local(datetime(2026, 3, 29, 0, 30), LONDON)
    assert start == utc(2026, 3, 29, 0, 30)
    check_bookable(schedule, start, 2 * HOUR, now)
    check_bookable(schedule, start, timedelta(hours=2, minutes=30), now)  # ends 04:00 BST exactly
    # 00:30 + 3 h on the wall clock would be 03:30 < 04:00, but 3 real hours end at 04:30 BST.
    with pytest.raises(OutsideAvailability) as caught:
        check_bookable(schedule, start, 3 * HOUR, now)
    assert caught.value.field == "start"
    assert caught.value.metadata["local_end"] == "2026-03-29T04:30:00+01:00"

    buffered = Schedule(LONDON, (), {day: (LocalWindow(time(0), time(4)),)}, buffer_after=15 * MINUTE)
    blocked = session_blocked_interval(buffered, start, 2 * HOUR)
    assert (blocked.start, blocked.end) == (utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 2, 45))
    assert local_rendering(start + 2 * HOUR, LONDON) == "2026-03-29T03:30:00+01:00"


def test_window_and_session_across_fall_back_use_real_time() -> None:
    day = date(2026, 10, 25)
    schedule = single_day(LONDON, day, (time(0), time(4)))

    assert intervals_on(schedule, day) == [(utc(2026, 10, 24, 23), utc(2026, 10, 25, 4))]  # 5 real hours

    start = resolve_local(datetime(2026, 10, 25, 0, 30), LONDON)
    check_bookable(schedule, start, 2 * HOUR, utc(2026, 10, 1))
    assert local_rendering(start + 2 * HOUR, LONDON) == "2026-10-25T01:30:00+00:00"


# ------------------------------------------------- window boundaries in gaps/overlaps


@pytest.mark.parametrize(
    ("time_zone", "day", "window", "expected"),
    [
        # Spring-forward gaps: a boundary in the gap moves to the instant the gap ends.
        (LONDON, date(2026, 3, 29), (time(1, 30), time(3)), [(utc(2026, 3, 29, 1), utc(2026, 3, 29, 2))]),
        (
            LONDON,
            date(2026, 3, 29),
            (time(0, 30), time(1, 30)),
            [(utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1))],
        ),
        (LONDON, date(2026, 3, 29), (time(1, 15), time(1, 45)), []),  # wholly inside the gap
        (NEW_YORK, date(2026, 3, 8), (time(2, 30), time(4)), [(utc(2026, 3, 8, 7), utc(2026, 3, 8, 8))]),
        (SYDNEY, date(2026, 10, 4), (time(2, 30), time(4)), [(utc(2026, 10, 3, 16), utc(2026, 10, 3, 17))]),
        (
            "America/Santiago",
            date(2026, 9, 6),
            (time(0), time(2)),
            [(utc(2026, 9, 6, 4), utc(2026, 9, 6, 5))],
        ),
        # Fall-back overlaps: start at the EARLIER instant, end at the LATER one.
        (
            LONDON,
            date(2026, 10, 25),
            (time(1, 30), time(3)),
            [(utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 3))],
        ),
        (
            LONDON,
            date(2026, 10, 25),
            (time(0), time(1, 30)),
            [(utc(2026, 10, 24, 23), utc(2026, 10, 25, 1, 30))],
        ),
        (
            LONDON,
            date(2026, 10, 25),
            (time(1, 15), time(1, 45)),
            [(utc(2026, 10, 25, 0, 15), utc(2026, 10, 25, 1, 45))],
        ),
        (
            NEW_YORK,
            date(2026, 11, 1),
            (time(1, 30), time(3)),
            [(utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 8))],
        ),
        (SYDNEY, date(2026, 4, 5), (time(2, 30), time(4)), [(utc(2026, 4, 4, 15, 30), utc(2026, 4, 4, 18))]),
    ],
)
def test_window_boundary_in_gap_or_overlap(
    time_zone: str, day: date, window: tuple[time, time], expected: list[tuple[datetime, datetime]]
) -> None:
    schedule = single_day(time_zone, day, window)
    intervals = availability_intervals(schedule, *wide_range(day))
    assert [(i.start, i.end) for i in intervals] == expected


def test_touching_windows_in_fall_back_overlap_merge_into_one() -> None:
    day = date(2026, 10, 25)
    schedule = single_day(LONDON, day, (time(0), time(1, 30)), (time(1, 30), time(3)))
    assert intervals_on(schedule, day) == [(utc(2026, 10, 24, 23), utc(2026, 10, 25, 3))]


def test_session_inside_gap_only_window_is_not_bookable() -> None:
    day = date(2026, 3, 29)
    schedule = single_day(LONDON, day, (time(1, 15), time(1, 45)))
    with pytest.raises(OutsideAvailability):
        check_bookable(schedule, utc(2026, 3, 29, 1), 15 * MINUTE, utc(2026, 3, 1))


# ---------------------------------------------------------------------- overrides


def test_overrides_replace_weekly_hours_only_on_their_date() -> None:
    schedule = make_schedule(
        LONDON,
        overrides={
            date(2026, 6, 10): (),  # day off
            date(2026, 6, 11): (LocalWindow(time(10), time(13)), LocalWindow(time(19), time(21))),
        },
    )

    assert intervals_on(schedule, date(2026, 6, 9)) == [
        (utc(2026, 6, 9, 8), utc(2026, 6, 9, 11)),
        (utc(2026, 6, 9, 13), utc(2026, 6, 9, 17)),
    ]
    assert intervals_on(schedule, date(2026, 6, 10)) == []
    assert intervals_on(schedule, date(2026, 6, 11)) == [
        (utc(2026, 6, 11, 9), utc(2026, 6, 11, 12)),
        (utc(2026, 6, 11, 18), utc(2026, 6, 11, 20)),
    ]
    assert intervals_on(schedule, date(2026, 6, 12)) == [
        (utc(2026, 6, 12, 8), utc(2026, 6, 12, 11)),
        (utc(2026, 6, 12, 13), utc(2026, 6, 12, 17)),
    ]
    now = utc(2026, 6, 1)
    with pytest.raises(OutsideAvailability):
        check_bookable(schedule, utc(2026, 6, 10, 8), HOUR, now)
    with pytest.raises(OutsideAvailability):  # weekly 14:00 is replaced on the 11th
        check_bookable(schedule, utc(2026, 6, 11, 13), HOUR, now)
    check_bookable(schedule, utc(2026, 6, 11, 18), 2 * HOUR, now)


def test_override_dates_are_local_dates() -> None:
    # Sydney is UTC+10 in June: its 2026-06-10 starts at 2026-06-09T14:00Z.
    schedule = make_schedule(SYDNEY, weekly=every_day((time(0), time(2))), overrides={date(2026, 6, 10): ()})
    intervals = availability_intervals(schedule, utc(2026, 6, 8, 12), utc(2026, 6, 10, 18))
    assert [(i.start, i.end) for i in intervals] == [
        (utc(2026, 6, 8, 14), utc(2026, 6, 8, 16)),
        (utc(2026, 6, 10, 14), utc(2026, 6, 10, 16)),
    ]


def test_schedule_snapshots_its_overrides() -> None:
    overrides: dict[date, tuple[LocalWindow, ...]] = {date(2026, 6, 10): ()}
    schedule = make_schedule(LONDON, overrides=overrides)
    overrides[date(2026, 6, 11)] = ()
    assert list(schedule.overrides) == [date(2026, 6, 10)]
    with pytest.raises(TypeError):
        schedule.overrides[date(2026, 6, 12)] = ()  # type: ignore[index]


# ----------------------------------------------------------------------- buffers


def test_blocked_interval_and_back_to_back_sessions_with_buffers() -> None:
    schedule = make_schedule(LONDON, buffer_before=10 * MINUTE, buffer_after=15 * MINUTE)
    length = 50 * MINUTE

    first = session_blocked_interval(schedule, utc(2026, 1, 14, 10), length)
    assert (first.start, first.end) == (utc(2026, 1, 14, 9, 50), utc(2026, 1, 14, 11, 5))

    # The first session ends 10:50; the next needs buffer_after + buffer_before = 25 min.
    at_limit = session_blocked_interval(schedule, utc(2026, 1, 14, 11, 15), length)
    too_close = session_blocked_interval(schedule, utc(2026, 1, 14, 11, 14), length)
    assert not first.overlaps(at_limit)
    assert not at_limit.overlaps(first)
    assert first.overlaps(too_close)
    assert too_close.overlaps(first)
    # Same on the other side: a session before the first one.
    earlier = session_blocked_interval(schedule, utc(2026, 1, 14, 8, 45), length)
    assert not earlier.overlaps(first)
    assert session_blocked_interval(schedule, utc(2026, 1, 14, 8, 46), length).overlaps(first)


def test_buffers_may_extend_outside_availability() -> None:
    schedule = make_schedule(LONDON, buffer_before=30 * MINUTE, buffer_after=30 * MINUTE)
    check_bookable(schedule, utc(2026, 1, 14, 9), 3 * HOUR, utc(2026, 1, 1))


def test_free_slots_grid_and_busy_exclusion() -> None:
    schedule = make_schedule(
        LONDON, weekly=every_day((time(9), time(12))), buffer_before=10 * MINUTE, buffer_after=15 * MINUTE
    )
    length = 50 * MINUTE
    day_start, day_end = utc(2026, 1, 14), utc(2026, 1, 15)
    now = utc(2026, 1, 1)

    def starts(busy: list[Interval], step: timedelta = 15 * MINUTE, max_slots: int = 1000) -> list[datetime]:
        slots = free_slots(schedule, length, day_start, day_end, now, busy, step, max_slots)
        assert all(slot.end - slot.start == length for slot in slots)
        return [slot.start for slot in slots]

    # The default grid: every 15 minutes of local time, up to the last start that fits (11:10).
    assert starts([]) == [utc(2026, 1, 14, 9) + k * 15 * MINUTE for k in range(9)]
    half_hourly = [utc(2026, 1, 14, 9) + k * 30 * MINUTE for k in range(5)]
    assert starts([], 30 * MINUTE) == half_hourly

    existing = session_blocked_interval(schedule, utc(2026, 1, 14, 9), length)  # [08:50, 10:05)
    assert starts([existing], 30 * MINUTE) == [utc(2026, 1, 14, 10, 30), utc(2026, 1, 14, 11)]
    # With a fine grid the first free start is exactly buffer_after + buffer_before after the session.
    fine = starts([existing], 5 * MINUTE)
    assert fine[0] == utc(2026, 1, 14, 10, 15)
    assert fine[-1] == utc(2026, 1, 14, 11, 10)
    assert len(fine) == 12
    assert starts([existing], 5 * MINUTE, 3) == fine[:3]


def test_free_slots_respect_range_notice_and_horizon() -> None:
    schedule = make_schedule(
        LONDON,
        weekly=every_day((time(9), time(12))),
        minimum_notice=2 * HOUR,
        booking_horizon=timedelta(days=1, hours=1),
    )
    now = utc(2026, 1, 14, 8)

    slots = free_slots(schedule, HOUR, utc(2026, 1, 14, 9, 10), utc(2026, 1, 16), now, [], HOUR)

    # 09:00 is before now + notice; the grid is whole local hours (not 09:10);
    # the last start allowed by the horizon is 2026-01-15T09:00Z.
    assert [slot.start for slot in slots] == [
        utc(2026, 1, 14, 10),
        utc(2026, 1, 14, 11),
        utc(2026, 1, 15, 9),
    ]
    # range_end is exclusive for starts, but a slot may run past it.
    assert [s.start for s in free_slots(schedule, HOUR, utc(2026, 1, 14), utc(2026, 1, 14, 11), now, [], HOUR)] == [
        utc(2026, 1, 14, 10)
    ]
    assert free_slots(schedule, HOUR, utc(2026, 1, 14), utc(2026, 1, 14, 10), now, [], HOUR) == []


def test_the_grid_of_starts_is_counted_in_local_time_from_midnight() -> None:
    # Kathmandu is UTC+05:45: a 20-minute grid of local time is not a grid of UTC minutes.
    schedule = make_schedule("Asia/Kathmandu", weekly=every_day((time(9), time(11))))
    now = utc(2026, 5, 1)
    slots = free_slots(schedule, 30 * MINUTE, utc(2026, 6, 1), utc(2026, 6, 2), now, [], 20 * MINUTE)
    locals_ = [local_rendering(slot.start, "Asia/Kathmandu")[11:16] for slot in slots]
    assert locals_ == ["09:00", "09:20", "09:40", "10:00", "10:20"]
    assert slots[0].start == utc(2026, 6, 1, 3, 15)
    check_bookable(schedule, utc(2026, 6, 1, 3, 35), 30 * MINUTE, now, step=20 * MINUTE)
    with pytest.raises(OffGrid) as caught:
        check_bookable(schedule, utc(2026, 6, 1, 3, 20), 30 * MINUTE, now, step=20 * MINUTE)
    assert caught.value.metadata["local_start"] == "2026-06-01T09:05:00+05:45"
    assert "every 20 minutes" in caught.value.message
    assert "09:00:00+05:45 or 2026-06-01T09:20:00+05:45" in caught.value.message


def test_grid_starts_across_dst_changes_keep_their_local_times() -> None:
    # London, spring forward (01:00 GMT -> 02:00 BST at 01:00Z): local 01:xx does not exist.
    assert grid_start_at_or_after(utc(2026, 3, 29, 0, 50), LONDON, HOUR) == utc(2026, 3, 29, 1)  # 02:00 BST
    # Fall back (02:00 BST -> 01:00 GMT at 01:00Z): 01:30 occurs twice, and is on the grid twice.
    assert grid_start_at_or_after(utc(2026, 10, 25, 0, 20), LONDON, 30 * MINUTE) == utc(2026, 10, 25, 0, 30)
    assert grid_start_at_or_after(utc(2026, 10, 25, 0, 31), LONDON, 30 * MINUTE) == utc(2026, 10, 25, 1)
    assert grid_start_at_or_after(utc(2026, 10, 25, 1, 1), LONDON, 30 * MINUTE) == utc(2026, 10, 25, 1, 30)
    # Lord Howe moves its clocks by 30 minutes (02:00 +10:30 -> 02:30 +11:00 on 2026-10-04).
    lord_howe = "Australia/Lord_Howe"
    start = grid_start_at_or_after(utc(2026, 10, 3, 15, 1), lord_howe, HOUR)  # 01:31 local, before the jump
    assert local_rendering(start, lord_howe) == "2026-10-04T03:00:00+11:00"
    assert on_grid(start, lord_howe, HOUR)
    assert not on_grid(start + 30 * MINUTE, lord_howe, HOUR)
    assert not on_grid(utc(2026, 6, 1, 12) + timedelta(seconds=30), LONDON, 15 * MINUTE)  # seconds: off the grid


def test_free_slots_rejects_bad_arguments() -> None:
    schedule = make_schedule(LONDON)
    args: tuple[datetime, datetime, datetime, list[Interval]] = (
        utc(2026, 1, 14),
        utc(2026, 1, 15),
        utc(2026, 1, 1),
        [],
    )
    for bad in (timedelta(0), -HOUR):
        with pytest.raises(InvalidSchedule) as caught:
            free_slots(schedule, bad, *args)
        assert caught.value.field == "duration"
        with pytest.raises(InvalidSchedule) as caught:
            free_slots(schedule, HOUR, *args, step=bad)
        assert caught.value.field == "step"
        with pytest.raises(InvalidSchedule):
            session_blocked_interval(schedule, utc(2026, 1, 14, 9), bad)
        with pytest.raises(InvalidSchedule):
            check_bookable(schedule, utc(2026, 1, 14, 9), bad, utc(2026, 1, 1))
    with pytest.raises(AssertionError):
        free_slots(schedule, HOUR, *args, max_slots=0)


# ------------------------------------------------------------ notice and horizon


def test_notice_and_horizon() -> None:
    schedule = make_schedule(
        LONDON,
        weekly=every_day((time(0), time.max)),
        minimum_notice=timedelta(hours=24),
        booking_horizon=timedelta(days=30),
    )
    now = utc(2026, 6, 1, 8)

    with pytest.raises(TooSoon) as too_soon:
        check_bookable(schedule, utc(2026, 6, 2, 7, 59), HOUR, now)
    assert too_soon.value.reason == "INSUFFICIENT_NOTICE"
    assert too_soon.value.field == "start"
    assert too_soon.value.metadata == {"earliest_start": "2026-06-02T08:00:00Z"}

    with pytest.raises(TooFarAhead) as too_far:
        check_bookable(schedule, utc(2026, 7, 1, 8, 1), HOUR, now)
    assert too_far.value.reason == "BEYOND_BOOKING_HORIZON"
    assert too_far.value.field == "start"
    assert too_far.value.metadata == {"latest_start": "2026-07-01T08:00:00Z"}

    # Both limits are inclusive.
    check_bookable(schedule, utc(2026, 6, 2, 8), HOUR, now)
    check_bookable(schedule, utc(2026, 7, 1, 8), HOUR, now)


def test_outside_availability_reason_and_field() -> None:
    schedule = make_schedule(LONDON)
    now = utc(2026, 1, 1)
    check_bookable(schedule, utc(2026, 1, 14, 9), 3 * HOUR, now)  # exactly the morning window
    for start, length in ((utc(2026, 1, 14, 12, 30), HOUR), (utc(2026, 1, 14, 11, 30), HOUR)):
        with pytest.raises(OutsideAvailability) as caught:
            check_bookable(schedule, start, length, now)
        assert caught.value.reason == "OUTSIDE_AVAILABILITY"
        assert caught.value.field == "start"
        assert caught.value.metadata["time_zone"] == LONDON


# -------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus",
        "",
        "../etc/passwd",
        "+01:00",
        "/etc/localtime",
        "Europe/London/",
        "Europe//London",
        "Europe/../Europe/London",
        "zone.tab",
        "localtime",
        "right/UTC",
        "Europe/London\x00",
        "europe/london",
        "A" * 300,
    ],
)
def test_unknown_time_zones(name: str) -> None:
    with pytest.raises(UnknownTimeZone) as caught:
        zone(name)
    assert caught.value.reason == "UNKNOWN_TIME_ZONE"
    assert caught.value.field == "time_zone"
    with pytest.raises(UnknownTimeZone) as caught:
        make_schedule(name).validate()
    assert caught.value.field == "time_zone"
    with pytest.raises(UnknownTimeZone):
        availability_intervals(make_schedule(name), utc(2026, 1, 1), utc(2026, 1, 2))


@pytest.mark.parametrize("name", ["UTC", "Etc/GMT+5", "America/Argentina/Buenos_Aires", LONDON])
def test_known_time_zones(name: str) -> None:
    assert zone(name) == ZoneInfo(name)


@pytest.mark.parametrize(
    ("weekly", "overrides", "field"),
    [
        ((WeeklyWindow(7, time(9), time(10)),), {}, "weekly[0].weekday"),
        ((WeeklyWindow(0, time(9), time(10)), WeeklyWindow(-1, time(9), time(10))), {}, "weekly[1].weekday"),
        ((WeeklyWindow(True, time(9), time(10)),), {}, "weekly[0].weekday"),
        ((WeeklyWindow(0, time(10), time(10)),), {}, "weekly[0].end"),
        ((WeeklyWindow(0, time(18), time(9)),), {}, "weekly[0].end"),
        ((WeeklyWindow(0, time(9, tzinfo=UTC), time(10)),), {}, "weekly[0].start"),
        ((WeeklyWindow(0, time(9), time(12)), WeeklyWindow(0, time(11), time(13))), {}, "weekly[1]"),
        ((WeeklyWindow(0, time(11), time(13)), WeeklyWindow(0, time(9), time(12))), {}, "weekly[0]"),
        ((), {date(2026, 6, 1): (LocalWindow(time(12), time(9)),)}, "overrides[2026-06-01][0].end"),
        (
            (),
            {date(2026, 6, 1): (LocalWindow(time(9), time(12)), LocalWindow(time(8), time(10)))},
            "overrides[2026-06-01][0]",
        ),
        ((), {datetime(2026, 6, 1): ()}, "overrides"),
    ],
)
def test_invalid_windows(
    weekly: tuple[WeeklyWindow, ...], overrides: dict[date, tuple[LocalWindow, ...]], field: str
) -> None:
    schedule = make_schedule(LONDON, weekly=weekly, overrides=overrides)
    with pytest.raises(InvalidSchedule) as caught:
        schedule.validate()
    assert caught.value.reason == "INVALID_SCHEDULE"
    assert caught.value.field == field
    with pytest.raises(InvalidSchedule):
        availability_intervals(schedule, utc(2026, 1, 1), utc(2026, 1, 2))


def test_touching_and_cross_weekday_windows_are_valid() -> None:
    make_schedule(
        LONDON,
        weekly=(
            WeeklyWindow(0, time(9), time(12)),
            WeeklyWindow(0, time(12), time(13)),
            WeeklyWindow(1, time(10), time(11)),
            WeeklyWindow(6, time(0), time.max),
        ),
    ).validate()


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"buffer_before": -MINUTE}, "buffer_before"),
        ({"buffer_after": -MINUTE}, "buffer_after"),
        ({"minimum_notice": -MINUTE}, "minimum_notice"),
        ({"booking_horizon": timedelta(0)}, "booking_horizon"),
        ({"booking_horizon": -HOUR}, "booking_horizon"),
        ({"buffer_before": 5}, "buffer_before"),
    ],
)
def test_invalid_policy(policy: dict[str, Any], field: str) -> None:
    schedule = replace(make_schedule(LONDON), **policy)
    with pytest.raises(InvalidSchedule) as caught:
        schedule.validate()
    assert caught.value.field == field


def test_instants_must_be_utc() -> None:
    schedule = make_schedule(LONDON)
    london_noon = datetime(2026, 7, 1, 12, tzinfo=ZoneInfo(LONDON))
    for bad in (datetime(2026, 7, 1, 12), london_noon):
        with pytest.raises(AssertionError):
            availability_intervals(schedule, bad, utc(2026, 7, 2))
        with pytest.raises(AssertionError):
            check_bookable(schedule, bad, HOUR, utc(2026, 6, 1))
        with pytest.raises(AssertionError):
            Interval(bad, utc(2026, 7, 2))
    # UTC-equivalent zones are accepted and normalised.
    interval = Interval(datetime(2026, 7, 1, 12, tzinfo=ZoneInfo("UTC")), utc(2026, 7, 1, 13))
    assert interval.start.tzinfo is UTC
    with pytest.raises(AssertionError):
        Interval(utc(2026, 7, 1, 13), utc(2026, 7, 1, 13))


def test_interval_overlap_is_half_open() -> None:
    a = Interval(utc(2026, 1, 1, 9), utc(2026, 1, 1, 10))
    assert not a.overlaps(Interval(utc(2026, 1, 1, 10), utc(2026, 1, 1, 11)))
    assert a.overlaps(Interval(utc(2026, 1, 1, 9, 59), utc(2026, 1, 1, 11)))
    assert a.overlaps(Interval(utc(2026, 1, 1, 9, 10), utc(2026, 1, 1, 9, 20)))


def test_errors_carry_reason_field_metadata_and_pickle() -> None:
    classes = [
        UnknownTimeZone,
        NonexistentLocalTime,
        AmbiguousLocalTime,
        InvalidSchedule,
        OutsideAvailability,
        TooSoon,
        TooFarAhead,
    ]
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(reasons)
    assert all(reason.isupper() and " " not in reason for reason in reasons)
    error = TooSoon("too soon", field="start", metadata={"earliest_start": "2026-01-01T00:00:00Z"})
    assert isinstance(error, AvailabilityError)
    assert str(error) == error.message == "too soon"
    # deepcopy goes through __reduce_ex__, like pickling across processes.
    clone = copy.deepcopy(error)
    assert (type(clone), clone.message, clone.field, clone.metadata) == (
        TooSoon,
        "too soon",
        "start",
        {"earliest_start": "2026-01-01T00:00:00Z"},
    )
    assert InvalidSchedule("x").field is None
    assert InvalidSchedule("x").metadata == {}


def test_extreme_ranges_do_not_crash() -> None:
    schedule = make_schedule(SYDNEY)
    top = datetime.max.replace(tzinfo=UTC)
    intervals = availability_intervals(schedule, top - timedelta(days=3), top)
    assert intervals
    assert all(top - timedelta(days=3) <= i.start < i.end <= top for i in intervals)
    bottom = datetime.min.replace(tzinfo=UTC)
    assert availability_intervals(make_schedule(NEW_YORK), bottom, bottom + timedelta(days=3))


# --------------------------------------------------------------------- properties

# Zones with awkward transitions, each with its 2026 transition dates (quiet dates
# for zones without DST), so that generated ranges usually straddle a change.
TRANSITIONS = {
    LONDON: [date(2026, 3, 29), date(2026, 10, 25)],
    NEW_YORK: [date(2026, 3, 8), date(2026, 11, 1)],
    SYDNEY: [date(2026, 4, 5), date(2026, 10, 4)],
    "Australia/Lord_Howe": [date(2026, 4, 5), date(2026, 10, 4)],  # 30-minute shift
    "America/Santiago": [date(2026, 4, 5), date(2026, 9, 6)],  # changes at local midnight
    "Pacific/Chatham": [date(2026, 4, 5), date(2026, 9, 27)],  # +12:45 / +13:45
    "Asia/Kolkata": [date(2026, 6, 15)],
    "UTC": [date(2026, 6, 15)],
}
STEP = timedelta(minutes=5)
DAY_MINUTES = 24 * 60


def minutes_to_time(minutes: int) -> time:
    return time.max if minutes == DAY_MINUTES else time(minutes // 60, minutes % 60)


@st.composite
def day_windows(draw: st.DrawFn, min_windows: int = 0) -> list[tuple[time, time]]:
    """Non-overlapping windows on a 5-minute grid; 24:00 becomes ``time.max``."""
    cuts = sorted(draw(st.lists(st.integers(0, DAY_MINUTES // 5), unique=True, min_size=2 * min_windows, max_size=6)))
    return [
        (minutes_to_time(start * 5), minutes_to_time(end * 5))
        for start, end in zip(cuts[::2], cuts[1::2], strict=False)
    ]


@st.composite
def zone_and_transition(draw: st.DrawFn) -> tuple[str, datetime]:
    time_zone = draw(st.sampled_from(sorted(TRANSITIONS)))
    day = draw(st.sampled_from(TRANSITIONS[time_zone]))
    return time_zone, utc(day.year, day.month, day.day)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[Schedule, datetime, datetime, datetime, list[Interval], timedelta, timedelta]:
    time_zone, transition = draw(zone_and_transition())
    weekly = tuple(WeeklyWindow(weekday, start, end) for weekday in range(7) for start, end in draw(day_windows(1)))
    override_days = draw(st.lists(st.integers(-3, 3), unique=True, max_size=3))
    overrides = {
        transition.date() + timedelta(days=offset): tuple(LocalWindow(s, e) for s, e in draw(day_windows()))
        for offset in override_days
    }
    schedule = Schedule(
        time_zone=time_zone,
        weekly=weekly,
        overrides=overrides,
        buffer_before=draw(st.integers(0, 6)) * STEP,
        buffer_after=draw(st.integers(0, 6)) * STEP,
        minimum_notice=draw(st.integers(0, 6 * 12)) * STEP,
        booking_horizon=draw(st.integers(1, 10 * 24)) * HOUR,
    )
    range_start = transition + draw(st.integers(-3 * DAY_MINUTES, DAY_MINUTES)) * MINUTE
    length_minutes = draw(st.integers(1, 5 * 24)) * 60 - draw(st.integers(0, 59))
    range_end = range_start + length_minutes * MINUTE
    now = range_start - draw(st.integers(-DAY_MINUTES, 3 * DAY_MINUTES)) * MINUTE
    busy = [
        Interval(start, start + draw(st.integers(1, 36)) * STEP)
        for start in (
            range_start + draw(st.integers(-60, length_minutes)) * MINUTE for _ in range(draw(st.integers(0, 6)))
        )
    ]
    duration = draw(st.integers(1, 36)) * STEP
    step = draw(st.integers(1, 24)) * STEP
    return schedule, range_start, range_end, now, busy, duration, step


@settings(max_examples=200, deadline=None, database=None)
@given(scenarios())
def test_property_availability_and_free_slots(
    scenario: tuple[Schedule, datetime, datetime, datetime, list[Interval], timedelta, timedelta],
) -> None:
    schedule, range_start, range_end, now, busy, duration, step = scenario

    intervals = availability_intervals(schedule, range_start, range_end)
    for interval in intervals:
        assert range_start <= interval.start < interval.end <= range_end
    for earlier, later in pairwise(intervals):
        assert earlier.end < later.start  # sorted, disjoint, and touching ones merged

    limit = 40
    slots = free_slots(schedule, duration, range_start, range_end, now, busy, step, max_slots=limit)
    assert len(slots) <= limit
    assert [slot.start for slot in slots] == sorted({slot.start for slot in slots})
    for slot in slots:
        assert slot.end - slot.start == duration
        assert range_start <= slot.start < range_end
        assert now + schedule.minimum_notice <= slot.start <= now + schedule.booking_horizon
        # Inside one merged availability interval:
        assert availability_intervals(schedule, slot.start, slot.end) == [slot]
        check_bookable(schedule, slot.start, duration, now, step=step)
        blocked = session_blocked_interval(schedule, slot.start, duration)
        assert not any(blocked.overlaps(other) for other in busy)

    # Completeness: the busy-aware search (which skips ahead past busy intervals)
    # returns exactly the busy-free candidates of the plain grid.
    grid = free_slots(schedule, duration, range_start, range_end, now, [], step, max_slots=10_000)
    expected = [
        slot
        for slot in grid
        if not any(session_blocked_interval(schedule, slot.start, duration).overlaps(b) for b in busy)
    ]
    assert slots == expected[:limit]


@settings(max_examples=200, deadline=None, database=None)
@given(
    zone_and_day=zone_and_transition(),
    offset=st.timedeltas(min_value=-HOUR, max_value=4 * HOUR),
)
def test_property_resolve_local_round_trips(zone_and_day: tuple[str, datetime], offset: timedelta) -> None:
    # Wall times around the night of a transition: many fall in gaps or overlaps.
    time_zone, day = zone_and_day
    local = day.replace(tzinfo=None) + offset

    def attempt(disambiguation: Disambiguation) -> datetime | None:
        try:
            return resolve_local(local, time_zone, disambiguation)
        except NonexistentLocalTime:
            return None

    first, second = attempt(Disambiguation.EARLIER), attempt(Disambiguation.LATER)
    if first is None or second is None:
        assert first is second is None  # a gap rejects every disambiguation
        with pytest.raises(NonexistentLocalTime):
            resolve_local(local, time_zone)
        return
    for instant in (first, second):
        assert instant.tzinfo is UTC
        assert datetime.fromisoformat(local_rendering(instant, time_zone)).replace(tzinfo=None) == local
    if first == second:
        assert resolve_local(local, time_zone) == first
        return
    assert first < second
    with pytest.raises(AmbiguousLocalTime) as caught:
        resolve_local(local, time_zone)
    assert caught.value.metadata["earlier_instant"] == first.isoformat().replace("+00:00", "Z")
    assert caught.value.metadata["later_instant"] == second.isoformat().replace("+00:00", "Z")


# Every DST zone above, around each of its changes.
DST_ZONES = [(zone_name, day) for zone_name, days in TRANSITIONS.items() for day in days if len(days) == 2]


@settings(max_examples=6, deadline=None, database=None)  # about 0.7 s each: 2,000 starts checked
@given(
    zone_and_day=st.sampled_from(DST_ZONES),
    step_minutes=st.sampled_from([5, 10, 15, 20, 30, 60]),
    duration_steps=st.integers(1, 24),
    windows=day_windows(1),
    notice_steps=st.integers(0, 24),
)
def test_property_the_listing_and_the_check_agree_on_every_start_over_a_week_with_a_dst_change(
    zone_and_day: tuple[str, date],
    step_minutes: int,
    duration_steps: int,
    windows: list[tuple[time, time]],
    notice_steps: int,
) -> None:
    """Every start of a week around a DST change: the check accepts a start exactly when the
    listing (with nothing booked) offers it. Every offset of these zones is a multiple of 5
    minutes, so every start any grid can have is a whole UTC minute divisible by 5: all of those
    are asked, and beside a hundred offered starts the minute before and after and 30 seconds after."""
    zone_name, day = zone_and_day
    schedule = make_schedule(
        zone_name,
        weekly=tuple(WeeklyWindow(weekday, start, end) for weekday in range(7) for start, end in windows),
        minimum_notice=notice_steps * STEP,
        booking_horizon=timedelta(days=30),
    )
    week_start = utc(day.year, day.month, day.day) - timedelta(days=3)
    now = week_start - timedelta(hours=1)
    step, duration = step_minutes * MINUTE, duration_steps * STEP
    listed = free_slots(schedule, duration, week_start, week_start + timedelta(days=7), now, [], step, 10_000)
    offered = {slot.start for slot in listed}

    def accepted(start: datetime) -> bool:
        try:
            check_bookable(schedule, start, duration, now, step=step)
        except AvailabilityError:
            return False
        return True

    asked = {week_start + minute * MINUTE for minute in range(0, 7 * DAY_MINUTES, 5)}
    for start in sorted(offered)[:: max(1, len(offered) // 100)]:  # beside a hundred of them
        asked |= {start - MINUTE, start + MINUTE, start + timedelta(seconds=30)}
    disagreements = sorted(start for start in asked if accepted(start) != (start in offered))
    assert disagreements == [], [local_rendering(start, zone_name) for start in disagreements[:5]]
