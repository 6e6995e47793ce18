"""Session types change (name, price) and retire; therapists are archived (docs/design.md,
"Discovery"). A retired type or an archived therapist is refused with a reason of its own,
recorded as the request's answer; what was booked before stays readable and keeps its price.

Every replica keeps the booking rules in memory (booking_service/rules_cache.py), checked against
the therapist's schedule_version. A change to a session type moves that version on (the trigger
of migration 0006), so a booking made on another replica right after the change obeys it; with
the trigger disabled, the other replica books from memory at the old price (the control).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2_grpc
from tests.support.booking_server import Server, booking_server
from tests.support.stack import fresh_database
from tests.support.world import World, future_hour, refusal

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def price_change(world: World, cost: int, session_type_id: str | None = None) -> booking_pb2.UpdateSessionTypeRequest:
    return booking_pb2.UpdateSessionTypeRequest(
        session_type=booking_pb2.SessionType(
            therapist_id=world.therapist_id,
            session_type_id=session_type_id or world.session_type_id,
            credit_cost=cost,
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["credit_cost"]),
    )


def retirement(world: World, session_type_id: str | None = None) -> booking_pb2.RetireSessionTypeRequest:
    return booking_pb2.RetireSessionTypeRequest(
        therapist_id=world.therapist_id, session_type_id=session_type_id or world.session_type_id
    )


async def test_a_new_price_applies_to_new_bookings_and_old_ones_keep_theirs(world: World) -> None:
    before = await world.book(future_hour(3, 9))
    updated = await world.booking.UpdateSessionType(price_change(world, 25))
    assert updated.session_type.credit_cost == 25
    assert updated.session_type.duration_minutes == 50  # untouched

    after = await world.book(future_hour(3, 11))
    assert after.credit_cost == 25
    assert (await world.get(before.booking_id)).credit_cost == 10
    assert (await world.balance()).available == 100 - 10 - 25


async def test_a_name_changes_alone(world: World) -> None:
    changed = await world.booking.UpdateSessionType(
        booking_pb2.UpdateSessionTypeRequest(
            session_type=booking_pb2.SessionType(
                therapist_id=world.therapist_id, session_type_id=world.session_type_id, name="  Follow-up  "
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    assert (changed.session_type.name, changed.session_type.credit_cost) == ("Follow-up", 10)


def policy_change(world: World, **fields: Any) -> booking_pb2.UpdateSessionTypeRequest:
    return booking_pb2.UpdateSessionTypeRequest(
        session_type=booking_pb2.SessionType(
            therapist_id=world.therapist_id, session_type_id=world.session_type_id, **fields
        ),
        update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
    )


async def test_a_new_refund_policy_applies_to_the_next_cancellation(world: World) -> None:
    """Three days ahead is early under the default notice (a full refund); after a week's notice
    with half back is set, cancelling a booking of the same session three days ahead is late."""
    early = await world.book(future_hour(3, 9))
    late = await world.book(future_hour(3, 11))
    assert (await world.cancel(early.booking_id)).cancellation.refunded_credits == 10
    changed = await world.booking.UpdateSessionType(
        policy_change(world, late_cancellation_notice_minutes=7 * 24 * 60, late_cancellation_refund_percent=50)
    )
    policy = changed.session_type
    assert (policy.late_cancellation_notice_minutes, policy.late_cancellation_refund_percent) == (10080, 50)
    assert (policy.no_show_refund_percent, policy.credit_cost, policy.start_step_minutes) == (0, 10, 5)
    assert (await world.cancel(late.booking_id)).cancellation.refunded_credits == 5
    assert (await world.balance()).available == 100 - 10 + 10 - 10 + 5

    refused = await refusal(world.booking.UpdateSessionType(policy_change(world, no_show_refund_percent=101)))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(refused.field_violations) == ["session_type.no_show_refund_percent"]


@pytest.mark.parametrize(
    ("paths", "field", "says"),
    [
        ([], "update_mask", "must name the fields"),
        (["duration_minutes"], "update_mask", "create another session type and retire this one"),
        (["start_step_minutes"], "update_mask", "create another session type and retire this one"),
        (["retire_time"], "update_mask", "cannot change 'retire_time'"),
        (["credit_cost"], "session_type.credit_cost", "between 1 and 10000"),
    ],
)
async def test_a_bad_update_names_its_field_and_changes_nothing(
    world: World, paths: list[str], field: str, says: str
) -> None:
    request = price_change(world, 0)
    request.update_mask.paths[:] = paths
    refused = await refusal(world.booking.UpdateSessionType(request))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(refused.field_violations) == [field]
    assert says in refused.field_violations[field]
    (current,) = (
        await world.booking.ListSessionTypes(booking_pb2.ListSessionTypesRequest(therapist_id=world.therapist_id))
    ).session_types
    assert current.credit_cost == 10


async def test_another_therapists_session_type_is_not_found(world: World, credit_stub: Any) -> None:
    other = await World.create(world.booking, credit_stub, credits=0)
    for call in (
        world.booking.UpdateSessionType(price_change(world, 20, other.session_type_id)),
        world.booking.RetireSessionType(retirement(world, other.session_type_id)),
    ):
        refused = await refusal(call)
        assert (refused.code, refused.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_TYPE_NOT_FOUND")


async def test_a_retired_type_is_refused_for_good_and_its_bookings_stay(world: World) -> None:
    booked = await world.book(future_hour(4, 9))
    retired = (await world.booking.RetireSessionType(retirement(world))).session_type
    assert retired.HasField("retire_time")
    again = (await world.booking.RetireSessionType(retirement(world))).session_type
    assert again.retire_time == retired.retire_time  # idempotent: the first retirement stands

    request = world.booking_request(future_hour(4, 11))
    first = await refusal(world.booking.CreateBooking(request))
    assert (first.code, first.reason) == (FAILED_PRECONDITION, "SESSION_TYPE_RETIRED")
    assert first.metadata["session_type_id"] == world.session_type_id
    repeat = await refusal(world.booking.CreateBooking(request))
    assert (repeat.reason, repeat.message) == (first.reason, first.message)  # the recorded answer

    slots = await refusal(world.slots(future_hour(4, 0), future_hour(5, 0)))
    assert slots.reason == "SESSION_TYPE_RETIRED"

    # What was booked before stays: readable, listed, movable and cancellable.
    assert (await world.get(booked.booking_id)).status == booking_pb2.BOOKING_STATUS_CONFIRMED
    listed = await world.booking.ListBookings(booking_pb2.ListBookingsRequest(client_id=world.client_id))
    assert [b.booking_id for b in listed.bookings] == [booked.booking_id]
    moved = await world.reschedule(booked.booking_id, future_hour(4, 13))
    assert moved.start_time.ToDatetime().hour == 13
    await world.cancel(booked.booking_id)

    visible = await world.booking.ListSessionTypes(booking_pb2.ListSessionTypesRequest(therapist_id=world.therapist_id))
    assert list(visible.session_types) == []
    everything = await world.booking.ListSessionTypes(
        booking_pb2.ListSessionTypesRequest(therapist_id=world.therapist_id, include_retired=True)
    )
    assert [s.session_type_id for s in everything.session_types] == [world.session_type_id]


async def test_an_archived_therapist_is_refused_and_their_bookings_stay(world: World) -> None:
    booked = await world.book(future_hour(5, 9))
    archived = (
        await world.booking.ArchiveTherapist(booking_pb2.ArchiveTherapistRequest(therapist_id=world.therapist_id))
    ).therapist
    assert archived.HasField("archive_time")

    refused = await refusal(world.book(future_hour(5, 11)))
    assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "THERAPIST_ARCHIVED")
    moved = await refusal(world.reschedule(booked.booking_id, future_hour(5, 13)))
    assert moved.reason == "THERAPIST_ARCHIVED"
    slots = await refusal(world.slots(future_hour(5, 0), future_hour(6, 0)))
    assert slots.reason == "THERAPIST_ARCHIVED"

    got = await world.booking.GetTherapist(booking_pb2.GetTherapistRequest(therapist_id=world.therapist_id))
    assert got.therapist.archive_time == archived.archive_time
    assert (await world.get(booked.booking_id)).status == booking_pb2.BOOKING_STATUS_CONFIRMED
    cancelled = await world.cancel(booked.booking_id, actor=booking_pb2.CANCELLATION_ACTOR_ADMIN)
    assert cancelled.cancellation.refunded_credits == 10

    restored = await world.booking.UnarchiveTherapist(
        booking_pb2.UnarchiveTherapistRequest(therapist_id=world.therapist_id)
    )
    assert not restored.therapist.HasField("archive_time")
    assert (await world.book(future_hour(5, 15))).status == booking_pb2.BOOKING_STATUS_CONFIRMED


@pytest.fixture
async def two_replicas(postgres_server_url: str, credit_address: str) -> AsyncIterator[tuple[Server, Server]]:
    """Two booking replicas on one database of their own, each with its rules cache."""
    database = await fresh_database(postgres_server_url, "session_type_replicas")
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(booking_server(database, credit_address))
        second = await stack.enter_async_context(booking_server(database, credit_address))
        yield first, second


async def warmed(
    replicas: tuple[Server, Server], credit_stub: credit_pb2_grpc.CreditServiceStub
) -> tuple[World, World]:
    """One therapist and client seen from each replica, each replica having booked once (so both
    hold the therapist's rules in memory)."""
    first = await World.create(replicas[0].stub, credit_stub, credits=1000)
    second = World(replicas[1].stub, first.credit, first.therapist_id, first.session_type_id, first.client_id, 10)
    await first.book(future_hour(3, 1))
    await second.book(future_hour(3, 2))
    return first, second


async def test_a_price_changed_on_one_replica_is_charged_by_the_other_at_once(
    two_replicas: tuple[Server, Server], credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    first, second = await warmed(two_replicas, credit_stub)
    await first.booking.UpdateSessionType(price_change(first, 25))

    booked = await second.book(future_hour(3, 3))
    assert booked.credit_cost == 25
    reservation = await second.reservation(booked.booking_id)
    assert reservation.amount == 25


async def test_a_type_retired_on_one_replica_is_refused_by_the_other_at_once(
    two_replicas: tuple[Server, Server], credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    first, second = await warmed(two_replicas, credit_stub)
    await first.booking.RetireSessionType(retirement(first))

    refused = await refusal(second.book(future_hour(3, 3)))
    assert refused.reason == "SESSION_TYPE_RETIRED"


async def test_a_therapist_archived_on_one_replica_is_refused_by_the_other_at_once(
    two_replicas: tuple[Server, Server], credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    first, second = await warmed(two_replicas, credit_stub)
    await first.booking.ArchiveTherapist(booking_pb2.ArchiveTherapistRequest(therapist_id=first.therapist_id))

    refused = await refusal(second.book(future_hour(3, 3)))
    assert refused.reason == "THERAPIST_ARCHIVED"


async def test_control_without_the_trigger_the_other_replica_books_from_memory(
    two_replicas: tuple[Server, Server], credit_stub: credit_pb2_grpc.CreditServiceStub
) -> None:
    """What the trigger prevents: a price written without moving the version on is not seen by a
    replica that holds the rules in memory. (So the tests above can fail.)"""
    first, second = await warmed(two_replicas, credit_stub)
    connection = await asyncpg.connect(two_replicas[0].database_url)
    try:
        async with connection.transaction():
            await connection.execute("ALTER TABLE booking.session_types DISABLE TRIGGER session_types_schedule_version")
            await connection.execute(
                "UPDATE booking.session_types SET credit_cost = 25 WHERE session_type_id = $1",
                uuid.UUID(first.session_type_id),
            )
            await connection.execute("ALTER TABLE booking.session_types ENABLE TRIGGER session_types_schedule_version")
    finally:
        await connection.close()

    assert (await second.book(future_hour(3, 3))).credit_cost == 10  # from memory: stale
