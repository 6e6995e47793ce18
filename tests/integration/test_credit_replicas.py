"""Two credit replicas behind a booking replica (tests/support/processes.py, `credit_replicas=2`):
each serves on its own port, the booking replica balances its credit calls over both, losing one
costs nothing but a retry, and one restarted serves again on its port. The chaos harness relies
on all of it.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from tests.support.processes import Stack, is_running, running_stack
from tests.support.stack import health_status
from tests.support.world import World, future_hour

pytestmark = pytest.mark.timeout(90)

GRANTED = 100
COST = 10
CALL_TIMEOUT_S = 10.0
BOOKINGS_BEFORE_THE_KILL = 4
BOOKINGS_AFTER_THE_KILL = 2
# A client's retries of one request (same request id) while a replica's loss is noticed.
RETRIES = 3


async def book_paid(stack: Stack, world: World, hour: int) -> booking_pb2.Booking:
    """Books, retrying the same request on UNAVAILABLE as a client would; the booking, paid."""
    request = world.booking_request(future_hour(5, hour))
    for attempt in range(RETRIES):
        try:
            response = await world.booking.CreateBooking(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == RETRIES:
                raise
            continue
        assert response.booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID, response
        return response.booking
    raise AssertionError("unreachable")


def credit_calls(stack: Stack, replica: int, rpc: str) -> int:
    return sum(e.get("rpc") == rpc for e in stack.events(stack.credits[replica], "rpc_finished"))


async def test_two_credit_replicas_are_balanced_and_survive_the_loss_of_one(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path, credit_replicas=2) as stack:
        first, second = stack.credits
        assert first.port != second.port
        for process in stack.credits:
            assert await health_status(process.address, CREDIT_SERVICE_NAME) == "SERVING"
        assert stack.credit_target == f"ipv4:{first.address},{second.address}"
        assert stack.bookings[0].env["BOOKING_CREDIT_TARGET"] == stack.credit_target

        world = await World.create(stack.booking_stub(), stack.credit_stub(), credits=GRANTED, credit_cost=COST)
        # One database behind both: either replica sees the grant the other made.
        for replica in (0, 1):
            balance = await stack.credit_stub(replica).GetBalance(
                credit_pb2.GetBalanceRequest(owner_id=world.client_id), timeout=CALL_TIMEOUT_S
            )
            assert balance.balance.available == GRANTED

        for hour in range(BOOKINGS_BEFORE_THE_KILL):
            await book_paid(stack, world, 8 + hour)
        calls = [credit_calls(stack, r, "ReserveCredits") + credit_calls(stack, r, "CommitReservation") for r in (0, 1)]
        assert all(count > 0 for count in calls), f"credit calls per replica: {calls}"

        await stack.kill(first)
        for hour in range(BOOKINGS_AFTER_THE_KILL):
            await book_paid(stack, world, 14 + hour)

        await stack.start(first)
        assert await health_status(first.address, CREDIT_SERVICE_NAME) == "SERVING"
        balance = await stack.credit_stub(0).GetBalance(
            credit_pb2.GetBalanceRequest(owner_id=world.client_id), timeout=CALL_TIMEOUT_S
        )
        booked = BOOKINGS_BEFORE_THE_KILL + BOOKINGS_AFTER_THE_KILL
        assert (balance.balance.available, balance.balance.spent) == (GRANTED - booked * COST, booked * COST)
        await stack.wait_settled([world.client_id], timeout_s=CALL_TIMEOUT_S)
        assert await stack.credit_violations([world.client_id]) == []
    assert not any(is_running(p) for p in stack.processes), "a process outlived its stack"
