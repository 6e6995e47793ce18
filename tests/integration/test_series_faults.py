"""A weekly series under process faults, as test_booking_faults.py does for one booking: real
processes, real sockets, a process dying at a protocol step.

A crash after the series' holds are made and before the locked step leaves every hold PENDING and
no session: the reconciler aborts the series key (one answer for the whole series), so no copy
can place any occurrence any more, and every hold is released: all or nothing holds through a
crash. A crash after the locked step leaves every occurrence placed and unpaid: the reconciler
commits every hold (the series is whole, and paid).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path

import grpc
import pytest

from booking.v1 import booking_pb2
from booking_service.requests import occurrence_id, request_key
from booking_service.service import CRASH_EXIT_CODE
from service_kit.errors import error_details
from tests.support.auth import OPERATOR_ID
from tests.support.processes import FAST_RECOVERY, Stack, running_stack, wait_exit, wait_for
from tests.support.world import World, ts

pytestmark = pytest.mark.timeout(90)

GRANTED = 100
COST = 10
OCCURRENCES = 3
CALL_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 15.0


async def new_world(stack: Stack) -> World:
    return await World.create(stack.booking_stub(0), stack.credit_stub(), credits=GRANTED, credit_cost=COST)


def series_request(world: World, hour: int) -> booking_pb2.CreateBookingSeriesRequest:
    start = datetime.combine(datetime.now(UTC).date() + timedelta(days=4), clock_time(hour), UTC)
    return booking_pb2.CreateBookingSeriesRequest(
        request_id=str(uuid.uuid4()),
        client_id=world.client_id,
        therapist_id=world.therapist_id,
        session_type_id=world.session_type_id,
        start_time=ts(start),
        occurrences=OCCURRENCES,
    )


def occurrence_ids(request: booking_pb2.CreateBookingSeriesRequest) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """The series key and its occurrences' booking ids (the tests' calls carry the operator's token)."""
    series_id = request_key(OPERATOR_ID, request.request_id)
    return series_id, [occurrence_id(series_id, index) for index in range(OCCURRENCES)]


async def crash_on(world: World, request: booking_pb2.CreateBookingSeriesRequest, stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await world.booking.CreateBookingSeries(request, timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert await wait_exit(stack.bookings[0]) == CRASH_EXIT_CODE, stack.logs()


async def test_a_crash_after_the_series_holds_aborts_the_whole_series_and_releases_every_hold(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(
        postgres_server_url, tmp_path, booking_env={"BOOKING_CRASH_POINTS": "after_reserve"}
    ) as stack:
        world = await new_world(stack)
        request = series_request(world, 9)
        await crash_on(world, request, stack)
        series_id, booking_ids = occurrence_ids(request)
        for booking_id in booking_ids:
            hold = await stack.reservation(booking_id)
            assert hold is not None and hold["status"] == "pending", hold
            assert hold["reference"] == f"therapist:{world.therapist_id}/series:{series_id}/booking:{booking_id}"
        assert await stack.buckets(world.client_id) == (GRANTED - OCCURRENCES * COST, OCCURRENCES * COST, 0, GRANTED)

        restarted_at = time.monotonic()
        await stack.start(stack.bookings[0], {"BOOKING_CRASH_POINTS": None, **FAST_RECOVERY})

        async def all_released() -> bool:
            holds = [await stack.reservation(booking_id) for booking_id in booking_ids]
            return all(hold is not None and hold["status"] == "released" for hold in holds)

        await wait_for(all_released, timeout_s=RECOVERY_TIMEOUT_S, what="every hold of the series released")
        assert time.monotonic() - restarted_at < RECOVERY_TIMEOUT_S
        assert await stack.refusal(series_id) == "BOOKING_ABORTED"  # one answer, for the whole series
        assert all([await stack.session(booking_id) is None for booking_id in booking_ids])
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)

        with pytest.raises(grpc.aio.AioRpcError) as again:
            await world.booking.CreateBookingSeries(request, timeout=CALL_TIMEOUT_S)
        assert (again.value.code(), error_details(again.value).reason) == (grpc.StatusCode.ABORTED, "BOOKING_ABORTED")
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)
        assert await stack.credit_violations([world.client_id]) == []


async def test_a_crash_after_the_series_is_decided_is_paid_whole_by_the_reconciler(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(
        postgres_server_url, tmp_path, booking_env={"BOOKING_CRASH_POINTS": "after_booking_commit"}
    ) as stack:
        world = await new_world(stack)
        request = series_request(world, 11)
        await crash_on(world, request, stack)
        series_id, booking_ids = occurrence_ids(request)
        for booking_id in booking_ids:
            session = await stack.session(booking_id)
            assert session is not None and (session["status"], session["payment_status"]) == ("confirmed", "committing")
        # As if the outbox had given up on the events (dead-lettered): the reconciler alone pays.
        await stack.booking_db.execute(
            "UPDATE booking.outbox SET status = 'dead' WHERE booking_id = ANY($1::uuid[])", booking_ids
        )

        await stack.start(stack.bookings[0], {"BOOKING_CRASH_POINTS": None, **FAST_RECOVERY})

        async def all_paid() -> bool:
            sessions = [await stack.session(booking_id) for booking_id in booking_ids]
            return all(session is not None and session["payment_status"] == "paid" for session in sessions)

        await wait_for(all_paid, timeout_s=RECOVERY_TIMEOUT_S, what="every occurrence paid")
        assert await stack.buckets(world.client_id) == (GRANTED - OCCURRENCES * COST, 0, OCCURRENCES * COST, GRANTED)
        series = await world.booking.CreateBookingSeries(request, timeout=CALL_TIMEOUT_S)
        assert series.series_id == str(series_id)
        assert [uuid.UUID(b.booking_id) for b in series.bookings] == booking_ids
        assert {b.payment_status for b in series.bookings} == {booking_pb2.PAYMENT_STATUS_PAID}
        assert await stack.credit_violations([world.client_id]) == []
