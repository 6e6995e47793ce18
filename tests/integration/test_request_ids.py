"""One answer per request, across replicas (docs/design.md, "One answer per request").

Real processes (two booking replicas, one credit service) over real sockets and real signals.
The first test replays the outside tester's finding: a request held up in a stalled credit
service, retried on the other replica while its slot is taken and freed again. Before the second
edition of the protocol the retry was refused, the first attempt went on to confirm and charge,
and every later repeat said "refused". Now the request has one answer everywhere, and the charge
matches it. The second sends each request to both replicas at once.
"""

from __future__ import annotations

import asyncio
import http.client
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from booking.v1 import booking_pb2
from booking_service.requests import request_key
from service_kit.errors import ErrorDetails
from tests.support.auth import OPERATOR_ID
from tests.support.processes import running_stack, wait_for
from tests.support.stack import free_port
from tests.support.world import World, future_hour, outcome, ts

pytestmark = pytest.mark.timeout(120)

COST = 10
GRANTED = 100
CALL_TIMEOUT_S = 15.0
# The booking replicas wait this long for the credit service, longer than the stall below.
CREDIT_CALL_TIMEOUT_S = "10"
SETTLE_TIMEOUT_S = 15.0
# Requests sent to both replicas at once, many of them for the same few slots.
TWIN_REQUESTS = 24
TWIN_SLOTS = 4


def answer_of(result: booking_pb2.CreateBookingResponse | ErrorDetails) -> str:
    """A request's answer in words: "booked <id>", or "<CODE> <REASON>"."""
    if isinstance(result, booking_pb2.CreateBookingResponse):
        return f"booked {result.booking.booking_id}"
    return f"{result.code.name} {result.reason}"


async def test_a_retry_on_another_replica_while_the_first_attempt_stalls_gets_the_one_answer(
    postgres_server_url: str, tmp_path: Path
) -> None:
    env = {"BOOKING_CREDIT_CALL_TIMEOUT_S": CREDIT_CALL_TIMEOUT_S}
    metrics_port = free_port()  # replica 1's, to see its reserve leave
    async with running_stack(
        postgres_server_url,
        tmp_path,
        booking_replicas=2,
        booking_env=env,
        replica_env=[{"BOOKING_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}],
    ) as stack:
        world = await World.create(stack.booking_stub(0), stack.credit_stub(), credits=GRANTED, credit_cost=COST)
        other = await world.new_client(GRANTED)
        slot_t, slot_s = future_hour(3, 9), future_hour(3, 14)
        # 1. Client B holds booking Y at slot T.
        held = (await world.booking.CreateBooking(world.booking_request(slot_t, client_id=other))).booking
        request = world.booking_request(slot_s)  # client A's request R, for slot S
        key = request_key(OPERATOR_ID, request.request_id)

        # 2. The credit service stalls; 3. R goes to replica 1, passes the pre-check and waits on
        # its reserve.
        stack.freeze(stack.credit)
        try:
            first = asyncio.ensure_future(outcome(stack.booking_stub(0).CreateBooking(request, timeout=CALL_TIMEOUT_S)))
            await wait_for(
                lambda: _reserves_started(metrics_port),
                timeout_s=CALL_TIMEOUT_S,
                what="the first attempt waiting on its reserve",
            )
            # 4. B reschedules Y into S.
            moved = await stack.booking_stub(1).RescheduleBooking(
                booking_pb2.RescheduleBookingRequest(
                    booking_id=held.booking_id, request_id=str(uuid.uuid4()), start_time=ts(slot_s)
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert moved.booking.start_time == ts(slot_s)
            # 5. A retries R on replica 2: the slot is taken, and that is now R's answer.
            retry = await outcome(stack.booking_stub(1).CreateBooking(request, timeout=CALL_TIMEOUT_S))
            # 6. B moves Y back to T.
            await stack.booking_stub(1).RescheduleBooking(
                booking_pb2.RescheduleBookingRequest(
                    booking_id=held.booking_id, request_id=str(uuid.uuid4()), start_time=ts(slot_t)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        finally:
            stack.thaw(stack.credit)
        # 7. The first attempt finishes, with the same answer, not a booking.
        answers = [answer_of(retry), answer_of(await first)]
        assert answers == ["FAILED_PRECONDITION SLOT_UNAVAILABLE"] * 2, answers
        # 8. Every later repeat, on either replica, gives that answer again; and the charge
        # matches it: no session for R, the hold the first attempt made is released.
        for replica in (0, 1, 0, 1):
            again = await outcome(stack.booking_stub(replica).CreateBooking(request, timeout=CALL_TIMEOUT_S))
            assert answer_of(again) == answers[0], again
        assert await stack.session(key) is None
        assert await stack.refusal(key) == "SLOT_UNAVAILABLE"

        async def released() -> bool:
            hold = await stack.reservation(key)
            return hold is not None and hold["status"] == "released"

        await wait_for(released, timeout_s=SETTLE_TIMEOUT_S, what="R's hold released")
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)
        # Slot S is free again, and a new request books it (charged once).
        booked = await world.booking.CreateBooking(world.booking_request(slot_s), timeout=CALL_TIMEOUT_S)
        assert booked.booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        assert await stack.credit_violations([world.client_id, other]) == []


async def _reserves_started(metrics_port: int) -> bool:
    """Whether the booking replica has started a ReserveCredits call (its client metrics)."""

    def scrape() -> str:
        connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    lines = (await asyncio.to_thread(scrape)).splitlines()
    return any(
        line.startswith("grpc_client_started_total{")
        and 'grpc_method="ReserveCredits"' in line
        and not line.endswith(" 0.0")
        for line in lines
    )


async def test_one_request_sent_to_both_replicas_at_once_gets_one_answer_and_one_charge(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path, booking_replicas=2) as stack:
        world = await World.create(stack.booking_stub(0), stack.credit_stub(), credits=GRANTED, credit_cost=COST)
        clients = [await world.new_client(GRANTED) for _ in range(TWIN_REQUESTS // 2)]
        base = future_hour(5, 9)
        requests = [
            world.booking_request(base + timedelta(hours=i % TWIN_SLOTS), client_id=clients[i % len(clients)])
            for i in range(TWIN_REQUESTS)
        ]

        async def twice(request: booking_pb2.CreateBookingRequest) -> list[str]:
            results = await asyncio.gather(
                *(outcome(stack.booking_stub(r).CreateBooking(request, timeout=CALL_TIMEOUT_S)) for r in (0, 1))
            )
            return [answer_of(result) for result in results]

        answered = await asyncio.gather(*(twice(request) for request in requests))

        for request, (one, two) in zip(requests, answered, strict=True):
            assert one == two, (request.request_id, one, two)
        booked = [one for one, _ in answered if one.startswith("booked ")]
        # Each slot went to one request, and every other request for it was refused.
        assert len(booked) == TWIN_SLOTS, answered
        assert {a for a, _ in answered} - set(booked) <= {"FAILED_PRECONDITION SLOT_UNAVAILABLE"}, answered
        spent = 0
        for client in clients:
            _, held, client_spent, _ = await stack.buckets(client)
            assert held == 0, client
            spent += client_spent
        assert spent == TWIN_SLOTS * COST
        assert await stack.credit_violations(clients) == []
        # And the answers stand on a third asking, as refusals or the same booking.
        for request, (one, _) in zip(requests, answered, strict=True):
            assert answer_of(await outcome(stack.booking_stub(0).CreateBooking(request))) == one
