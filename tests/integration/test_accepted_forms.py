"""The forms the API accepts (docs/http-api.md, "Accepted forms and malformed requests"): one
spelling of a UUID, text normalised and free of control characters, IANA zone names only, and
dates and instants within the window every computation is bounded to. Over real gRPC to the
in-process services; every refusal names its field."""

from __future__ import annotations

import uuid

import grpc
import pytest

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from tests.support.world import World, future_hour, refusal

NAME_ATTACKS = (
    "Dr. Evil\r\nX-Injected: yes",
    "Dr.\x00Null",
    "Dr.\x1b[31mRed",
    "Dr. \u202eliveD",  # right-to-left override: displays reversed
    "Dr. Tab\tbed",
    "Dr.\x85Next line",  # C1 control
    "Dr.\u2028Separator",
)
REFUSED_ZONES = ("Factory", "posixrules", "localtime", "posix/Europe/London", "right/UTC", " UTC", "utc", "Etc/GMT+14")


def therapist_request(
    display_name: str = "Dr. Forms", time_zone: str = "Europe/London"
) -> booking_pb2.CreateTherapistRequest:
    return booking_pb2.CreateTherapistRequest(
        request_id=str(uuid.uuid4()),
        therapist=booking_pb2.Therapist(display_name=display_name, time_zone=time_zone, booking_horizon_days=365),
    )


@pytest.mark.parametrize("display_name", NAME_ATTACKS)
async def test_names_with_control_or_reordering_characters_are_refused(world: World, display_name: str) -> None:
    details = await refusal(world.booking.CreateTherapist(therapist_request(display_name)))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details.field_violations) == {"therapist.display_name"}, details


async def test_names_are_stored_in_nfc_without_surrounding_space(world: World) -> None:
    decomposed = "  Dr. Ame\u0301lie \U0001f9d8\u200d\u2640\ufe0f "  # e + combining acute; a ZWJ emoji stays

    created = (await world.booking.CreateTherapist(therapist_request(decomposed))).therapist
    session_type = (
        await world.booking.CreateSessionType(
            booking_pb2.CreateSessionTypeRequest(
                therapist_id=world.therapist_id,
                request_id=str(uuid.uuid4()),
                session_type=booking_pb2.SessionType(name="Cafe\u0301 chat", duration_minutes=30, credit_cost=1),
            )
        )
    ).session_type

    assert created.display_name == "Dr. Am\u00e9lie \U0001f9d8\u200d\u2640\ufe0f"
    assert session_type.name == "Caf\u00e9 chat"


@pytest.mark.parametrize("time_zone", REFUSED_ZONES)
async def test_only_iana_zone_names_are_accepted(world: World, time_zone: str) -> None:
    details = await refusal(world.booking.CreateTherapist(therapist_request(time_zone=time_zone)))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "UNKNOWN_TIME_ZONE", details
    assert set(details.field_violations) == {"therapist.time_zone"}, details


@pytest.mark.parametrize("time_zone", ["UTC", "Europe/Kyiv", "Europe/Kiev", "US/Eastern", "Etc/GMT-14"])
async def test_zone_and_link_names_are_accepted_and_returned_as_given(world: World, time_zone: str) -> None:
    created = (await world.booking.CreateTherapist(therapist_request(time_zone=time_zone))).therapist

    assert created.time_zone == time_zone


def spellings(value: str) -> list[str]:
    return [value.upper(), "{" + value + "}", "urn:uuid:" + value, value.replace("-", ""), value + "\n", f" {value}"]


async def test_a_uuid_has_one_accepted_spelling(world: World) -> None:
    for spelling in spellings(world.therapist_id):
        details = await refusal(world.booking.GetTherapist(booking_pb2.GetTherapistRequest(therapist_id=spelling)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, spelling
        assert set(details.field_violations) == {"therapist_id"}, (spelling, details)
    for spelling in spellings(world.client_id):
        details = await refusal(world.credit.GetBalance(credit_pb2.GetBalanceRequest(owner_id=spelling)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, spelling

    therapist = await world.booking.GetTherapist(booking_pb2.GetTherapistRequest(therapist_id=world.therapist_id))

    assert therapist.therapist.therapist_id == str(uuid.UUID(world.therapist_id)), "the API answers the same spelling"


@pytest.mark.parametrize(
    ("date_time", "time_zone"),
    [
        ("9999-12-31T23:59:59", "Europe/London"),
        ("9999-12-31T23:59", "Pacific/Kiritimati"),
        ("0001-01-01T00:00", "America/New_York"),
        ("2100-01-01T00:00", "UTC"),
        ("1999-12-31T23:59", "UTC"),
        ("2000-01-01T00:00", "Pacific/Kiritimati"),  # 1999-12-31T10:00Z
    ],
)
async def test_local_times_outside_the_window_are_refused_with_the_field(
    world: World, date_time: str, time_zone: str
) -> None:
    request = world.local_booking_request(date_time)
    request.local_start.time_zone = time_zone

    created = await refusal(world.booking.CreateBooking(request))
    assert created.code == grpc.StatusCode.INVALID_ARGUMENT, created
    assert set(created.field_violations) == {"local_start.date_time"}, created


async def test_rescheduling_to_a_far_future_local_time_is_refused(world: World) -> None:
    booking = await world.book(future_hour(3, 10))
    request = booking_pb2.RescheduleBookingRequest(
        booking_id=booking.booking_id,
        request_id=str(uuid.uuid4()),
        local_start=booking_pb2.LocalDateTime(date_time="9999-12-31T23:59:59", time_zone="Europe/London"),
    )

    details = await refusal(world.booking.RescheduleBooking(request))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert set(details.field_violations) == {"local_start.date_time"}, details
    assert (await world.get(booking.booking_id)).start_time == booking.start_time, "nothing moved"


async def test_a_reference_is_one_line_and_a_note_may_have_several(world: World) -> None:
    reserve = credit_pb2.ReserveCreditsRequest(
        reservation_id=str(uuid.uuid4()), owner_id=world.client_id, amount=1, reference="booking\nforged"
    )
    details = await refusal(world.credit.ReserveCredits(reserve))
    assert set(details.field_violations) == {"reference"}, details

    granted = await world.credit.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()),
            owner_id=world.client_id,
            amount=1,
            kind=credit_pb2.GRANT_KIND_ADJUSTMENT,
            note="Refund for ticket 42.\n\tApproved by support.",
        )
    )
    assert granted.entry.granted_delta == 1
