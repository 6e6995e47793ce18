"""BatchReserveCredits and BatchCommitReservations over real gRPC against a real PostgreSQL.

A batch is many independent calls in one: each item must end exactly as the single RPC would
have ended it (same code, same reason), one item's refusal must leave the others alone, an
invalid batch must change nothing, and concurrent batches over the same accounts must neither
deadlock nor lose a credit.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc

from booking_service.credits import CreditClient
from credit.v1 import credit_pb2
from service_kit.auth import ServiceToken
from service_kit.errors import ErrorDetails, status_message_details
from tests.integration.test_credit_service import (
    buckets,
    funded_owner,
    get_reservation,
    new_id,
    refusal,
    reserve,
)
from tests.support.auth import token
from tests.support.invariants import credit_invariant_violations

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

PENDING = credit_pb2.RESERVATION_STATUS_PENDING
COMMITTED = credit_pb2.RESERVATION_STATUS_COMMITTED
RELEASED = credit_pb2.RESERVATION_STATUS_RELEASED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def reserve_item(owner: str, amount: int, *, reservation_id: str | None = None) -> credit_pb2.ReserveCreditsRequest:
    return credit_pb2.ReserveCreditsRequest(
        reservation_id=reservation_id or new_id(), owner_id=owner, amount=amount, reference="batch"
    )


def item_error(result: credit_pb2.ReserveCreditsResult | credit_pb2.CommitReservationResult) -> ErrorDetails | None:
    return status_message_details(result.error) if result.WhichOneof("result") == "error" else None


async def books_straight(credit_db: asyncpg.Pool, *owners: str) -> None:
    async with credit_db.acquire() as connection:
        assert await credit_invariant_violations(connection, [uuid.UUID(o) for o in owners]) == []


async def test_each_reserve_item_ends_as_reserve_credits_alone_would(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    rich, poor, nobody = await funded_owner(credit_stub, 50), await funded_owner(credit_stub, 2), new_id()
    earlier = await reserve(credit_stub, rich, 5, reference="batch")
    other = await reserve(credit_stub, rich, 1, reference="batch")
    items = [
        reserve_item(rich, 10),
        reserve_item(poor, 3),  # only 2 available
        reserve_item(nobody, 1),  # no account
        reserve_item(rich, 5, reservation_id=earlier.reservation_id),  # a repeat: the same hold
        reserve_item(rich, 6),
        # An id reused with other values (another owner).
        credit_pb2.ReserveCreditsRequest(
            reservation_id=other.reservation_id, owner_id=poor, amount=1, reference="batch"
        ),
    ]
    response = await credit_stub.BatchReserveCredits(credit_pb2.BatchReserveCreditsRequest(requests=items))

    assert len(response.results) == len(items)
    created, short, missing, repeat, second, reused = response.results
    assert item_error(created) is None and created.response.reservation.status == PENDING
    assert created.response.reservation.amount == 10 and created.response.balance.owner_id == rich
    assert (details := item_error(short)) is not None
    assert (details.code, details.reason, details.metadata["available"]) == (PRECONDITION, "INSUFFICIENT_CREDITS", "2")
    assert (details := item_error(missing)) is not None
    assert (details.code, details.reason) == (PRECONDITION, "ACCOUNT_NOT_FOUND")
    assert item_error(repeat) is None and repeat.response.reservation.reservation_id == earlier.reservation_id
    assert item_error(second) is None and second.response.reservation.amount == 6
    assert (details := item_error(reused)) is not None
    assert (details.code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESERVATION_ID_REUSED")
    assert details.domain == "credit.v1.CreditService"

    # Exactly the holds that were answered as made: 5 + 1 before, 10 + 6 now; nothing for the refused.
    assert await buckets(credit_stub, rich) == (50 - 22, 22, 0, 50)
    assert await buckets(credit_stub, poor) == (2, 0, 0, 2)
    assert (await get_reservation(credit_stub, other.reservation_id)).owner_id == rich
    await books_straight(credit_db, rich, poor)


async def test_each_commit_item_ends_as_commit_reservation_alone_would(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 30)
    pending = [(await reserve(credit_stub, owner, 5)).reservation_id for _ in range(3)]
    await credit_stub.CommitReservation(credit_pb2.CommitReservationRequest(reservation_id=pending[1]))
    await credit_stub.CancelReservation(credit_pb2.CancelReservationRequest(reservation_id=pending[2]))
    fresh = (await reserve(credit_stub, owner, 5)).reservation_id
    items = [
        credit_pb2.CommitReservationRequest(reservation_id=pending[0]),
        credit_pb2.CommitReservationRequest(reservation_id=pending[1]),  # committed before: the same answer
        credit_pb2.CommitReservationRequest(reservation_id=pending[2]),  # cancelled
        credit_pb2.CommitReservationRequest(reservation_id=new_id()),  # unknown
        credit_pb2.CommitReservationRequest(reservation_id=fresh, amount=2),  # part of it
    ]
    response = await credit_stub.BatchCommitReservations(credit_pb2.BatchCommitReservationsRequest(requests=items))

    first, again, cancelled, unknown, partial = response.results
    assert item_error(first) is None and first.response.reservation.status == COMMITTED
    assert item_error(again) is None and again.response.reservation.committed_amount == 5
    assert (details := item_error(cancelled)) is not None
    assert (details.code, details.reason) == (PRECONDITION, "RESERVATION_NOT_PENDING")
    assert (details := item_error(unknown)) is not None
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    assert item_error(partial) is None and partial.response.reservation.committed_amount == 2
    # 5 + 5 + 2 spent, 5 released by the cancel and 3 by the partial commit.
    assert await buckets(credit_stub, owner) == (30 - 12, 0, 12, 30)
    await books_straight(credit_db, owner)


async def test_an_invalid_batch_is_refused_whole_naming_the_item_and_changes_nothing(
    credit_stub: CreditServiceAsyncStub,
) -> None:
    owner = await funded_owner(credit_stub, 10)
    twice = new_id()
    cases = {
        "requests": [],
        "requests[1].amount": [reserve_item(owner, 1), reserve_item(owner, 0)],
        "requests[2].reservation_id": [
            reserve_item(owner, 1, reservation_id=twice),
            reserve_item(owner, 1),
            reserve_item(owner, 1, reservation_id=twice),
        ],
    }
    for field, items in cases.items():
        details = await refusal(credit_stub.BatchReserveCredits(credit_pb2.BatchReserveCreditsRequest(requests=items)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in details.field_violations, (field, details.field_violations)
    too_many = [reserve_item(owner, 1) for _ in range(101)]
    details = await refusal(credit_stub.BatchReserveCredits(credit_pb2.BatchReserveCreditsRequest(requests=too_many)))
    assert "requests" in details.field_violations
    details = await refusal(
        credit_stub.BatchCommitReservations(
            credit_pb2.BatchCommitReservationsRequest(
                requests=[credit_pb2.CommitReservationRequest(reservation_id="not-a-uuid")]
            )
        )
    )
    assert "requests[0].reservation_id" in details.field_violations
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)


async def test_concurrent_batches_over_the_same_accounts_neither_deadlock_nor_lose_credits(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    """Batches that name the same owners in opposite orders, many at once: each takes the
    accounts in one order, so none waits for another in a cycle; and the holds add up exactly."""
    owners = [await funded_owner(credit_stub, 100) for _ in range(6)]
    batches = [[reserve_item(owner, 1) for owner in (owners if n % 2 else list(reversed(owners)))] for n in range(16)]
    responses = await asyncio.gather(
        *(credit_stub.BatchReserveCredits(credit_pb2.BatchReserveCreditsRequest(requests=b)) for b in batches)
    )
    assert all(item_error(result) is None for response in responses for result in response.results)
    commits = [
        [credit_pb2.CommitReservationRequest(reservation_id=item.reservation_id) for item in batch] for batch in batches
    ]
    committed = await asyncio.gather(
        *(credit_stub.BatchCommitReservations(credit_pb2.BatchCommitReservationsRequest(requests=c)) for c in commits)
    )
    assert all(item_error(result) is None for response in committed for result in response.results)
    for owner in owners:
        assert await buckets(credit_stub, owner) == (100 - 16, 0, 16, 100)
    await books_straight(credit_db, *owners)


async def test_more_than_available_in_one_batch_holds_exactly_what_there_is(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 7)
    response = await credit_stub.BatchReserveCredits(
        credit_pb2.BatchReserveCreditsRequest(requests=[reserve_item(owner, 1) for _ in range(10)])
    )
    outcomes = [item_error(result) for result in response.results]
    assert sum(outcome is None for outcome in outcomes) == 7
    assert {outcome.reason for outcome in outcomes if outcome is not None} == {"INSUFFICIENT_CREDITS"}
    assert await buckets(credit_stub, owner) == (0, 7, 0, 7)
    await books_straight(credit_db, owner)


async def test_the_booking_services_client_sends_one_item_per_reservation_in_a_batch(
    credit_address: str, credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    """Callers asking the very same thing at once share one item of the batch (the credit service
    refuses an id twice in one batch as a whole), and each still gets its answer."""
    owner = await funded_owner(credit_stub, 50)
    client = CreditClient(
        credit_address,
        call_timeout_s=5,
        token=ServiceToken(fixed_token=token(), subject="t", issuer="", audience="", ttl_s=60),
    )
    try:
        holds = [uuid.uuid4() for _ in range(4)]
        # Each hold asked for three times at once, among others: every call succeeds.
        await asyncio.gather(
            *(client.reserve(hold, uuid.UUID(owner), 5, f"booking:{hold}") for hold in holds for _ in range(3))
        )
        await asyncio.gather(*(client.commit(hold) for hold in holds for _ in range(3)))
    finally:
        await client.close()
    assert await buckets(credit_stub, owner) == (30, 0, 20, 50)
    for hold in holds:
        assert (await get_reservation(credit_stub, str(hold))).status == COMMITTED
    await books_straight(credit_db, owner)
