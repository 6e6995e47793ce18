"""Concurrency on the real database: many real gRPC calls at once against one account or one
reservation, and the books must come out exactly right (DESIGN.md failure classes 1 and 7).

The calls go through the real in-process server and its connection pool, so they truly overlap
in PostgreSQL; nothing here serializes them on the client side.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest

from credit.v1 import credit_pb2
from service_kit.errors import error_details
from tests.support.invariants import credit_invariant_violations

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub


def new_id() -> str:
    return str(uuid.uuid4())


async def funded_owner(stub: CreditServiceAsyncStub, amount: int) -> str:
    owner = new_id()
    await stub.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            request_id=new_id(), owner_id=owner, amount=amount, kind=credit_pb2.GRANT_KIND_PURCHASE
        )
    )
    return owner


def reserve_request(owner: str, amount: int, reservation_id: str | None = None) -> credit_pb2.ReserveCreditsRequest:
    return credit_pb2.ReserveCreditsRequest(reservation_id=reservation_id or new_id(), owner_id=owner, amount=amount)


async def buckets(stub: CreditServiceAsyncStub, owner: str) -> tuple[int, int, int, int]:
    balance = (await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner))).balance
    return balance.available, balance.held, balance.spent, balance.granted


async def assert_books_straight(pool: asyncpg.Pool, *owners: str) -> None:
    async with pool.acquire() as connection:
        violations = await credit_invariant_violations(connection, [uuid.UUID(owner) for owner in owners])
    assert violations == []


async def entry_kinds_by_reservation(pool: asyncpg.Pool, owner: str) -> dict[str, list[tuple[str, int]]]:
    """Each reservation's ledger entries as (kind, held_delta), in the order they were written."""
    rows = await pool.fetch(
        """SELECT reservation_id, kind, held_delta FROM credit.ledger_entries
            WHERE owner_id = $1 AND reservation_id IS NOT NULL ORDER BY entry_id""",
        uuid.UUID(owner),
    )
    found: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        found.setdefault(str(row["reservation_id"]), []).append((row["kind"], row["held_delta"]))
    return found


async def test_fifty_concurrent_reserves_against_seven_credits_succeed_exactly_seven_times(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 7)
    requests = [reserve_request(owner, 1) for _ in range(50)]
    results = await asyncio.gather(
        *(credit_stub.ReserveCredits(request) for request in requests), return_exceptions=True
    )

    succeeded = [r for r in results if isinstance(r, credit_pb2.ReserveCreditsResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(succeeded) == 7
    assert len(refused) == 43
    for error in refused:
        details = error_details(error)
        assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS")
        assert details.metadata["requested"] == "1"
        assert details.metadata["available"] == "0"

    assert await buckets(credit_stub, owner) == (0, 7, 0, 7)
    rows = await credit_db.fetch("SELECT reservation_id FROM credit.reservations WHERE owner_id = $1", uuid.UUID(owner))
    assert {str(row["reservation_id"]) for row in rows} == {r.reservation.reservation_id for r in succeeded}
    await assert_books_straight(credit_db, owner)


async def test_concurrent_commit_and_cancel_of_one_reservation_make_exactly_one_transition(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 100)
    held = [(await credit_stub.ReserveCredits(reserve_request(owner, 5))).reservation for _ in range(20)]

    async def race(reservation_id: str) -> tuple[object, object]:
        # A partial commit writes commit + release entries, a cancel one release entry of all
        # five: the ledger then shows which transition happened, and whether both did.
        commit = credit_stub.CommitReservation(
            credit_pb2.CommitReservationRequest(reservation_id=reservation_id, amount=3)
        )
        cancel = credit_stub.CancelReservation(credit_pb2.CancelReservationRequest(reservation_id=reservation_id))
        calls: list[Awaitable[object]] = [commit, cancel]
        random.shuffle(calls)  # which one starts first varies; the outcome must not
        done = await asyncio.gather(*calls, return_exceptions=True)
        return (done[0], done[1]) if calls[0] is commit else (done[1], done[0])

    outcomes = await asyncio.gather(*(race(r.reservation_id) for r in held))
    ledger = await entry_kinds_by_reservation(credit_db, owner)

    final_states: Counter[str] = Counter()
    for reservation, (commit_result, cancel_result) in zip(held, outcomes, strict=True):
        current = (
            await credit_stub.GetReservation(
                credit_pb2.GetReservationRequest(reservation_id=reservation.reservation_id)
            )
        ).reservation
        entries = ledger[reservation.reservation_id]
        if isinstance(commit_result, credit_pb2.CommitReservationResponse):
            assert isinstance(cancel_result, grpc.aio.AioRpcError), "both transitions succeeded"
            assert error_details(cancel_result).reason == "RESERVATION_ALREADY_COMMITTED"
            assert current.status == credit_pb2.RESERVATION_STATUS_COMMITTED
            assert current.committed_amount == 3
            assert entries == [("reserve", 5), ("commit", -3), ("release", -2)]
            final_states["committed"] += 1
        else:
            assert isinstance(commit_result, grpc.aio.AioRpcError)
            assert error_details(commit_result).reason == "RESERVATION_NOT_PENDING"
            assert isinstance(cancel_result, credit_pb2.CancelReservationResponse)
            assert current.status == credit_pb2.RESERVATION_STATUS_RELEASED
            assert current.release_reason == credit_pb2.RELEASE_REASON_CANCELLED
            assert entries == [("reserve", 5), ("release", -5)]
            final_states["released"] += 1

    assert sum(final_states.values()) == 20
    committed = final_states["committed"]
    assert await buckets(credit_stub, owner) == (100 - 3 * committed, 0, 3 * committed, 100)
    await assert_books_straight(credit_db, owner)


async def test_concurrent_duplicate_grants_write_one_entry(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner, request_id = new_id(), new_id()  # a new account too: ten callers race to open it
    request = credit_pb2.GrantCreditsRequest(
        request_id=request_id, owner_id=owner, amount=9, kind=credit_pb2.GRANT_KIND_PURCHASE
    )
    responses = await asyncio.gather(*(credit_stub.GrantCredits(request) for _ in range(10)))

    assert len({response.entry.entry_id for response in responses}) == 1
    assert all(response.entry.request_id == request_id for response in responses)
    assert await buckets(credit_stub, owner) == (9, 0, 0, 9)
    count = await credit_db.fetchval("SELECT count(*) FROM credit.ledger_entries WHERE request_id = $1", request_id)
    assert count == 1
    await assert_books_straight(credit_db, owner)


async def test_concurrent_duplicate_reserves_make_one_hold(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    request = reserve_request(owner, 4)
    responses = await asyncio.gather(*(credit_stub.ReserveCredits(request) for _ in range(10)))

    assert len({response.reservation.SerializeToString() for response in responses}) == 1
    assert await buckets(credit_stub, owner) == (6, 4, 0, 10)
    ledger = await entry_kinds_by_reservation(credit_db, owner)
    assert ledger == {request.reservation_id: [("reserve", 4)]}
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize("amount", [None, 2], ids=["whole", "part"])
async def test_concurrent_refunds_of_one_reservation_refund_once(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, amount: int | None
) -> None:
    owner = await funded_owner(credit_stub, 10)
    reservation = (await credit_stub.ReserveCredits(reserve_request(owner, 6))).reservation
    await credit_stub.CommitReservation(credit_pb2.CommitReservationRequest(reservation_id=reservation.reservation_id))
    request = credit_pb2.RefundReservationRequest(reservation_id=reservation.reservation_id, amount=amount)
    responses = await asyncio.gather(*(credit_stub.RefundReservation(request) for _ in range(10)))

    assert len({response.reservation.SerializeToString() for response in responses}) == 1
    given_back = 6 if amount is None else amount
    assert responses[0].reservation.refunded_amount == given_back
    assert await buckets(credit_stub, owner) == (4 + given_back, 0, 6 - given_back, 10)
    kinds = [kind for kind, _ in (await entry_kinds_by_reservation(credit_db, owner))[reservation.reservation_id]]
    assert kinds == ["reserve", "commit", "refund"]
    await assert_books_straight(credit_db, owner)


async def test_a_mixed_concurrent_workload_keeps_every_account_balanced(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    """Reserves, commits, cancels, refunds and grants on five accounts, all at once."""
    owners = [await funded_owner(credit_stub, 20) for _ in range(5)]
    rng = random.Random(20260329)  # the same mix of operations on every run
    refusals: list[str | None] = []

    async def life_of_a_booking(owner: str) -> None:
        try:
            reservation = (await credit_stub.ReserveCredits(reserve_request(owner, rng.randint(1, 6)))).reservation
        except grpc.aio.AioRpcError as error:
            refusals.append(error_details(error).reason)
            return
        rid = reservation.reservation_id
        if rng.random() < 0.3:
            await credit_stub.CancelReservation(credit_pb2.CancelReservationRequest(reservation_id=rid))
            return
        spend = rng.randint(1, reservation.amount)
        await credit_stub.CommitReservation(credit_pb2.CommitReservationRequest(reservation_id=rid, amount=spend))
        if rng.random() < 0.4:
            await credit_stub.RefundReservation(
                credit_pb2.RefundReservationRequest(reservation_id=rid, amount=rng.randint(1, spend))
            )

    async def top_up(owner: str) -> None:
        await credit_stub.GrantCredits(
            credit_pb2.GrantCreditsRequest(
                request_id=new_id(), owner_id=owner, amount=3, kind=credit_pb2.GRANT_KIND_PROMOTION
            )
        )

    work = [life_of_a_booking(rng.choice(owners)) for _ in range(60)]
    work += [top_up(owner) for owner in owners]
    await asyncio.gather(*work)
    assert set(refusals) <= {"INSUFFICIENT_CREDITS"}

    for owner in owners:
        available, held, spent, granted = await buckets(credit_stub, owner)
        assert (held, granted) == (0, 23)  # every hold was resolved; every top-up landed once
        assert available + spent == granted
    await assert_books_straight(credit_db, *owners)
