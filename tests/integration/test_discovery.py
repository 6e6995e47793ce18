"""Discovery (docs/http-api.md, "Finding a therapist"): ListTherapists pages in a stable order
with a marketplace's filters, and SearchAvailability answers "who can see me for 50 minutes
between then and then" with each therapist's first free slots: exactly the slots
ListAvailableSlots gives, across time zones and a DST change, examining at most 50 therapists a
call.

Each test tags its therapists with a specialty of its own and filters on it, so the therapists
of other tests on the shared server never show.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from booking.v1 import booking_pb2
from booking_service.discovery import MAX_THERAPISTS_EXAMINED
from tests.support.gateway import Gateway, request_json
from tests.support.world import ALL_WEEK, World, every_day, future_hour, refusal, ts


@dataclass(frozen=True)
class Made:
    therapist_id: str
    session_type_id: str


def new_tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def therapist(
    stub: Any,
    tag: str,
    *,
    time_zone: str = "UTC",
    languages: tuple[str, ...] = (),
    windows: list[booking_pb2.WeeklyWindow] | None = None,
    types: tuple[tuple[int, int], ...] = ((50, 10),),
) -> Made:
    """A therapist with the specialty `tag`, these weekly windows (default: around the clock) and
    session types ((minutes, credits), ...); the first type's id."""
    created = await stub.CreateTherapist(
        booking_pb2.CreateTherapistRequest(
            request_id=str(uuid.uuid4()),
            therapist=booking_pb2.Therapist(
                display_name="Dr. Find",
                time_zone=time_zone,
                booking_horizon_days=365,
                languages=languages,
                specialties=[tag],
            ),
        )
    )
    therapist_id = created.therapist.therapist_id
    await stub.SetWeeklySchedule(
        booking_pb2.SetWeeklyScheduleRequest(
            therapist_id=therapist_id, windows=ALL_WEEK if windows is None else windows
        )
    )
    type_ids = []
    for minutes, credits in types:
        made = await stub.CreateSessionType(
            booking_pb2.CreateSessionTypeRequest(
                therapist_id=therapist_id,
                request_id=str(uuid.uuid4()),
                session_type=booking_pb2.SessionType(name="Session", duration_minutes=minutes, credit_cost=credits),
            )
        )
        type_ids.append(made.session_type.session_type_id)
    return Made(therapist_id, type_ids[0])


async def listed(stub: Any, **filters: Any) -> list[str]:
    """Every therapist ListTherapists gives for these filters, through all pages of 2."""
    found: list[str] = []
    token = ""
    for _ in range(50):
        page = await stub.ListTherapists(booking_pb2.ListTherapistsRequest(page_size=2, page_token=token, **filters))
        found += [t.therapist_id for t in page.therapists]
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("ListTherapists never ended")


async def test_therapists_are_listed_in_pages_oldest_first(booking_stub: Any) -> None:
    tag = new_tag()
    made = [await therapist(booking_stub, tag) for _ in range(5)]
    first = await booking_stub.ListTherapists(booking_pb2.ListTherapistsRequest(page_size=2, specialties=[tag]))
    assert len(first.therapists) == 2 and first.next_page_token
    assert await listed(booking_stub, specialties=[tag]) == [m.therapist_id for m in made]
    assert first.therapists[0].specialties == [tag]


async def test_filters_combine_and_hold_for_one_and_the_same_session_type(booking_stub: Any) -> None:
    tag = new_tag()
    london_en = await therapist(booking_stub, tag, time_zone="Europe/London", languages=("en",))
    lisbon_pt = await therapist(
        booking_stub, tag, time_zone="Europe/Lisbon", languages=("pt-BR", "en"), types=((50, 30), (80, 10))
    )
    tokyo = await therapist(booking_stub, tag, time_zone="Asia/Tokyo", languages=("ja",), types=((80, 40),))

    def ids(*made: Made) -> list[str]:
        return [m.therapist_id for m in made]

    assert await listed(booking_stub, specialties=[tag]) == ids(london_en, lisbon_pt, tokyo)
    assert await listed(booking_stub, specialties=[tag], languages=["en"]) == ids(london_en, lisbon_pt)
    assert await listed(booking_stub, specialties=[tag], languages=["en", "pt-BR"]) == ids(lisbon_pt)
    assert await listed(booking_stub, specialties=[tag], time_zones=["Asia/Tokyo", "Europe/London"]) == ids(
        london_en, tokyo
    )
    assert await listed(booking_stub, specialties=[tag], min_credit_cost=25) == ids(lisbon_pt, tokyo)
    assert await listed(booking_stub, specialties=[tag], max_credit_cost=15) == ids(london_en, lisbon_pt)
    assert await listed(booking_stub, specialties=[tag], duration_minutes=80) == ids(lisbon_pt, tokyo)
    # Lisbon has a 50-minute type (30 credits) and a 10-credit type (80 minutes), but no one type
    # that is both.
    assert await listed(booking_stub, specialties=[tag], duration_minutes=50, max_credit_cost=20) == ids(london_en)


async def test_archived_therapists_and_retired_types_drop_out(booking_stub: Any) -> None:
    tag = new_tag()
    kept, archived, retired = [await therapist(booking_stub, tag) for _ in range(3)]
    await booking_stub.ArchiveTherapist(booking_pb2.ArchiveTherapistRequest(therapist_id=archived.therapist_id))
    await booking_stub.RetireSessionType(
        booking_pb2.RetireSessionTypeRequest(therapist_id=retired.therapist_id, session_type_id=retired.session_type_id)
    )

    assert await listed(booking_stub, specialties=[tag]) == [kept.therapist_id, retired.therapist_id]
    assert await listed(booking_stub, specialties=[tag], include_archived=True) == [
        kept.therapist_id,
        archived.therapist_id,
        retired.therapist_id,
    ]
    assert await listed(booking_stub, specialties=[tag], duration_minutes=50) == [kept.therapist_id]


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"languages": ["EN"]}, "languages[0]"),
        ({"specialties": ["Anxiety Disorders"]}, "specialties[0]"),
        ({"time_zones": ["Europe/London", "Mars/Olympus_Mons"]}, "time_zones[1]"),
        ({"min_credit_cost": 30, "max_credit_cost": 20}, "max_credit_cost"),
        ({"duration_minutes": 3}, "duration_minutes"),
        ({"page_size": -1}, "page_size"),
    ],
)
async def test_a_bad_filter_names_its_field(booking_stub: Any, filters: dict[str, Any], field: str) -> None:
    refused = await refusal(booking_stub.ListTherapists(booking_pb2.ListTherapistsRequest(**filters)))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.field_violations


async def test_a_page_token_belongs_to_its_filters(booking_stub: Any) -> None:
    tag = new_tag()
    for _ in range(2):
        await therapist(booking_stub, tag)
    page = await booking_stub.ListTherapists(booking_pb2.ListTherapistsRequest(page_size=1, specialties=[tag]))
    refused = await refusal(
        booking_stub.ListTherapists(
            booking_pb2.ListTherapistsRequest(
                page_size=1, specialties=[tag], languages=["en"], page_token=page.next_page_token
            )
        )
    )
    assert list(refused.field_violations) == ["page_token"]


# --- SearchAvailability ---


def search(tag: str, start: datetime, end: datetime, **fields: Any) -> booking_pb2.SearchAvailabilityRequest:
    return booking_pb2.SearchAvailabilityRequest(
        duration_minutes=fields.pop("duration_minutes", 50),
        start_time=ts(start),
        end_time=ts(end),
        specialties=[tag],
        **fields,
    )


async def list_available(
    stub: Any, made: Made, start: datetime, end: datetime, time_zone: str = ""
) -> list[booking_pb2.Slot]:
    answer = await stub.ListAvailableSlots(
        booking_pb2.ListAvailableSlotsRequest(
            therapist_id=made.therapist_id,
            session_type_id=made.session_type_id,
            start_time=ts(start),
            end_time=ts(end),
            time_zone=time_zone,
        )
    )
    return list(answer.slots)


async def test_the_search_gives_the_first_slots_list_available_slots_gives(booking_stub: Any, credit_stub: Any) -> None:
    tag = new_tag()
    start, end = future_hour(3, 8), future_hour(3, 18)
    open_all_day = await therapist(booking_stub, tag, types=((50, 20), (50, 10), (80, 5)))
    mornings = await therapist(booking_stub, tag, windows=every_day(("09:00", "12:00")))
    nights = await therapist(booking_stub, tag, windows=every_day(("22:00", "23:00")))  # none in the range
    # A booking takes the first slot of the first therapist: the search skips it, as the listing does.
    booked = World(booking_stub, credit_stub, open_all_day.therapist_id, open_all_day.session_type_id, "", 10)
    booked.client_id = await booked.new_client(100)
    first_free = (await list_available(booking_stub, open_all_day, start, end))[0]
    await booked.book(first_free.start_time.ToDatetime(UTC))

    answer = await booking_stub.SearchAvailability(search(tag, start, end, slots_per_therapist=4))

    assert [r.therapist.therapist_id for r in answer.results] == [open_all_day.therapist_id, mornings.therapist_id]
    assert answer.therapists_examined == 3 and not answer.next_page_token
    first = answer.results[0]
    # Both 50-minute types, cheapest first; not the 80-minute one.
    assert [s.credit_cost for s in first.session_types] == [10, 20]
    for result, made in zip(answer.results, (open_all_day, mornings), strict=True):
        expected = await list_available(booking_stub, made, start, end)
        assert list(result.slots) == expected[:4]
        assert result.time_zone == "UTC"
    assert first_free not in first.slots
    assert nights.therapist_id not in {r.therapist.therapist_id for r in answer.results}


async def test_the_search_across_time_zones_and_a_dst_change(booking_stub: Any) -> None:
    """New York moves its clocks on Sunday 2027-03-14, London two weeks later. Both therapists
    work 09:00 to 11:00 their time: New York's slots move an hour earlier in UTC from the Sunday
    on, London's stay; a client in Tokyo sees them in Tokyo time."""
    tag = new_tag()
    new_york = await therapist(booking_stub, tag, time_zone="America/New_York", windows=every_day(("09:00", "11:00")))
    london = await therapist(booking_stub, tag, time_zone="Europe/London", windows=every_day(("09:00", "11:00")))
    start = datetime(2027, 3, 13, tzinfo=UTC)
    end = datetime(2027, 3, 15, tzinfo=UTC)

    # A 50-minute session on the default 15-minute grid of starts: 09:00 to 10:00, five a day, the
    # ten of the two days the most one answer gives per therapist.
    starts = ("09:00", "09:15", "09:30", "09:45", "10:00")
    own_zones = await booking_stub.SearchAvailability(search(tag, start, end, slots_per_therapist=10))
    by_id = {r.therapist.therapist_id: r for r in own_zones.results}
    assert [s.local_start for s in by_id[new_york.therapist_id].slots] == [
        f"2027-03-{day}T{hh_mm}:00{offset}" for day, offset in ((13, "-05:00"), (14, "-04:00")) for hh_mm in starts
    ]
    assert [s.start_time.ToDatetime(UTC).hour for s in by_id[new_york.therapist_id].slots] == [
        *(14, 14, 14, 14, 15),
        *(13, 13, 13, 13, 14),
    ]
    assert [s.local_start for s in by_id[london.therapist_id].slots] == [
        f"2027-03-{day}T{hh_mm}:00+00:00" for day in (13, 14) for hh_mm in starts
    ]

    in_tokyo = await booking_stub.SearchAvailability(
        search(
            tag, start, end, slots_per_therapist=10, time_zone="Asia/Tokyo", therapist_time_zones=["America/New_York"]
        )
    )
    (result,) = in_tokyo.results
    assert result.therapist.therapist_id == new_york.therapist_id
    assert result.time_zone == "Asia/Tokyo"
    assert result.slots[5].local_start == "2027-03-14T22:00:00+09:00"  # 09:00 EDT
    for made in (new_york, london):
        expected = await list_available(booking_stub, made, start, end, "Asia/Tokyo")
        found = await booking_stub.SearchAvailability(
            search(tag, start, end, slots_per_therapist=10, time_zone="Asia/Tokyo")
        )
        (same,) = [r for r in found.results if r.therapist.therapist_id == made.therapist_id]
        assert list(same.slots) == expected


async def test_one_call_examines_at_most_the_bound_and_the_next_page_goes_on(booking_stub: Any) -> None:
    """53 therapists with no free time, then 2 with some: the first call examines 50 and finds no
    one, but says where to go on; the second examines the last 5 and finds the 2."""
    tag = new_tag()
    busy = await asyncio.gather(*(therapist(booking_stub, tag, windows=[]) for _ in range(53)))
    free = [await therapist(booking_stub, tag) for _ in range(2)]
    start = future_hour(3, 9)
    request = search(tag, start, start + timedelta(hours=3), page_size=10)

    first = await booking_stub.SearchAvailability(request)
    assert (len(first.results), first.therapists_examined) == (0, MAX_THERAPISTS_EXAMINED)
    assert first.next_page_token

    request.page_token = first.next_page_token
    second = await booking_stub.SearchAvailability(request)
    assert [r.therapist.therapist_id for r in second.results] == [m.therapist_id for m in free]
    assert second.therapists_examined == 55 - MAX_THERAPISTS_EXAMINED
    assert not second.next_page_token
    assert len(busy) == 53


async def test_a_full_page_ends_the_call_early(booking_stub: Any) -> None:
    tag = new_tag()
    made = [await therapist(booking_stub, tag) for _ in range(5)]
    start = future_hour(3, 9)
    request = search(tag, start, start + timedelta(hours=3), page_size=2, slots_per_therapist=1)
    pages = []
    for _ in range(5):
        page = await booking_stub.SearchAvailability(request)
        pages.append(([r.therapist.therapist_id for r in page.results], page.therapists_examined))
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    ids = [m.therapist_id for m in made]
    assert pages == [(ids[0:2], 2), (ids[2:4], 2), (ids[4:5], 1)]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"duration_minutes": 0}, "duration_minutes"),
        ({"end": timedelta(days=15)}, "end_time"),
        ({"end": timedelta(0)}, "end_time"),
        ({"max_credit_cost": -1}, "max_credit_cost"),
        ({"therapist_time_zones": ["Nowhere/Town"]}, "therapist_time_zones[0]"),
        ({"slots_per_therapist": -1}, "slots_per_therapist"),
    ],
)
async def test_a_bad_search_names_its_field(booking_stub: Any, fields: dict[str, Any], field: str) -> None:
    start = future_hour(3, 9)
    end = start + fields.pop("end", timedelta(hours=3))
    refused = await refusal(booking_stub.SearchAvailability(search(new_tag(), start, end, **fields)))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.field_violations


async def test_an_unknown_display_zone_is_refused_like_list_available_slots(booking_stub: Any) -> None:
    start = future_hour(3, 9)
    refused = await refusal(
        booking_stub.SearchAvailability(search(new_tag(), start, start + timedelta(hours=1), time_zone="Mars/Base"))
    )
    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TIME_ZONE")


# --- over HTTP, through the real gateway ---


async def test_discovery_and_catalogue_changes_over_http(api_gateway: Gateway, booking_stub: Any) -> None:
    """The routes a web app uses, with repeated query parameters, a field mask and custom verbs."""
    tag = new_tag()
    english = await therapist(booking_stub, tag, languages=("en", "pt-BR"))
    await therapist(booking_stub, tag, languages=("ja",))
    base = f"{api_gateway.url}/v1"

    listed = await request_json("GET", f"{base}/therapists?specialties={tag}&languages=en&languages=pt-BR&page_size=5")
    assert listed.status == 200, listed.text
    assert [t["therapist_id"] for t in listed.json()["therapists"]] == [english.therapist_id]
    assert listed.json()["therapists"][0]["languages"] == ["en", "pt-BR"]

    start = future_hour(3, 9).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = future_hour(3, 12).strftime("%Y-%m-%dT%H:%M:%SZ")
    found = await request_json(
        "GET",
        f"{base}/availability?duration_minutes=50&start_time={start}&end_time={end}&specialties={tag}"
        "&languages=en&time_zone=America/New_York&slots_per_therapist=2",
    )
    assert found.status == 200, found.text
    (result,) = found.json()["results"]
    assert (result["therapist"]["therapist_id"], result["time_zone"]) == (english.therapist_id, "America/New_York")
    assert len(result["slots"]) == 2 and found.json()["therapists_examined"] == 1  # the filter held in SQL

    priced = await request_json(
        "PATCH",
        f"{base}/therapists/{english.therapist_id}/session-types/{english.session_type_id}?update_mask=credit_cost",
        {"credit_cost": "15"},
    )
    assert (priced.status, priced.json()["session_type"]["credit_cost"]) == (200, "15"), priced.text
    retired = await request_json(
        "POST", f"{base}/therapists/{english.therapist_id}/session-types/{english.session_type_id}:retire", {}
    )
    assert "retire_time" in retired.json()["session_type"], retired.text
    archived = await request_json("POST", f"{base}/therapists/{english.therapist_id}:archive", {})
    assert "archive_time" in archived.json()["therapist"], archived.text
    hidden = await request_json("GET", f"{base}/therapists?specialties={tag}")
    assert [t["languages"] for t in hidden.json()["therapists"]] == [["ja"]]
