"""Concurrency claims of CreateBooking, RescheduleBooking and CancelBooking, proven by firing the
calls together over the real stubs (asyncio.gather) against the real services and PostgreSQL.

A lost race must cost nothing: every loser's hold is released (maybe a moment after the answer,
hence the polling), no slot is sold twice, and the credit books stay straight.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import asyncpg
import grpc

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from service_kit.errors import ErrorDetails
from tests.support.world import (
    SETTLE_TIMEOUT_S,
    World,
    assert_books_consistent,
    eventually,
    future_hour,
    outcome,
)

T = TypeVar("T")
SESSION = timedelta(minutes=50)
# What a loser of a race for one slot may hear: refused by a check, or by a lock wait that timed out.
LOST_RACE_REASONS = {"SLOT_UNAVAILABLE", "CALENDAR_BUSY"}
RACE_TRIES = 8


def split(
    results: list[booking_pb2.CreateBookingResponse | ErrorDetails],
) -> tuple[list[booking_pb2.Booking], list[ErrorDetails]]:
    won = [r.booking for r in results if isinstance(r, booking_pb2.CreateBookingResponse)]
    lost = [r for r in results if isinstance(r, ErrorDetails)]
    return won, lost


async def confirmed_sessions_at(booking_db: asyncpg.Pool, therapist_id: str) -> list[asyncpg.Record]:
    async with booking_db.acquire() as connection:
        return list(
            await connection.fetch(
                "SELECT booking_id, client_id FROM booking.sessions WHERE therapist_id = $1 AND status = 'confirmed'",
                uuid.UUID(therapist_id),
            )
        )


async def holds_of(credit_db: asyncpg.Pool, owner_id: str) -> list[asyncpg.Record]:
    """The client's reservations, found from outside: a loser's booking id is never returned to it."""
    async with credit_db.acquire() as connection:
        return list(
            await connection.fetch(
                "SELECT reservation_id, status, release_reason FROM credit.reservations WHERE owner_id = $1",
                uuid.UUID(owner_id),
            )
        )


async def settled(world: World, owner_id: str) -> credit_pb2.Balance:
    """The client's balance once nothing is held any more (or the last one seen after the timeout):
    a loser's hold may be cancelled a moment after its refusal (or by the reconciler later)."""
    return await eventually(lambda: world.balance(owner_id), lambda b: b.held == 0, timeout_s=SETTLE_TIMEOUT_S)


async def test_twenty_clients_racing_for_one_slot_one_wins_and_pays_once(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    clients = [await world.new_client() for _ in range(20)]
    start = future_hour(6, 10)

    results = await asyncio.gather(
        *(outcome(world.booking.CreateBooking(world.booking_request(start, client_id=c))) for c in clients)
    )

    won, lost = split(results)
    assert len(won) == 1, [(e.code, e.reason) for e in lost]
    assert won[0].status == booking_pb2.BOOKING_STATUS_CONFIRMED
    assert won[0].payment_status == booking_pb2.PAYMENT_STATUS_PAID
    winner = won[0].client_id
    reasons = Counter(e.reason for e in lost)
    assert set(reasons) <= LOST_RACE_REASONS, reasons
    assert reasons["SLOT_UNAVAILABLE"] >= len(lost) // 2, reasons
    assert all(
        e.code == (grpc.StatusCode.FAILED_PRECONDITION if e.reason == "SLOT_UNAVAILABLE" else grpc.StatusCode.ABORTED)
        for e in lost
    )

    balances = {c: await settled(world, c) for c in clients}
    assert sum(b.spent for b in balances.values()) == world.credit_cost
    assert balances[winner].spent == world.credit_cost
    for client, balance in balances.items():
        if client != winner:
            assert (balance.available, balance.held, balance.spent) == (100, 0, 0), client
            assert all(h["status"] == "released" for h in await holds_of(credit_db, client)), client

    sessions = await confirmed_sessions_at(booking_db, world.therapist_id)
    assert [(str(s["booking_id"]), str(s["client_id"])) for s in sessions] == [(won[0].booking_id, winner)]
    # assert_books_consistent also proves no two confirmed sessions of the therapist overlap.
    await assert_books_consistent(booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=clients)


async def test_a_booking_refused_after_its_reserve_releases_the_hold(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    """Two clients race for a slot: both may pass the pre-check and reserve; the loser's locked
    check refuses it, and its hold must then be cancelled. When the pre-check already refused the
    loser there is no hold at all, which is correct too; across the tries a hold must have been
    made and released at least once, or the test proved nothing."""
    released_holds = 0
    for attempt in range(RACE_TRIES):
        first, second = await world.new_client(), await world.new_client()
        start = future_hour(7, 0) + attempt * timedelta(hours=2)
        results = await asyncio.gather(
            *(outcome(world.booking.CreateBooking(world.booking_request(start, client_id=c))) for c in (first, second))
        )
        won, lost = split(results)
        assert len(won) == len(lost) == 1, results
        assert lost[0].reason in LOST_RACE_REASONS, lost[0]
        loser = second if won[0].client_id == first else first

        balance = await settled(world, loser)
        assert (balance.available, balance.held, balance.spent) == (100, 0, 0)
        holds = await holds_of(credit_db, loser)
        assert len(holds) <= 1, holds
        for hold in holds:  # reached the reserve, lost in the locked transaction
            reservation_id = str(hold["reservation_id"])
            reservation = await eventually(
                functools.partial(world.reservation, reservation_id),
                lambda r: r.status != credit_pb2.RESERVATION_STATUS_PENDING,
                timeout_s=SETTLE_TIMEOUT_S,
            )
            assert reservation.status == credit_pb2.RESERVATION_STATUS_RELEASED
            assert reservation.release_reason == credit_pb2.RELEASE_REASON_CANCELLED
            assert (reservation.owner_id, reservation.amount, reservation.committed_amount) == (loser, 10, 0)
            async with booking_db.acquire() as connection:
                # The refusal is the request's answer, recorded under the lock with no session.
                answer = await connection.fetchval(
                    "SELECT refusal_reason FROM booking.request_answers WHERE request_key = $1", hold["reservation_id"]
                )
                session = await connection.fetchval(
                    "SELECT count(*) FROM booking.sessions WHERE booking_id = $1", hold["reservation_id"]
                )
            assert (answer, session) == ("SLOT_UNAVAILABLE", 0)
            released_holds += 1
        await assert_books_consistent(
            booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[first, second]
        )
        if released_holds >= 2 and attempt >= 2:
            break
    assert released_holds >= 1, f"no loser reached the reserve in {RACE_TRIES} races"


async def after(delay_s: float, call: Callable[[], Awaitable[T]]) -> T | ErrorDetails:
    await asyncio.sleep(delay_s)
    return await outcome(call())


async def test_ten_concurrent_repeats_of_one_request_make_one_booking(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    """In rounds, fired all at once and then staggered by a few milliseconds: staggered, some
    repeats are still in the pre-check when another one has already inserted the session (which
    once refused them with SLOT_UNAVAILABLE, and forgot the request, breaking every later repeat)."""
    client = await world.new_client(credits=1000)
    rounds = [0.0] * 3 + [0.004] * 12
    for number, stagger_s in enumerate(rounds):
        request = world.booking_request(future_hour(8, 0) + number * timedelta(hours=1), client_id=client)

        create = functools.partial(world.booking.CreateBooking, request)
        results = await asyncio.gather(*(after(i * stagger_s, create) for i in range(10)))

        won, lost = split(results)
        assert lost == [], (number, [(e.code, e.reason, e.message) for e in lost])
        assert {b.booking_id for b in won} == {won[0].booking_id}
        assert all(b.status == booking_pb2.BOOKING_STATUS_CONFIRMED for b in won)
        async with booking_db.acquire() as connection:
            sessions = await connection.fetchval(
                "SELECT count(*) FROM booking.sessions WHERE request_id = $1", request.request_id
            )
        assert sessions == 1
        assert (await world.get(won[0].booking_id)).payment_status == booking_pb2.PAYMENT_STATUS_PAID
        # And a later repeat still returns it.
        assert (await world.booking.CreateBooking(request)).booking.booking_id == won[0].booking_id

    balance = await world.balance(client)
    spent = len(rounds) * world.credit_cost
    assert (balance.available, balance.held, balance.spent) == (1000 - spent, 0, spent)
    reserves = [e for e in await world.ledger(client) if e.kind == credit_pb2.LEDGER_ENTRY_KIND_RESERVE]
    assert len(reserves) == len(rounds)
    await assert_books_consistent(booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[client])


async def test_two_bookings_rescheduled_onto_one_free_slot_only_one_moves(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    other = await world.new_client()
    first = await world.book(future_hour(9, 9))
    second = await world.book(future_hour(9, 15), client_id=other)
    target = future_hour(9, 12)

    results = await asyncio.gather(
        outcome(world.reschedule(first.booking_id, target)), outcome(world.reschedule(second.booking_id, target))
    )

    moved = [r for r in results if isinstance(r, booking_pb2.Booking)]
    refused = [r for r in results if isinstance(r, ErrorDetails)]
    assert len(moved) == len(refused) == 1, results
    assert refused[0].reason in LOST_RACE_REASONS
    assert moved[0].start_time.ToDatetime() == target.replace(tzinfo=None)
    assert moved[0].reschedule_count == 1
    stayed = second if moved[0].booking_id == first.booking_id else first
    assert await world.get(stayed.booking_id) == stayed  # untouched: same time, count 0, same update_time
    for client in (world.client_id, other):
        balance = await world.balance(client)
        assert (balance.available, balance.held, balance.spent) == (90, 0, 10)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )


async def test_concurrent_cancellations_refund_once(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(10, 10))

    results = await asyncio.gather(*(world.cancel(booking.booking_id) for _ in range(5)))

    cancellations = {
        (c.cancellation.actor, c.cancellation.refunded_credits, c.cancellation.cancel_time.ToNanoseconds())
        for c in results
    }
    assert len(cancellations) == 1, cancellations
    assert all(c.status == booking_pb2.BOOKING_STATUS_CANCELLED for c in results)
    final = await eventually(
        lambda: world.get(booking.booking_id), lambda b: b.payment_status == booking_pb2.PAYMENT_STATUS_REFUNDED
    )
    assert final.payment_status == booking_pb2.PAYMENT_STATUS_REFUNDED
    assert final.cancellation.refunded_credits == 10
    refunds = [e for e in await world.ledger() if e.kind == credit_pb2.LEDGER_ENTRY_KIND_REFUND]
    assert [(e.reservation_id, e.available_delta, e.spent_delta) for e in refunds] == [(booking.booking_id, 10, -10)]
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (100, 0, 0)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_client_racing_for_two_slots_with_credits_for_one_gets_one(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    """The credit check and the deduction are one atomic step: no pre-check of the balance can let
    two bookings through on credits for one."""
    client = await world.new_client(credits=world.credit_cost)
    starts = [future_hour(11, hour) for hour in (8, 10, 12, 14, 16)]

    results = await asyncio.gather(
        *(outcome(world.booking.CreateBooking(world.booking_request(s, client_id=client))) for s in starts)
    )

    won, lost = split(results)
    assert len(won) == 1, results
    assert {(e.code, e.reason) for e in lost} == {(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS")}
    balance = await settled(world, client)
    assert (balance.available, balance.held, balance.spent) == (0, 0, world.credit_cost)
    await assert_books_consistent(booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[client])


async def test_concurrent_repeats_of_one_move_move_once(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    booking = await world.book(future_hour(12, 9))
    request_id = str(uuid.uuid4())
    target = future_hour(12, 15)

    results = await asyncio.gather(
        *(outcome(world.reschedule(booking.booking_id, target, request_id=request_id)) for _ in range(5))
    )

    assert all(isinstance(r, booking_pb2.Booking) for r in results), results
    assert {r.SerializeToString(deterministic=True) for r in results if isinstance(r, booking_pb2.Booking)} == {
        (await world.get(booking.booking_id)).SerializeToString(deterministic=True)
    }
    final = await world.get(booking.booking_id)
    assert (final.start_time.ToDatetime(), final.reschedule_count) == (target.replace(tzinfo=None), 1)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id]
    )


async def test_a_cancellation_racing_a_move_leaves_one_consistent_outcome(
    world: World, booking_db: asyncpg.Pool, credit_db: asyncpg.Pool
) -> None:
    old_start, new_start = future_hour(13, 9), future_hour(13, 15)
    booking = await world.book(old_start)

    cancel, move = await asyncio.gather(
        outcome(world.cancel(booking.booking_id)), outcome(world.reschedule(booking.booking_id, new_start))
    )

    assert isinstance(cancel, booking_pb2.Booking), cancel
    if isinstance(move, ErrorDetails):  # the cancellation came first
        assert (move.code, move.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BOOKING_CANCELLED")
    final = await eventually(
        lambda: world.get(booking.booking_id), lambda b: b.payment_status == booking_pb2.PAYMENT_STATUS_REFUNDED
    )
    assert final.status == booking_pb2.BOOKING_STATUS_CANCELLED
    assert final.cancellation.refunded_credits == world.credit_cost
    # Neither the old nor the new time stays blocked by a cancelled booking.
    other = await world.new_client()
    for start in (old_start, new_start):
        assert (await world.book(start, client_id=other)).status == booking_pb2.BOOKING_STATUS_CONFIRMED
    balance = await world.balance()
    assert (balance.available, balance.held, balance.spent) == (100, 0, 0)
    await assert_books_consistent(
        booking_db, credit_db, therapist_ids=[world.therapist_id], client_ids=[world.client_id, other]
    )
