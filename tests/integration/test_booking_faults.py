"""The booking protocol under process faults: real credit and booking processes over real
sockets, real PostgreSQL, and real signals (SIGTERM, SIGSTOP, a process dying at a protocol step).

Each test breaks one thing, then shows what docs/design.md promises: a prompt, clear refusal while
it is broken; after recovery no credit held forever, no session unpaid, no payment without its
session; and one answer per request: a retry with the same request_id continues the same booking
(its key, and so its hold, are derived from the caller and the request id), unless the reconciler
gave the request up, in which case every retry gets BOOKING_ABORTED and a new request books, charged once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from booking.v1 import booking_pb2
from booking_service.requests import request_key
from booking_service.service import CRASH_EXIT_CODE
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2
from service_kit.errors import error_details
from tests.support.auth import OPERATOR_ID
from tests.support.processes import BOOKING_MODULE, FAST_RECOVERY, Stack, running_stack, wait_exit, wait_for
from tests.support.stack import ServiceProcess, health_status
from tests.support.world import World, future_hour

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub

pytestmark = pytest.mark.timeout(90)

GRANTED = 100
COST = 10
CALL_TIMEOUT_S = 10.0
# A refusal for a dead dependency comes at once (connection refused, then a few retries of
# 50-500 ms): far below the 10 s default deadline.
PROMPT_REFUSAL_S = 3.0
# The client deadline while the credit service is frozen, and what it may overrun by.
FROZEN_CALL_DEADLINE_S = 2.0
# A caller that gives up on its own, well before that deadline.
ABANDON_AFTER_S = 0.5
HUNG_CALLS = 3
DEADLINE_SLACK_S = 1.0
RECOVERY_TIMEOUT_S = 15.0
START_TIMEOUT_S = 30.0


async def sessions_of_client(stack: Stack, client_id: str) -> int:
    count = await stack.booking_db.fetchval(
        "SELECT count(*) FROM booking.sessions WHERE client_id = $1", uuid.UUID(client_id)
    )
    return int(count)


async def assert_books_straight(stack: Stack, *owners: str) -> None:
    violations = await stack.credit_violations(owners)
    assert violations == [], violations


async def listed_bookings(world: World) -> list[booking_pb2.Booking]:
    response = await world.booking.ListBookings(
        booking_pb2.ListBookingsRequest(client_id=world.client_id), timeout=CALL_TIMEOUT_S
    )
    return list(response.bookings)


async def refused(
    stub: BookingServiceAsyncStub, request: booking_pb2.CreateBookingRequest, timeout_s: float
) -> tuple[grpc.aio.AioRpcError, float]:
    """Makes a call that must fail; the error and how long the failure took."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateBooking(request, timeout=timeout_s)
    return raised.value, time.monotonic() - started


async def created(stub: BookingServiceAsyncStub, request: booking_pb2.CreateBookingRequest) -> booking_pb2.Booking:
    response = await stub.CreateBooking(request, timeout=CALL_TIMEOUT_S)
    return response.booking


def key_of(request: booking_pb2.CreateBookingRequest) -> uuid.UUID:
    """The request's key, and so its booking id and its hold's reservation id (the tests' calls
    carry the operator's token)."""
    return request_key(OPERATOR_ID, request.request_id)


async def new_world(stack: Stack) -> World:
    return await World.create(stack.booking_stub(0), stack.credit_stub(), credits=GRANTED, credit_cost=COST)


# --- 1. the credit service is down ---


async def test_credit_service_down_refuses_promptly_and_the_same_request_succeeds_once_it_is_back(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path) as stack:
        world = await new_world(stack)
        request = world.booking_request(future_hour(3, 10))
        assert await stack.stop(stack.credit) == 0, stack.logs()

        error, took_s = await refused(world.booking, request, CALL_TIMEOUT_S)
        details = error_details(error)
        assert details.code == grpc.StatusCode.UNAVAILABLE, details
        assert details.reason == "CREDIT_SERVICE_UNAVAILABLE", details
        assert details.domain == BOOKING_SERVICE_NAME
        assert took_s < PROMPT_REFUSAL_S, f"the refusal took {took_s:.2f} s"
        assert await listed_bookings(world) == []
        assert await sessions_of_client(stack, world.client_id) == 0
        # No answer was recorded (the credit service's silence is none), so a retry continues.
        assert await stack.refusal(key_of(request)) is None

        await stack.start(stack.credit)
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)  # nothing was held
        booking = await created(world.booking, request)
        assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
        assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        assert uuid.UUID(booking.booking_id) == key_of(request)
        repeated = await created(world.booking, request)
        assert repeated.booking_id == booking.booking_id
        assert [b.booking_id for b in await listed_bookings(world)] == [booking.booking_id]
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        await assert_books_straight(stack, world.client_id)


# --- 2. the credit service hangs ---


async def test_a_frozen_credit_service_times_out_within_the_deadline_and_leaves_no_half_booking(  # noqa: PLR0915  # one story, told in order
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path, booking_env=FAST_RECOVERY) as stack:
        world = await new_world(stack)
        # One caller waits out its deadline; another gives up (cancels) before that.
        waited, abandoned = world.booking_request(future_hour(3, 11)), world.booking_request(future_hour(3, 13))
        stack.freeze(stack.credit)
        try:
            abandoned_call = world.booking.CreateBooking(abandoned, timeout=CALL_TIMEOUT_S)
            waiting = asyncio.ensure_future(refused(world.booking, waited, FROZEN_CALL_DEADLINE_S))
            await asyncio.sleep(ABANDON_AFTER_S)
            abandoned_call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await abandoned_call
            error, took_s = await waiting
        finally:
            stack.thaw(stack.credit)
        details = error_details(error)
        assert (details.code, details.reason) in {
            (grpc.StatusCode.DEADLINE_EXCEEDED, None),  # the client's own deadline fired first
            (grpc.StatusCode.DEADLINE_EXCEEDED, "CREDIT_SERVICE_TIMEOUT"),
            (grpc.StatusCode.UNAVAILABLE, "CREDIT_SERVICE_TIMEOUT"),
        }, details
        assert took_s < FROZEN_CALL_DEADLINE_S + DEADLINE_SLACK_S, f"the call took {took_s:.2f} s"

        keys = [key_of(r) for r in (waited, abandoned)]

        # The frozen process may still act on what it received: whatever hold it made must be
        # released by the reconciler (no session -> BOOKING_ABORTED recorded -> cancel).
        async def settled() -> bool:
            holds = [await stack.reservation(key) for key in keys]
            released = all(h is None or h["status"] == "released" for h in holds)
            return released and (await stack.buckets(world.client_id))[1] == 0

        await wait_for(settled, timeout_s=RECOVERY_TIMEOUT_S, what="no credit held")
        made_holds = set()
        for key in keys:
            hold = await stack.reservation(key)
            if hold is not None:
                made_holds.add(key)
                assert hold["release_reason"] == "cancelled", hold
                assert await stack.refusal(key) == "BOOKING_ABORTED"
            else:
                assert await stack.refusal(key) is None
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)
        assert await sessions_of_client(stack, world.client_id) == 0
        assert await listed_bookings(world) == []
        # The booking process's canonical lines say what happened to each call (not OK).
        finished = [e for e in stack.events(stack.bookings[0], "rpc_finished") if e.get("rpc") == "CreateBooking"]
        assert sorted(e["grpc_code"] for e in finished) == ["CANCELLED", "DEADLINE_EXCEEDED"], finished

        # A frozen credit service cancels the abandoned calls when it wakes, so the holds above
        # are rarely made. The reconciler, whose listing calls hung against the frozen process,
        # must still be alive: holds with no session (as a coordinator that died after Reserve
        # leaves them: one of this version, one of the previous) are released within seconds.
        orphan, legacy_orphan = uuid.uuid4(), uuid.uuid4()
        for reservation_id, reference in (
            (orphan, f"therapist:{world.therapist_id}/booking:{orphan}"),
            (legacy_orphan, f"booking:{legacy_orphan}"),
        ):
            await world.credit.ReserveCredits(
                credit_pb2.ReserveCreditsRequest(
                    reservation_id=str(reservation_id), owner_id=world.client_id, amount=COST, reference=reference
                ),
                timeout=CALL_TIMEOUT_S,
            )

        async def orphans_released() -> bool:
            found = [await stack.reservation(o) for o in (orphan, legacy_orphan)]
            return all(f is not None and f["status"] == "released" for f in found)

        await wait_for(orphans_released, timeout_s=RECOVERY_TIMEOUT_S, what="the orphaned holds released")
        assert await stack.refusal(orphan) == "BOOKING_ABORTED"
        assert await stack.legacy_decision(legacy_orphan) == "abort"
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)

        # The clients' retries of the same requests: a request whose hold the reconciler gave up is
        # answered BOOKING_ABORTED, every time; one that never held credits books, charged once.
        for request, key in zip((waited, abandoned), keys, strict=True):
            retry = request
            if key in made_holds:
                error, _ = await refused(world.booking, request, CALL_TIMEOUT_S)
                assert (error.code(), error_details(error).reason) == (grpc.StatusCode.ABORTED, "BOOKING_ABORTED")
                retry = world.booking_request(request.start_time.ToDatetime(tzinfo=UTC))  # a new request
            booking = await created(world.booking, retry)
            assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
            assert uuid.UUID(booking.booking_id) == key_of(retry)
        assert len(await listed_bookings(world)) == 2
        assert await stack.buckets(world.client_id) == (GRANTED - 2 * COST, 0, 2 * COST, GRANTED)
        await assert_books_straight(stack, world.client_id)


# --- 3. the booking process dies between ReserveCredits and the booking transaction ---


async def test_a_crash_after_reserve_is_given_up_by_the_reconciler_which_is_the_request_s_answer(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(
        postgres_server_url, tmp_path, booking_env={"BOOKING_CRASH_POINTS": "after_reserve"}
    ) as stack:
        booking_process = stack.bookings[0]
        world = await new_world(stack)
        request = world.booking_request(future_hour(4, 9))

        error, _ = await refused(world.booking, request, CALL_TIMEOUT_S)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert await wait_exit(booking_process) == CRASH_EXIT_CODE, stack.logs()
        crashed = key_of(request)
        hold = await stack.reservation(crashed)
        assert hold is not None and hold["status"] == "pending" and hold["amount"] == COST, hold
        assert hold["reference"] == f"therapist:{world.therapist_id}/booking:{crashed}"
        assert await stack.buckets(world.client_id) == (GRANTED - COST, COST, 0, GRANTED)
        assert await stack.refusal(crashed) is None
        assert await stack.session(crashed) is None

        restarted_at = time.monotonic()
        await stack.start(booking_process, {"BOOKING_CRASH_POINTS": None, **FAST_RECOVERY})

        async def released() -> bool:
            found = await stack.reservation(crashed)
            return found is not None and found["status"] == "released"

        await wait_for(released, timeout_s=RECOVERY_TIMEOUT_S, what="the orphaned hold released")
        assert time.monotonic() - restarted_at < RECOVERY_TIMEOUT_S
        hold = await stack.reservation(crashed)
        assert hold is not None and hold["release_reason"] == "cancelled", hold
        assert await stack.refusal(crashed) == "BOOKING_ABORTED"
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)
        assert await stack.session(crashed) is None
        assert await listed_bookings(world) == []

        # The reconciler's abort is the request's answer: every retry gets it, and holds nothing.
        for _ in range(2):
            error, _ = await refused(world.booking, request, CALL_TIMEOUT_S)
            assert (error.code(), error_details(error).reason) == (grpc.StatusCode.ABORTED, "BOOKING_ABORTED")
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)

        # A new request books, charged once.
        again = world.booking_request(future_hour(4, 9))
        booking = await created(world.booking, again)
        assert uuid.UUID(booking.booking_id) == key_of(again)
        assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
        assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        assert (await created(world.booking, again)).booking_id == booking.booking_id
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        committed = await stack.reservation(uuid.UUID(booking.booking_id))
        assert committed is not None and committed["status"] == "committed" and committed["committed_amount"] == COST
        assert [b.booking_id for b in await listed_bookings(world)] == [booking.booking_id]
        await assert_books_straight(stack, world.client_id)


async def test_a_retry_after_a_crash_after_reserve_continues_the_same_booking_before_the_reconciler_acts(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(
        postgres_server_url, tmp_path, booking_env={"BOOKING_CRASH_POINTS": "after_reserve"}
    ) as stack:
        booking_process = stack.bookings[0]
        world = await new_world(stack)
        request = world.booking_request(future_hour(4, 10))
        error, _ = await refused(world.booking, request, CALL_TIMEOUT_S)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert await wait_exit(booking_process) == CRASH_EXIT_CODE, stack.logs()
        crashed = key_of(request)
        assert await stack.buckets(world.client_id) == (GRANTED - COST, COST, 0, GRANTED)

        # Restarted with the default (minute-long) staleness bound: the hold is still young, so
        # the retry finds it and carries the same booking through, holding nothing twice.
        await stack.start(booking_process, {"BOOKING_CRASH_POINTS": None})
        booking = await created(world.booking, request)
        assert uuid.UUID(booking.booking_id) == crashed
        assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        hold = await stack.reservation(crashed)
        assert hold is not None and (hold["status"], hold["committed_amount"]) == ("committed", COST), hold
        assert await stack.session(crashed) is not None
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        await assert_books_straight(stack, world.client_id)


# --- 4. the booking process dies after the commit point, before CommitReservation ---


@pytest.mark.parametrize(
    ("crash_point", "recovered_by"),
    [("after_booking_commit", "outbox or reconciler"), ("before_commit_reservation", "reconciler alone")],
)
async def test_a_crash_after_the_decision_is_committed_on_restart(
    postgres_server_url: str, tmp_path: Path, crash_point: str, recovered_by: str
) -> None:
    async with running_stack(postgres_server_url, tmp_path, booking_env={"BOOKING_CRASH_POINTS": crash_point}) as stack:
        booking_process = stack.bookings[0]
        world = await new_world(stack)
        request = world.booking_request(future_hour(4, 14))

        error, _ = await refused(world.booking, request, CALL_TIMEOUT_S)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert await wait_exit(booking_process) == CRASH_EXIT_CODE, stack.logs()
        booking_id = key_of(request)
        session = await stack.session(booking_id)  # the commit decision
        assert session is not None
        assert (session["status"], session["payment_status"], session["credit_cost"], session["request_id"]) == (
            "confirmed",
            "committing",
            COST,
            request.request_id,
        )
        hold = await stack.reservation(booking_id)
        assert hold is not None and hold["status"] == "pending", hold
        assert await stack.buckets(world.client_id) == (GRANTED - COST, COST, 0, GRANTED)
        if recovered_by == "reconciler alone":
            # As if the outbox had given up on the booking's event (dead-lettered), which would
            # otherwise settle the payment: the reconciler must still find the stale hold, and
            # commit it because its session exists.
            dead = await stack.booking_db.execute(
                "UPDATE booking.outbox SET status = 'dead' WHERE booking_id = $1 AND kind = 'booking_event'",
                booking_id,
            )
            assert dead == "UPDATE 1"

        await stack.start(booking_process, {"BOOKING_CRASH_POINTS": None, **FAST_RECOVERY})

        async def paid() -> bool:
            session = await stack.session(booking_id)
            return session is not None and session["payment_status"] == "paid"

        await wait_for(paid, timeout_s=RECOVERY_TIMEOUT_S, what="the session paid")
        hold = await stack.reservation(booking_id)
        assert hold is not None and hold["status"] == "committed" and hold["committed_amount"] == COST, hold
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        if recovered_by == "reconciler alone":
            committed_by = [e.get("reservation_id") for e in stack.events(booking_process, "reconciler_committed")]
            assert str(booking_id) in committed_by, stack.logs()

        booking = await created(world.booking, request)
        assert uuid.UUID(booking.booking_id) == booking_id
        assert booking.status == booking_pb2.BOOKING_STATUS_CONFIRMED
        assert booking.payment_status == booking_pb2.PAYMENT_STATUS_PAID
        assert [b.booking_id for b in await listed_bookings(world)] == [booking.booking_id]
        assert await stack.buckets(world.client_id) == (GRANTED - COST, 0, COST, GRANTED)
        await assert_books_straight(stack, world.client_id)


# --- a second process configured onto a port that a running one holds ---


async def test_a_process_whose_port_is_taken_exits_with_a_clear_message_and_the_holder_serves_on(
    postgres_server_url: str, tmp_path: Path
) -> None:
    async with running_stack(postgres_server_url, tmp_path) as stack:
        holder = stack.bookings[0]
        duplicate = ServiceProcess(BOOKING_MODULE, dict(holder.env), tmp_path / "duplicate.log", holder.port)
        try:
            duplicate.start()
            assert await wait_exit(duplicate, timeout_s=START_TIMEOUT_S) == 1, duplicate.output()
        finally:
            duplicate.kill()
        assert f"cannot start: cannot listen on {holder.address}" in duplicate.output()
        assert "Traceback" not in duplicate.output()
        # so_reuseport is off: the duplicate did not quietly share the port; the holder serves on.
        assert await health_status(holder.address, BOOKING_SERVICE_NAME) == "SERVING"


# --- a graceful stop while calls hang on the credit service ---


async def test_sigterm_while_calls_hang_on_the_credit_service_exits_within_the_grace_period(
    postgres_server_url: str, tmp_path: Path
) -> None:
    # Credit calls that outlast the shutdown grace (1 s in tests), so the stop must cut them.
    hanging = {**FAST_RECOVERY, "BOOKING_CREDIT_CALL_TIMEOUT_S": "8"}
    async with running_stack(postgres_server_url, tmp_path, booking_env=hanging) as stack:
        booking_process = stack.bookings[0]
        world = await new_world(stack)
        requests = [world.booking_request(future_hour(5, 10 + i)) for i in range(HUNG_CALLS)]
        stack.freeze(stack.credit)
        try:
            calls = [asyncio.ensure_future(refused(world.booking, r, CALL_TIMEOUT_S)) for r in requests]
            await asyncio.sleep(ABANDON_AFTER_S)  # the calls are now waiting on the frozen process
            stopping_at = time.monotonic()
            stack.terminate(booking_process)
            assert await wait_exit(booking_process) == 0, stack.logs()
            stopped_s = time.monotonic() - stopping_at
            failures = await asyncio.gather(*calls)
        finally:
            stack.thaw(stack.credit)
        grace_s = float(booking_process.env["BOOKING_SHUTDOWN_GRACE_S"])
        assert stopped_s < grace_s + DEADLINE_SLACK_S, f"the stop took {stopped_s:.2f} s"
        assert all(error.code() == grpc.StatusCode.UNAVAILABLE for error, _ in failures), failures
        finished = [e for e in stack.events(booking_process, "rpc_finished") if e.get("rpc") == "CreateBooking"]
        assert [e["grpc_code"] for e in finished] == ["CANCELLED"] * HUNG_CALLS, finished

        # Back up: whatever the cut calls left is resolved; then each retry books once.
        await stack.start(booking_process)
        await stack.wait_settled([world.client_id], timeout_s=RECOVERY_TIMEOUT_S)
        assert await stack.buckets(world.client_id) == (GRANTED, 0, 0, GRANTED)
        assert await sessions_of_client(stack, world.client_id) == 0
        for request in requests:
            assert (await created(world.booking, request)).payment_status == booking_pb2.PAYMENT_STATUS_PAID
        assert await stack.buckets(world.client_id) == (GRANTED - HUNG_CALLS * COST, 0, HUNG_CALLS * COST, GRANTED)
        await assert_books_straight(stack, world.client_id)
