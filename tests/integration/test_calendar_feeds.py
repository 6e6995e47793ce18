"""iCalendar feeds over HTTP through the real gateway: a therapist's and a client's feed, fetched
without a bearer token at the URL that carries the feed token, parsed by `icalendar`: the events
with stable UIDs, the therapist's time zone, a cancelled one, SEQUENCE moved on by a reschedule;
a rotated token refuses the old URL."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import grpc
import icalendar
import pytest

from booking.v1 import booking_pb2
from service_kit.auth import CLIENT
from tests.support.auth import bearer, token
from tests.support.gateway import Gateway, HttpResponse, request_json
from tests.support.world import World, future_hour, refusal

pytestmark = pytest.mark.timeout(60)

LONDON = "Europe/London"
# What a calendar app sends: no Authorization header at all.
CALENDAR_APP = {"authorization": "", "accept": "text/calendar"}


async def fetch(gateway: Gateway, path: str) -> HttpResponse:
    return await request_json("GET", f"{gateway.url}{path}", headers=CALENDAR_APP)


def events_of(response: HttpResponse) -> dict[str, icalendar.Component]:
    assert response.status == 200, response.text
    assert response.headers["content-type"].startswith("text/calendar"), response.headers
    calendar = icalendar.Calendar.from_ical(response.text)
    return {str(event["uid"]): event for event in calendar.walk("VEVENT")}


async def test_a_therapists_feed_over_http_shows_its_sessions_in_its_zone_and_a_rotated_token_refuses_the_old_url(
    world: World, api_gateway: Gateway
) -> None:
    london = await World.create(world.booking, world.credit, time_zone=LONDON)
    kept = await london.book(future_hour(5, 9))
    moved = await london.book(future_hour(6, 9))
    cancelled = await london.book(future_hour(7, 9))
    await london.reschedule(moved.booking_id, future_hour(8, 9))
    await london.cancel(cancelled.booking_id)
    rotated = await london.booking.RotateCalendarFeed(
        booking_pb2.RotateCalendarFeedRequest(therapist_id=london.therapist_id)
    )
    assert rotated.feed_path == f"/v1/calendar-feeds/{rotated.feed_token}/calendar.ics"

    response = await fetch(api_gateway, rotated.feed_path)

    events = events_of(response)
    assert set(events) == {f"{b.booking_id}@therapy-booking" for b in (kept, moved, cancelled)}
    calendar = icalendar.Calendar.from_ical(response.text)
    assert [str(zone["tzid"]) for zone in calendar.walk("VTIMEZONE")] == [LONDON]
    first = events[f"{kept.booking_id}@therapy-booking"]
    start = first.decoded("dtstart")
    assert str(start.tzinfo) == LONDON
    assert start == future_hour(5, 9).astimezone(ZoneInfo(LONDON))
    assert (str(first["status"]), first.decoded("sequence")) == ("CONFIRMED", 0)
    assert events[f"{moved.booking_id}@therapy-booking"].decoded("sequence") == 1
    assert events[f"{moved.booking_id}@therapy-booking"].decoded("dtstart") == future_hour(8, 9)
    assert str(events[f"{cancelled.booking_id}@therapy-booking"]["status"]) == "CANCELLED"

    again = await london.booking.RotateCalendarFeed(
        booking_pb2.RotateCalendarFeedRequest(therapist_id=london.therapist_id)
    )
    old = await fetch(api_gateway, rotated.feed_path)
    assert old.status == 404
    assert old.json()["details"][0]["reason"] == "CALENDAR_FEED_NOT_FOUND", old.text
    assert set(events_of(await fetch(api_gateway, again.feed_path))) == set(events)


async def test_a_client_rotates_its_own_feed_which_shows_its_sessions_only(world: World, api_gateway: Gateway) -> None:
    mine = await world.book(future_hour(9, 15))
    other = await world.new_client()
    await world.book(future_hour(9, 17), client_id=other)
    as_client = bearer(token(world.client_id, [CLIENT]))
    request = booking_pb2.RotateCalendarFeedRequest(client_id=world.client_id)

    rotated = await world.booking.RotateCalendarFeed(request, metadata=as_client)
    someone_elses = await refusal(
        world.booking.RotateCalendarFeed(booking_pb2.RotateCalendarFeedRequest(client_id=other), metadata=as_client)
    )

    assert set(events_of(await fetch(api_gateway, rotated.feed_path))) == {f"{mine.booking_id}@therapy-booking"}
    assert someone_elses.code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_unknown_or_malformed_feed_token_is_refused_cleanly(api_gateway: Gateway) -> None:
    unknown = await fetch(api_gateway, f"/v1/calendar-feeds/{'A' * 43}/calendar.ics")
    malformed = await fetch(api_gateway, "/v1/calendar-feeds/not-a-token/calendar.ics")

    assert (unknown.status, unknown.json()["details"][0]["reason"]) == (404, "CALENDAR_FEED_NOT_FOUND")
    assert malformed.status == 400
    violations = [v for d in malformed.json()["details"] for v in d.get("field_violations", [])]
    assert [v["field"] for v in violations] == ["feed_token"], malformed.text
