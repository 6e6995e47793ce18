"""Time through the API: therapists in Europe/London, America/New_York and Australia/Sydney, their
weekly hours across DST changes, wall-clock times that do not exist or exist twice, sessions
spanning a change, date overrides, notice and horizon.

The DST dates are found, not hard-coded: the next spring-forward and fall-back of each zone at
least two days ahead (from November 2026: London 2027-03-28 / 2027-10-31, New York 2027-03-14 /
2027-11-07, Sydney 2027-10-03 / 2027-04-04), so the suite does not rot once they have passed. What
is expected on those days is hard-coded: each zone's two UTC offsets, and 09:00 local.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest

from booking.v1 import booking_pb2
from tests.support.world import (
    World,
    assert_books_consistent,
    every_day,
    future_hour,
    refusal,
)

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
OFFICE_HOURS = every_day(("09:00", "12:00"), ("14:00", "18:00"))
# 50-minute sessions starting on the half hour (the session type's grid), each ending in its window.
OFFICE_SLOTS = [
    "09:00",
    "09:30",
    "10:00",
    "10:30",
    "11:00",
    "14:00",
    "14:30",
    "15:00",
    "15:30",
    "16:00",
    "16:30",
    "17:00",
]
HALF_HOURLY = 30
# A DST change can be up to a year away, and the day after it one more day.
HORIZON_DAYS = 730
SCAN_DAYS = 400


@dataclass(frozen=True)
class Zone:
    name: str
    standard_offset: str
    summer_offset: str


ZONES = [
    Zone("Europe/London", "+00:00", "+01:00"),
    Zone("America/New_York", "-05:00", "-04:00"),
    Zone("Australia/Sydney", "+10:00", "+11:00"),
]


def noon_offset(zone: ZoneInfo, day: date) -> timedelta:
    offset = datetime.combine(day, time(12), tzinfo=zone).utcoffset()
    assert offset is not None
    return offset


def next_change(zone_name: str, *, spring: bool) -> date:
    """The next local date (two days ahead at least) on which the clocks go forward (spring) or
    back; changes happen in the small hours, so the offset at noon differs from the day before."""
    zone = ZoneInfo(zone_name)
    day = datetime.now(UTC).date() + timedelta(days=2)
    for _ in range(SCAN_DAYS):
        before, after = noon_offset(zone, day - timedelta(days=1)), noon_offset(zone, day)
        if (after > before) if spring else (after < before):
            return day
        day += timedelta(days=1)
    raise AssertionError(f"no DST change in {zone_name} within {SCAN_DAYS} days")


def wall_times(day: date, *, step_minutes: int = 15, hours: int = 6) -> list[datetime]:
    start = datetime.combine(day, time(0))
    return [start + timedelta(minutes=m) for m in range(0, hours * 60, step_minutes)]


def gap_time(zone_name: str, day: date) -> str:
    """A wall-clock time that does not exist on a spring-forward day (the middle of the gap)."""
    zone = ZoneInfo(zone_name)
    missing = [
        t for t in wall_times(day) if t.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(tzinfo=None) != t
    ]
    assert missing, (zone_name, day)
    return missing[len(missing) // 2].strftime("%Y-%m-%dT%H:%M")


def ambiguous_time(zone_name: str, day: date) -> str:
    """A wall-clock time that occurs twice on a fall-back day (the middle of the repeated hour)."""
    zone = ZoneInfo(zone_name)
    twice = [
        t
        for t in wall_times(day)
        if t.replace(tzinfo=zone, fold=0).utcoffset() != t.replace(tzinfo=zone, fold=1).utcoffset()
    ]
    assert twice, (zone_name, day)
    return twice[len(twice) // 2].strftime("%Y-%m-%dT%H:%M")


def local_midnight(zone_name: str, day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=ZoneInfo(zone_name)).astimezone(UTC)


def utc(message: booking_pb2.Booking | booking_pb2.Slot, field: str = "start_time") -> datetime:
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


async def therapist_in(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    zone: str,
    weekly: list[booking_pb2.WeeklyWindow] | None = None,
    *,
    duration_minutes: int = 50,
) -> World:
    return await World.create(
        booking_stub,
        credit_stub,
        time_zone=zone,
        weekly=weekly,
        horizon_days=HORIZON_DAYS,
        duration_minutes=duration_minutes,
        start_step_minutes=HALF_HOURLY,
    )


async def assert_untouched(world: World) -> None:
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (100, 0, 0)


# --- Weekly hours across DST changes ---


@pytest.mark.parametrize("spring", [True, False], ids=["spring-forward", "fall-back"])
@pytest.mark.parametrize("zone", ZONES, ids=[z.name for z in ZONES])
async def test_weekly_hours_stay_at_nine_local_across_a_dst_change(
    booking_stub: BookingServiceAsyncStub, credit_stub: CreditServiceAsyncStub, zone: Zone, spring: bool
) -> None:
    world = await therapist_in(booking_stub, credit_stub, zone.name, OFFICE_HOURS)
    change = next_change(zone.name, spring=spring)
    days = [change - timedelta(days=1), change, change + timedelta(days=1)]
    before, after = (zone.standard_offset, zone.summer_offset) if spring else (zone.summer_offset, zone.standard_offset)

    slots = await world.slots(
        local_midnight(zone.name, days[0]), local_midnight(zone.name, days[-1] + timedelta(days=1))
    )

    by_day: dict[str, list[booking_pb2.Slot]] = {}
    for slot in slots:
        by_day.setdefault(slot.local_start[:10], []).append(slot)
    assert sorted(by_day) == [d.isoformat() for d in days]
    for day, offset in ((days[0], before), (days[2], after)):
        assert [s.local_start for s in by_day[day.isoformat()]] == [
            f"{day.isoformat()}T{hhmm}:00{offset}" for hhmm in OFFICE_SLOTS
        ]
    assert by_day[change.isoformat()][0].local_start == f"{change.isoformat()}T09:00:00{after}"
    # Same wall clock, so the UTC instants are one hour apart from one day to the next-but-one.
    first_before, first_after = utc(by_day[days[0].isoformat()][0]), utc(by_day[days[2].isoformat()][0])
    assert first_after - first_before == timedelta(hours=48) + (timedelta(hours=-1) if spring else timedelta(hours=1))
    for slot in slots:
        assert datetime.fromisoformat(slot.local_start) == utc(slot)
        assert datetime.fromisoformat(slot.local_end) == utc(slot, "end_time") == utc(slot) + timedelta(minutes=50)


async def test_slots_render_in_the_zone_asked_for(
    booking_stub: BookingServiceAsyncStub, credit_stub: CreditServiceAsyncStub
) -> None:
    world = await therapist_in(booking_stub, credit_stub, "Australia/Sydney", OFFICE_HOURS)
    day = datetime.now(UTC).date() + timedelta(days=10)
    start, end = local_midnight(world.time_zone, day), local_midnight(world.time_zone, day + timedelta(days=1))
    response = await world.booking.ListAvailableSlots(
        booking_pb2.ListAvailableSlotsRequest(
            therapist_id=world.therapist_id,
            session_type_id=world.session_type_id,
            start_time=world.booking_request(start).start_time,
            end_time=world.booking_request(end).start_time,
            time_zone="Europe/London",
        )
    )
    in_own_zone = await world.slots(start, end)

    assert response.time_zone == "Europe/London"
    assert [s.start_time for s in response.slots] == [s.start_time for s in in_own_zone]
    assert all(s.local_start.endswith(("+00:00", "+01:00")) for s in response.slots)
    assert [s.local_start[11:16] for s in in_own_zone] == OFFICE_SLOTS
    error = await refusal(
        world.booking.ListAvailableSlots(
            booking_pb2.ListAvailableSlotsRequest(
                therapist_id=world.therapist_id,
                session_type_id=world.session_type_id,
                start_time=world.booking_request(start).start_time,
                end_time=world.booking_request(end).start_time,
                time_zone="Mars/Olympus_Mons",
            )
        )
    )
    assert (error.code, error.reason) == (INVALID, "UNKNOWN_TIME_ZONE")


# --- Wall-clock times that do not exist, or exist twice ---


@pytest.mark.parametrize("zone", ZONES, ids=[z.name for z in ZONES])
async def test_a_local_start_in_the_spring_forward_gap_is_refused(
    booking_stub: BookingServiceAsyncStub, credit_stub: CreditServiceAsyncStub, zone: Zone
) -> None:
    world = await therapist_in(booking_stub, credit_stub, zone.name)
    missing = gap_time(zone.name, next_change(zone.name, spring=True))

    error = await refusal(world.booking.CreateBooking(world.local_booking_request(missing)))

    assert (error.code, error.reason) == (INVALID, "NONEXISTENT_LOCAL_TIME")
    assert list(error.field_violations) == ["local_start"]
    assert error.metadata["time_zone"] == zone.name
    assert error.metadata["gap_start"] < missing < error.metadata["gap_end"]
    await assert_untouched(world)


@pytest.mark.parametrize("zone", ZONES, ids=[z.name for z in ZONES])
async def test_an_ambiguous_fall_back_time_must_say_which_and_then_means_that_one(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
    zone: Zone,
) -> None:
    world = await therapist_in(booking_stub, credit_stub, zone.name)  # open all night
    twice = ambiguous_time(zone.name, next_change(zone.name, spring=False))

    error = await refusal(world.booking.CreateBooking(world.local_booking_request(twice)))

    assert (error.code, error.reason) == (INVALID, "AMBIGUOUS_LOCAL_TIME")
    assert list(error.field_violations) == ["local_start"]
    await assert_untouched(world)

    earlier = (
        await world.booking.CreateBooking(
            world.local_booking_request(twice, disambiguation=booking_pb2.DISAMBIGUATION_EARLIER)
        )
    ).booking
    later = (
        await world.booking.CreateBooking(
            world.local_booking_request(twice, disambiguation=booking_pb2.DISAMBIGUATION_LATER)
        )
    ).booking

    assert utc(later) - utc(earlier) == timedelta(hours=1)
    assert earlier.local_start == f"{twice}:00{zone.summer_offset}"
    assert later.local_start == f"{twice}:00{zone.standard_offset}"
    assert error.metadata["earlier_instant"] == utc(earlier).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error.metadata["later_instant"] == utc(later).strftime("%Y-%m-%dT%H:%M:%SZ")
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


@pytest.mark.parametrize("zone", ZONES, ids=[z.name for z in ZONES])
async def test_a_session_spanning_the_spring_forward_change_lasts_its_real_duration(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
    zone: Zone,
) -> None:
    world = await therapist_in(booking_stub, credit_stub, zone.name, duration_minutes=120)  # 00:00-24:00
    day = next_change(zone.name, spring=True)

    booking = (await world.booking.CreateBooking(world.local_booking_request(f"{day.isoformat()}T00:30"))).booking

    assert booking.local_start == f"{day.isoformat()}T00:30:00{zone.standard_offset}"
    assert utc(booking, "end_time") - utc(booking) == timedelta(hours=2)
    async with booking_db.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT ends_at - starts_at AS length, starts_at FROM booking.sessions WHERE booking_id = $1",
            uuid.UUID(booking.booking_id),
        )
    assert row is not None
    assert (row["length"], row["starts_at"]) == (timedelta(hours=2), utc(booking))
    # On the wall clock it ends at 03:30, an hour "later" than 02:30.
    end_local = utc(booking, "end_time").astimezone(ZoneInfo(zone.name))
    assert (end_local.strftime("%H:%M"), end_local.isoformat()[-6:]) == ("03:30", zone.summer_offset)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


# --- Weekly hours, overrides, notice and horizon ---


async def test_a_booking_outside_the_weekly_hours_is_refused(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> None:
    world = await therapist_in(booking_stub, credit_stub, "Europe/London", OFFICE_HOURS)
    day = (datetime.now(UTC).date() + timedelta(days=10)).isoformat()

    for outside in ("12:30", "11:30", "08:30", "17:30", "22:00"):  # between, across an end or start, after
        error = await refusal(world.booking.CreateBooking(world.local_booking_request(f"{day}T{outside}")))
        assert (error.code, error.reason) == (PRECONDITION, "OUTSIDE_AVAILABILITY"), outside
        assert error.metadata["time_zone"] == "Europe/London"
    await assert_untouched(world)

    # 11:10 would still end by 12:00, but starts lie on the session type's half-hour grid.
    off_grid = await refusal(world.booking.CreateBooking(world.local_booking_request(f"{day}T11:10")))
    assert (off_grid.code, off_grid.reason) == (PRECONDITION, "START_OFF_GRID")
    assert (off_grid.metadata["local_start"], off_grid.metadata["step_minutes"]) == (f"{day}T11:10:00+00:00", "30")
    assert "every 30 minutes" in off_grid.message
    seconds_off = datetime.fromisoformat(f"{day}T11:00:30+00:00")
    assert (await refusal(world.booking.CreateBooking(world.booking_request(seconds_off)))).reason == "START_OFF_GRID"
    await assert_untouched(world)
    last_of_morning = (await world.booking.CreateBooking(world.local_booking_request(f"{day}T11:00"))).booking
    assert last_of_morning.local_start.startswith(f"{day}T11:00:00")
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_date_overrides_take_a_day_off_or_change_its_hours(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> None:
    world = await therapist_in(booking_stub, credit_stub, "America/New_York", OFFICE_HOURS)
    today = datetime.now(UTC).date()
    day_off, evening, normal = (today + timedelta(days=n) for n in (12, 13, 14))

    async def local_slots(day: date) -> list[str]:
        slots = await world.slots(
            local_midnight(world.time_zone, day), local_midnight(world.time_zone, day + timedelta(days=1))
        )
        return [s.local_start[11:16] for s in slots]

    assert await local_slots(day_off) == OFFICE_SLOTS
    await world.booking.SetDateOverride(
        booking_pb2.SetDateOverrideRequest(therapist_id=world.therapist_id, date=day_off.isoformat())
    )
    await world.booking.SetDateOverride(
        booking_pb2.SetDateOverrideRequest(
            therapist_id=world.therapist_id,
            date=evening.isoformat(),
            windows=[booking_pb2.TimeWindow(start_time="19:00", end_time="21:00")],
        )
    )

    assert await local_slots(day_off) == []
    assert await local_slots(evening) == ["19:00", "19:30", "20:00"]
    assert await local_slots(normal) == OFFICE_SLOTS
    for refused in (f"{day_off.isoformat()}T09:00", f"{evening.isoformat()}T09:00"):
        error = await refusal(world.booking.CreateBooking(world.local_booking_request(refused)))
        assert error.reason == "OUTSIDE_AVAILABILITY", refused
    booked = (await world.booking.CreateBooking(world.local_booking_request(f"{evening.isoformat()}T20:00"))).booking
    assert booked.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    assert await local_slots(evening) == ["19:00"]

    schedule = await world.booking.GetSchedule(booking_pb2.GetScheduleRequest(therapist_id=world.therapist_id))
    assert [(o.date, len(o.windows)) for o in schedule.date_overrides] == [
        (day_off.isoformat(), 0),
        (evening.isoformat(), 1),
    ]
    await world.booking.DeleteDateOverride(
        booking_pb2.DeleteDateOverrideRequest(therapist_id=world.therapist_id, date=day_off.isoformat())
    )
    assert await local_slots(day_off) == OFFICE_SLOTS
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_minimum_notice_and_booking_horizon_are_enforced(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    await world.update_therapist(minimum_notice_minutes=120, booking_horizon_days=30)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    now -= timedelta(minutes=now.minute % 5)  # on the session type's grid

    too_soon = await refusal(world.booking.CreateBooking(world.booking_request(now + timedelta(hours=1))))
    too_far = await refusal(world.booking.CreateBooking(world.booking_request(future_hour(31, 10))))

    assert (too_soon.code, too_soon.reason) == (PRECONDITION, "INSUFFICIENT_NOTICE")
    assert datetime.fromisoformat(too_soon.metadata["earliest_start"]) >= now + timedelta(hours=2)
    assert (too_far.code, too_far.reason) == (PRECONDITION, "BEYOND_BOOKING_HORIZON")
    assert "latest_start" in too_far.metadata
    await assert_untouched(world)

    slots = await world.slots(now, now + timedelta(hours=6))
    assert slots
    assert all(utc(s) >= now + timedelta(hours=2) for s in slots)
    assert await world.slots(now + timedelta(days=31), now + timedelta(days=32)) == []
    soon_enough = await world.book(now + timedelta(hours=3))
    far_enough = await world.book(future_hour(29, 10))
    assert soon_enough.status == far_enough.status == booking_pb2.BOOKING_STATUS_CONFIRMED
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


# --- Zones in the request ---


async def test_a_local_start_may_be_given_in_the_client_s_own_zone(
    booking_stub: BookingServiceAsyncStub,
    credit_stub: CreditServiceAsyncStub,
    booking_db: asyncpg.Pool,
    credit_db: asyncpg.Pool,
) -> None:
    world = await therapist_in(booking_stub, credit_stub, "Europe/London", OFFICE_HOURS)
    day = (datetime.now(UTC).date() + timedelta(days=10)).isoformat()
    request = world.local_booking_request(f"{day}T04:00")  # 04:00 in New York is 09:00 in London in winter
    request.local_start.time_zone = "America/New_York"

    booking = (await world.booking.CreateBooking(request)).booking

    expected = datetime.fromisoformat(f"{day}T04:00").replace(tzinfo=ZoneInfo("America/New_York"))
    assert utc(booking) == expected
    assert (booking.time_zone, booking.local_start) == ("Europe/London", f"{day}T09:00:00+00:00")
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


@pytest.mark.parametrize("zone_name", ["Mars/Olympus_Mons", "", "+01:00", "../etc/passwd"])
async def test_an_unknown_zone_in_a_local_start_is_invalid_and_named(world: World, zone_name: str) -> None:
    request = world.local_booking_request("2027-01-10T10:00")
    request.local_start.time_zone = zone_name

    error = await refusal(world.booking.CreateBooking(request))

    assert (error.code, error.reason) == (INVALID, "UNKNOWN_TIME_ZONE")
    assert list(error.field_violations) == ["local_start.time_zone"]
    await assert_untouched(world)


async def test_a_move_to_a_nonexistent_local_time_is_refused_and_changes_nothing(
    booking_stub: BookingServiceAsyncStub, credit_stub: CreditServiceAsyncStub
) -> None:
    world = await therapist_in(booking_stub, credit_stub, "America/New_York")
    booking = await world.book(future_hour(5, 15))
    missing = gap_time(world.time_zone, next_change(world.time_zone, spring=True))

    error = await refusal(
        world.booking.RescheduleBooking(
            booking_pb2.RescheduleBookingRequest(
                booking_id=booking.booking_id,
                request_id=str(uuid.uuid4()),
                local_start=booking_pb2.LocalDateTime(date_time=missing, time_zone=world.time_zone),
            )
        )
    )

    assert (error.code, error.reason) == (INVALID, "NONEXISTENT_LOCAL_TIME")
    assert list(error.field_violations) == ["local_start"]
    assert await world.get(booking.booking_id) == booking


async def test_a_slot_range_must_be_ordered_and_at_most_31_days(world: World) -> None:
    start = future_hour(3, 0)
    for end in (start, start - timedelta(hours=1), start + timedelta(days=31, minutes=1)):
        error = await refusal(world.slots(start, end))
        assert error.code == INVALID, end
        assert list(error.field_violations) == ["end_time"], end
    assert len(await world.slots(start, start + timedelta(days=31))) > 0
