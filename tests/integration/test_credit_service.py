"""credit.v1.CreditService over real gRPC against a real PostgreSQL.

Every test makes its own owners and reservations with random UUIDs and never truncates a table.
Refusals are read the way a client reads them: status code, ErrorInfo reason and metadata,
BadRequest field violations. Balances are cross-checked from outside with the invariant checker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from credit.v1 import credit_pb2, credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME
from service_kit.connection import Connection
from service_kit.errors import ErrorDetails, error_details
from tests.support.auth import authorized_channel
from tests.support.invariants import credit_invariant_violations
from tests.support.stack import fresh_database, server_environment, wait_serving

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

PURCHASE = credit_pb2.GRANT_KIND_PURCHASE
PENDING = credit_pb2.RESERVATION_STATUS_PENDING
COMMITTED = credit_pb2.RESERVATION_STATUS_COMMITTED
RELEASED = credit_pb2.RESERVATION_STATUS_RELEASED
REFUNDED = credit_pb2.RESERVATION_STATUS_REFUNDED
NIL_UUID = "00000000-0000-0000-0000-000000000000"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


# --- Helpers: the calls a client makes, and how it reads a refusal ---


def new_id() -> str:
    return str(uuid.uuid4())


async def refusal(call: Awaitable[object]) -> ErrorDetails:
    """The error a call fails with; fails the test when the call succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return error_details(raised.value)


async def grant(
    stub: CreditServiceAsyncStub,
    owner: str,
    amount: int,
    *,
    request_id: str | None = None,
    kind: credit_pb2.GrantKind.ValueType = PURCHASE,
    note: str = "",
) -> credit_pb2.GrantCreditsResponse:
    request = credit_pb2.GrantCreditsRequest(
        request_id=request_id or new_id(), owner_id=owner, amount=amount, kind=kind, note=note
    )
    return await stub.GrantCredits(request)


async def funded_owner(stub: CreditServiceAsyncStub, amount: int) -> str:
    owner = new_id()
    await grant(stub, owner, amount)
    return owner


async def reserve(
    stub: CreditServiceAsyncStub,
    owner: str,
    amount: int,
    *,
    reservation_id: str | None = None,
    reference: str = "",
) -> credit_pb2.Reservation:
    request = credit_pb2.ReserveCreditsRequest(
        reservation_id=reservation_id or new_id(), owner_id=owner, amount=amount, reference=reference
    )
    return (await stub.ReserveCredits(request)).reservation


async def commit(
    stub: CreditServiceAsyncStub, reservation_id: str, amount: int | None = None
) -> credit_pb2.Reservation:
    request = credit_pb2.CommitReservationRequest(reservation_id=reservation_id, amount=amount)
    return (await stub.CommitReservation(request)).reservation


async def cancel(stub: CreditServiceAsyncStub, reservation_id: str) -> credit_pb2.Reservation:
    request = credit_pb2.CancelReservationRequest(reservation_id=reservation_id)
    return (await stub.CancelReservation(request)).reservation


async def refund(
    stub: CreditServiceAsyncStub, reservation_id: str, amount: int | None = None
) -> credit_pb2.Reservation:
    request = credit_pb2.RefundReservationRequest(reservation_id=reservation_id, amount=amount)
    return (await stub.RefundReservation(request)).reservation


async def get_reservation(stub: CreditServiceAsyncStub, reservation_id: str) -> credit_pb2.Reservation:
    request = credit_pb2.GetReservationRequest(reservation_id=reservation_id)
    return (await stub.GetReservation(request)).reservation


async def buckets(stub: CreditServiceAsyncStub, owner: str) -> tuple[int, int, int, int]:
    """(available, held, spent, granted) as GetBalance reports them."""
    balance = (await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner))).balance
    return balance.available, balance.held, balance.spent, balance.granted


async def ledger(stub: CreditServiceAsyncStub, owner: str) -> list[credit_pb2.LedgerEntry]:
    """The account's entries, newest first (tests keep them under one page)."""
    response = await stub.ListLedgerEntries(credit_pb2.ListLedgerEntriesRequest(owner_id=owner, page_size=500))
    assert not response.next_page_token
    return list(response.entries)


def movement(entry: credit_pb2.LedgerEntry) -> tuple[str, int, int, int, int]:
    kind = credit_pb2.LedgerEntryKind.Name(entry.kind).removeprefix("LEDGER_ENTRY_KIND_")
    return kind, entry.available_delta, entry.held_delta, entry.spent_delta, entry.granted_delta


async def assert_books_straight(pool: asyncpg.Pool, *owners: str) -> None:
    async with pool.acquire() as connection:
        violations = await credit_invariant_violations(connection, [uuid.UUID(owner) for owner in owners])
    assert violations == []


async def reservation_rows(pool: asyncpg.Pool, reservation_id: str) -> int:
    count = await pool.fetchval(
        "SELECT count(*) FROM credit.reservations WHERE reservation_id = $1", uuid.UUID(reservation_id)
    )
    assert isinstance(count, int)
    return count


# --- Grants ---


async def test_first_grant_opens_the_account_and_returns_the_balance_after(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = new_id()
    before = await refusal(credit_stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner)))
    assert before.reason == "ACCOUNT_NOT_FOUND"

    first = await grant(credit_stub, owner, 30, note="welcome pack")
    assert first.balance.owner_id == owner
    assert (first.balance.available, first.balance.held, first.balance.spent, first.balance.granted) == (
        30,
        0,
        0,
        30,
    )
    assert movement(first.entry) == ("GRANT", 30, 0, 0, 30)
    assert first.entry.owner_id == owner
    assert first.entry.reservation_id == ""

    second = await grant(credit_stub, owner, 12, kind=credit_pb2.GRANT_KIND_PROMOTION)
    assert second.balance.available == 42
    assert second.balance.granted == 42
    assert second.entry.entry_id > first.entry.entry_id
    assert await buckets(credit_stub, owner) == (42, 0, 0, 42)
    assert [entry.entry_id for entry in await ledger(credit_stub, owner)] == [
        second.entry.entry_id,
        first.entry.entry_id,
    ]
    await assert_books_straight(credit_db, owner)


async def test_repeated_grant_returns_the_first_entry_and_grants_once(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner, request_id = new_id(), f"purchase-{uuid.uuid4()}"
    first = await grant(credit_stub, owner, 25, request_id=request_id, note="card ending 4242")
    repeat = await grant(credit_stub, owner, 25, request_id=request_id, note="card ending 4242")
    assert repeat.entry == first.entry
    assert repeat.entry.request_id == request_id
    assert repeat.balance.granted == 25
    assert await buckets(credit_stub, owner) == (25, 0, 0, 25)
    assert len(await ledger(credit_stub, owner)) == 1
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"amount": 26}, id="other-amount"),
        pytest.param({"owner": "other"}, id="other-owner"),
        pytest.param({"kind": credit_pb2.GRANT_KIND_ADJUSTMENT}, id="other-kind"),
        pytest.param({"note": "another note"}, id="other-note"),
    ],
)
async def test_grant_request_id_reused_with_other_values_is_refused(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, change: dict[str, Any]
) -> None:
    owner, other_owner, request_id = new_id(), new_id(), new_id()
    await grant(credit_stub, owner, 25, request_id=request_id, note="first")
    refused = await refusal(
        grant(
            credit_stub,
            other_owner if change.get("owner") else owner,
            change.get("amount", 25),
            request_id=request_id,
            kind=change.get("kind", PURCHASE),
            note=change.get("note", "first"),
        )
    )
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS
    assert refused.reason == "REQUEST_ID_REUSED"
    assert refused.metadata == {"request_id": request_id}
    assert await buckets(credit_stub, owner) == (25, 0, 0, 25)
    missing = await refusal(credit_stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=other_owner)))
    assert missing.reason == "ACCOUNT_NOT_FOUND"  # a refused grant opens no account
    await assert_books_straight(credit_db, owner)


async def test_get_balance_of_an_unknown_owner_is_not_found(credit_stub: CreditServiceAsyncStub) -> None:
    owner = new_id()
    refused = await refusal(credit_stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner)))
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert refused.reason == "ACCOUNT_NOT_FOUND"
    assert refused.metadata["owner_id"] == owner
    assert refused.domain == SERVICE_NAME


# --- Validation at the edge ---


@dataclass(frozen=True)
class BadRequest:
    rpc: str
    request: Any
    field: str


# A valid request per RPC; each case below spoils exactly one field of it.
VALID_FIELDS: dict[str, dict[str, Any]] = {
    "GrantCredits": {"request_id": new_id(), "owner_id": new_id(), "amount": 1, "kind": PURCHASE},
    "GetBalance": {"owner_id": new_id()},
    "ReserveCredits": {"reservation_id": new_id(), "owner_id": new_id(), "amount": 1},
    "CommitReservation": {"reservation_id": new_id()},
    "CancelReservation": {"reservation_id": new_id()},
    "RefundReservation": {"reservation_id": new_id()},
    "GetReservation": {"reservation_id": new_id()},
    "ListReservations": {},
    "ListLedgerEntries": {"owner_id": new_id()},
}


def _instant(year: int) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(datetime(year, 6, 1, tzinfo=UTC))
    return message


def bad(rpc: str, field: str, value: Any, case: str) -> Any:
    request = getattr(credit_pb2, f"{rpc}Request")(**{**VALID_FIELDS[rpc], field: value})
    return pytest.param(BadRequest(rpc, request, field), id=f"{rpc}-{field}-{case}")


BAD_REQUESTS = [
    bad("GrantCredits", "request_id", "", "empty"),
    bad("GrantCredits", "request_id", "r" * 129, "too-long"),
    bad("GrantCredits", "request_id", " padded ", "spaces"),
    bad("GrantCredits", "owner_id", "not-a-uuid", "malformed"),
    bad("GrantCredits", "owner_id", NIL_UUID, "nil"),
    bad("GrantCredits", "owner_id", "", "empty"),
    bad("GrantCredits", "amount", 0, "zero"),
    bad("GrantCredits", "amount", -5, "negative"),
    bad("GrantCredits", "amount", 1_000_001, "too-big"),
    bad("GrantCredits", "kind", credit_pb2.GRANT_KIND_UNSPECIFIED, "unspecified"),
    bad("GrantCredits", "kind", 99, "unknown"),
    bad("GrantCredits", "note", "n" * 501, "too-long"),
    bad("GetBalance", "owner_id", "42", "malformed"),
    bad("GetBalance", "owner_id", NIL_UUID, "nil"),
    bad("GetBalance", "owner_id", "", "empty"),
    bad("ReserveCredits", "reservation_id", "x", "malformed"),
    bad("ReserveCredits", "reservation_id", NIL_UUID, "nil"),
    bad("ReserveCredits", "reservation_id", "", "empty"),
    bad("ReserveCredits", "owner_id", "nope", "malformed"),
    bad("ReserveCredits", "owner_id", NIL_UUID, "nil"),
    bad("ReserveCredits", "amount", 0, "zero"),
    bad("ReserveCredits", "amount", -1, "negative"),
    bad("ReserveCredits", "amount", 1_000_001, "too-big"),
    bad("ReserveCredits", "reference", "r" * 201, "too-long"),
    bad("CommitReservation", "reservation_id", "1", "malformed"),
    bad("CommitReservation", "reservation_id", "", "empty"),
    bad("CommitReservation", "amount", 0, "zero"),
    bad("CommitReservation", "amount", -2, "negative"),
    bad("CommitReservation", "amount", 1_000_001, "too-big"),
    bad("CancelReservation", "reservation_id", NIL_UUID, "nil"),
    bad("CancelReservation", "reservation_id", "cancel-me", "malformed"),
    bad("RefundReservation", "reservation_id", "", "empty"),
    bad("RefundReservation", "amount", 0, "zero"),
    bad("RefundReservation", "amount", 1_000_001, "too-big"),
    bad("GetReservation", "reservation_id", "zz", "malformed"),
    bad("ListReservations", "owner_id", "abc", "malformed"),
    bad("ListReservations", "owner_id", NIL_UUID, "nil"),
    bad("ListReservations", "status", 42, "unknown"),
    bad("ListReservations", "page_size", -1, "negative"),
    bad("ListReservations", "created_before", _instant(1990), "out-of-range"),
    bad("ListReservations", "page_token", "%%%", "garbage"),
    bad("ListLedgerEntries", "owner_id", "", "empty"),
    bad("ListLedgerEntries", "owner_id", NIL_UUID, "nil"),
    bad("ListLedgerEntries", "page_size", -3, "negative"),
    bad("ListLedgerEntries", "page_token", "%%%", "garbage"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_input_is_refused_at_the_edge_naming_the_field(
    credit_stub: CreditServiceAsyncStub, case: BadRequest
) -> None:
    refused = await refusal(getattr(credit_stub, case.rpc)(case.request))
    assert refused.code == INVALID
    assert refused.reason == "INVALID_ARGUMENT"
    assert list(refused.field_violations) == [case.field]
    assert refused.field_violations[case.field]  # a description a human can act on
    assert refused.metadata["field"] == case.field


async def test_a_refused_grant_opens_no_account(credit_stub: CreditServiceAsyncStub) -> None:
    owner = new_id()
    await refusal(grant(credit_stub, owner, 0))
    missing = await refusal(credit_stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner)))
    assert missing.reason == "ACCOUNT_NOT_FOUND"


async def test_every_bad_field_is_named_at_once(credit_stub: CreditServiceAsyncStub) -> None:
    bad_grant = credit_pb2.GrantCreditsRequest(
        request_id="", owner_id="nope", amount=0, kind=credit_pb2.GRANT_KIND_UNSPECIFIED, note="n" * 501
    )
    refused = await refusal(credit_stub.GrantCredits(bad_grant))
    assert refused.code == INVALID
    assert set(refused.field_violations) == {"request_id", "owner_id", "amount", "kind", "note"}

    bad_reserve = credit_pb2.ReserveCreditsRequest(reservation_id=NIL_UUID, owner_id="", amount=-1, reference="r" * 201)
    refused = await refusal(credit_stub.ReserveCredits(bad_reserve))
    assert set(refused.field_violations) == {"reservation_id", "owner_id", "amount", "reference"}


# --- Reserve ---


async def test_reserve_moves_credits_from_available_to_held(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    reservation_id = new_id()
    response = await credit_stub.ReserveCredits(
        credit_pb2.ReserveCreditsRequest(
            reservation_id=reservation_id, owner_id=owner, amount=4, reference=f"booking:{reservation_id}"
        )
    )
    reservation = response.reservation
    assert reservation.reservation_id == reservation_id
    assert reservation.owner_id == owner
    assert reservation.status == PENDING
    assert (reservation.amount, reservation.committed_amount, reservation.refunded_amount) == (4, 0, 0)
    assert reservation.reference == f"booking:{reservation_id}"
    ttl = reservation.expire_time.ToDatetime() - reservation.create_time.ToDatetime()
    assert timedelta(minutes=59) < ttl <= timedelta(hours=1)  # the default CREDIT_RESERVATION_TTL_S
    assert (response.balance.available, response.balance.held, response.balance.granted) == (6, 4, 10)
    assert await buckets(credit_stub, owner) == (6, 4, 0, 10)

    newest = (await ledger(credit_stub, owner))[0]
    assert movement(newest) == ("RESERVE", -4, 4, 0, 0)
    assert newest.reservation_id == reservation_id
    assert await get_reservation(credit_stub, reservation_id) == reservation
    await assert_books_straight(credit_db, owner)


async def test_reserve_of_more_than_available_is_refused_and_holds_nothing(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 5)
    await reserve(credit_stub, owner, 3)
    entries_before = len(await ledger(credit_stub, owner))
    refused_id = new_id()

    refused = await refusal(reserve(credit_stub, owner, 6, reservation_id=refused_id))
    assert refused.code == PRECONDITION
    assert refused.reason == "INSUFFICIENT_CREDITS"
    assert refused.metadata == {"owner_id": owner, "available": "2", "requested": "6"}

    assert await buckets(credit_stub, owner) == (2, 3, 0, 5)
    assert len(await ledger(credit_stub, owner)) == entries_before
    assert await reservation_rows(credit_db, refused_id) == 0
    missing = await refusal(get_reservation(credit_stub, refused_id))
    assert missing.reason == "RESERVATION_NOT_FOUND"
    await assert_books_straight(credit_db, owner)


async def test_reserve_from_an_unknown_account_is_a_failed_precondition(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner, reservation_id = new_id(), new_id()
    refused = await refusal(reserve(credit_stub, owner, 1, reservation_id=reservation_id))
    assert refused.code == PRECONDITION
    assert refused.reason == "ACCOUNT_NOT_FOUND"
    assert refused.metadata["owner_id"] == owner
    assert await reservation_rows(credit_db, reservation_id) == 0


async def test_repeated_reserve_returns_the_same_reservation_without_a_second_hold(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 4)
    reservation_id = new_id()
    first = await reserve(credit_stub, owner, 4, reservation_id=reservation_id, reference="booking:a")
    # Nothing is available any more: a repeat must still succeed, as the first call did.
    repeat = await credit_stub.ReserveCredits(
        credit_pb2.ReserveCreditsRequest(reservation_id=reservation_id, owner_id=owner, amount=4, reference="booking:a")
    )
    assert repeat.reservation == first
    assert (repeat.balance.available, repeat.balance.held) == (0, 4)
    assert await buckets(credit_stub, owner) == (0, 4, 0, 4)
    assert [movement(e)[0] for e in await ledger(credit_stub, owner)] == ["RESERVE", "GRANT"]
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize("change", ["amount", "owner", "reference"])
async def test_reserve_id_reused_with_other_values_is_refused(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, change: str
) -> None:
    owner, other_owner = await funded_owner(credit_stub, 10), await funded_owner(credit_stub, 10)
    reservation_id = new_id()
    await reserve(credit_stub, owner, 4, reservation_id=reservation_id, reference="booking:a")
    refused = await refusal(
        reserve(
            credit_stub,
            other_owner if change == "owner" else owner,
            5 if change == "amount" else 4,
            reservation_id=reservation_id,
            reference="booking:b" if change == "reference" else "booking:a",
        )
    )
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS
    assert refused.reason == "RESERVATION_ID_REUSED"
    assert refused.metadata == {"reservation_id": reservation_id}
    assert await buckets(credit_stub, owner) == (6, 4, 0, 10)
    assert await buckets(credit_stub, other_owner) == (10, 0, 0, 10)
    await assert_books_straight(credit_db, owner, other_owner)


# --- Commit and cancel ---


async def test_commit_of_the_whole_hold_spends_it(credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 4)
    committed = await commit(credit_stub, held.reservation_id)
    assert committed.status == COMMITTED
    assert committed.committed_amount == 4
    assert committed.release_reason == credit_pb2.RELEASE_REASON_UNSPECIFIED
    assert await buckets(credit_stub, owner) == (6, 0, 4, 10)
    assert [movement(e) for e in (await ledger(credit_stub, owner))[:2]] == [
        ("COMMIT", 0, -4, 4, 0),
        ("RESERVE", -4, 4, 0, 0),
    ]
    assert await get_reservation(credit_stub, held.reservation_id) == committed
    await assert_books_straight(credit_db, owner)


async def test_partial_commit_spends_part_and_releases_the_rest(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 10)
    committed = await commit(credit_stub, held.reservation_id, 6)
    assert committed.status == COMMITTED
    assert committed.committed_amount == 6
    assert await buckets(credit_stub, owner) == (4, 0, 6, 10)
    entries = await ledger(credit_stub, owner)
    assert [movement(e) for e in entries] == [
        ("RELEASE", 4, -4, 0, 0),
        ("COMMIT", 0, -6, 6, 0),
        ("RESERVE", -10, 10, 0, 0),
        ("GRANT", 10, 0, 0, 10),
    ]
    assert {e.reservation_id for e in entries[:3]} == {held.reservation_id}
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize("repeat_amount", [None, 3], ids=["unset", "same-amount"])
async def test_repeated_commit_returns_the_same_reservation(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, repeat_amount: int | None
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 5)
    first = await commit(credit_stub, held.reservation_id, 3)
    entries = len(await ledger(credit_stub, owner))
    repeat = await commit(credit_stub, held.reservation_id, repeat_amount)
    assert repeat == first  # same update_time: nothing was written again
    assert len(await ledger(credit_stub, owner)) == entries
    assert await buckets(credit_stub, owner) == (7, 0, 3, 10)
    await assert_books_straight(credit_db, owner)


async def test_commit_again_with_another_amount_is_refused(credit_stub: CreditServiceAsyncStub) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 5)
    await commit(credit_stub, held.reservation_id, 3)
    refused = await refusal(commit(credit_stub, held.reservation_id, 4))
    assert refused.code == PRECONDITION
    assert refused.reason == "RESERVATION_ALREADY_COMMITTED"
    assert refused.metadata == {"reservation_id": held.reservation_id, "status": "committed"}
    assert await buckets(credit_stub, owner) == (7, 0, 3, 10)


async def test_commit_of_more_than_held_is_refused_and_keeps_the_hold(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 5)
    refused = await refusal(commit(credit_stub, held.reservation_id, 6))
    assert refused.code == PRECONDITION
    assert refused.reason == "AMOUNT_EXCEEDS_RESERVATION"
    assert (await get_reservation(credit_stub, held.reservation_id)).status == PENDING
    assert await buckets(credit_stub, owner) == (5, 5, 0, 10)
    await assert_books_straight(credit_db, owner)


async def test_cancel_releases_the_hold_and_repeating_it_returns_the_same(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 4)
    released = await cancel(credit_stub, held.reservation_id)
    assert released.status == RELEASED
    assert released.release_reason == credit_pb2.RELEASE_REASON_CANCELLED
    assert released.committed_amount == 0
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)
    assert movement((await ledger(credit_stub, owner))[0]) == ("RELEASE", 4, -4, 0, 0)

    again = await cancel(credit_stub, held.reservation_id)
    assert again == released
    assert len(await ledger(credit_stub, owner)) == 3
    await assert_books_straight(credit_db, owner)


async def test_commit_after_cancel_is_refused_as_not_pending(credit_stub: CreditServiceAsyncStub) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 4)
    await cancel(credit_stub, held.reservation_id)
    refused = await refusal(commit(credit_stub, held.reservation_id))
    assert refused.code == PRECONDITION
    assert refused.reason == "RESERVATION_NOT_PENDING"
    assert refused.metadata["status"] == "released"
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)


async def test_cancel_after_commit_is_refused_as_already_committed(
    credit_stub: CreditServiceAsyncStub,
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 4)
    await commit(credit_stub, held.reservation_id)
    refused = await refusal(cancel(credit_stub, held.reservation_id))
    assert refused.code == PRECONDITION
    assert refused.reason == "RESERVATION_ALREADY_COMMITTED"
    assert (await get_reservation(credit_stub, held.reservation_id)).status == COMMITTED
    assert await buckets(credit_stub, owner) == (6, 0, 4, 10)


@pytest.mark.parametrize("rpc", ["CommitReservation", "CancelReservation", "RefundReservation", "GetReservation"])
async def test_unknown_reservation_is_not_found(credit_stub: CreditServiceAsyncStub, rpc: str) -> None:
    reservation_id = new_id()
    request_type = getattr(credit_pb2, f"{rpc}Request")
    refused = await refusal(getattr(credit_stub, rpc)(request_type(reservation_id=reservation_id)))
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert refused.reason == "RESERVATION_NOT_FOUND"
    assert refused.metadata == {"reservation_id": reservation_id}


# --- Refund ---


async def test_refund_of_everything_gives_the_spent_credits_back(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id)
    refunded = await refund(credit_stub, held.reservation_id)
    assert refunded.status == REFUNDED
    assert (refunded.committed_amount, refunded.refunded_amount) == (6, 6)
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)
    assert movement((await ledger(credit_stub, owner))[0]) == ("REFUND", 6, 0, -6, 0)
    await assert_books_straight(credit_db, owner)


async def test_partial_refund_gives_back_only_that_much(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id)
    refunded = await refund(credit_stub, held.reservation_id, 2)
    assert refunded.status == REFUNDED
    assert refunded.refunded_amount == 2
    assert await buckets(credit_stub, owner) == (6, 0, 4, 10)
    assert movement((await ledger(credit_stub, owner))[0]) == ("REFUND", 2, 0, -2, 0)
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize("repeat_amount", [None, 2], ids=["unset", "same-amount"])
async def test_repeated_refund_returns_the_same(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, repeat_amount: int | None
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id)
    first = await refund(credit_stub, held.reservation_id, 2)
    repeat = await refund(credit_stub, held.reservation_id, repeat_amount)
    assert repeat == first
    assert [movement(e)[0] for e in await ledger(credit_stub, owner)].count("REFUND") == 1
    assert await buckets(credit_stub, owner) == (6, 0, 4, 10)
    await assert_books_straight(credit_db, owner)


async def test_second_refund_with_another_amount_is_refused(credit_stub: CreditServiceAsyncStub) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id)
    await refund(credit_stub, held.reservation_id, 2)
    refused = await refusal(refund(credit_stub, held.reservation_id, 3))
    assert refused.code == PRECONDITION
    assert refused.reason == "RESERVATION_ALREADY_REFUNDED"
    assert refused.metadata["status"] == "refunded"
    assert await buckets(credit_stub, owner) == (6, 0, 4, 10)


async def test_refund_of_more_than_committed_is_refused(credit_stub: CreditServiceAsyncStub) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id, 4)
    refused = await refusal(refund(credit_stub, held.reservation_id, 5))
    assert refused.code == PRECONDITION
    assert refused.reason == "AMOUNT_EXCEEDS_RESERVATION"
    assert (await get_reservation(credit_stub, held.reservation_id)).status == COMMITTED


@pytest.mark.parametrize("state", ["pending", "cancelled"])
async def test_refund_of_a_reservation_never_committed_is_refused(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool, state: str
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 6)
    if state == "cancelled":
        await cancel(credit_stub, held.reservation_id)
    refused = await refusal(refund(credit_stub, held.reservation_id))
    assert refused.code == PRECONDITION
    assert refused.reason == "RESERVATION_NOT_COMMITTED"
    expected = (4, 6, 0, 10) if state == "pending" else (10, 0, 0, 10)
    assert await buckets(credit_stub, owner) == expected
    await assert_books_straight(credit_db, owner)


# --- Expiry, on a second server whose holds live one second ---


@dataclass(frozen=True)
class ExpiringServer:
    stub: CreditServiceAsyncStub
    pool: asyncpg.Pool


@pytest.fixture(scope="module")
async def expiring_server(postgres_server_url: str) -> AsyncIterator[ExpiringServer]:
    database_url = await fresh_database(postgres_server_url, "credit_expiry")
    settings = CreditSettings.from_environment(
        server_environment("CREDIT", database_url, CREDIT_RESERVATION_TTL_S="1", CREDIT_SWEEP_INTERVAL_S="0.2")
    )
    runtime = await start_credit(settings)
    try:
        address = f"127.0.0.1:{runtime.port}"
        await wait_serving(address, SERVICE_NAME)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            async with authorized_channel(address) as channel:
                yield ExpiringServer(credit_pb2_grpc.CreditServiceStub(channel), pool)
        finally:
            await pool.close()
    finally:
        await runtime.stop()


async def wait_for_status(
    stub: CreditServiceAsyncStub, reservation_id: str, status: credit_pb2.ReservationStatus.ValueType
) -> credit_pb2.Reservation:
    for _ in range(100):  # 10 s at most; the sweeper runs every 0.2 s after a 1 s TTL
        reservation = await get_reservation(stub, reservation_id)
        if reservation.status == status:
            return reservation
        await asyncio.sleep(0.1)
    raise AssertionError(f"reservation {reservation_id} is still {reservation.status}")


async def test_sweeper_releases_an_expired_hold_and_a_late_commit_is_refused(
    expiring_server: ExpiringServer,
) -> None:
    stub = expiring_server.stub
    owner = await funded_owner(stub, 10)
    paid = await reserve(stub, owner, 3)
    await commit(stub, paid.reservation_id)  # committed within its second: the sweeper must leave it
    response = await stub.ReserveCredits(
        credit_pb2.ReserveCreditsRequest(reservation_id=new_id(), owner_id=owner, amount=4)
    )
    forgotten = response.reservation
    assert forgotten.expire_time.ToDatetime() - forgotten.create_time.ToDatetime() == timedelta(seconds=1)
    balance = response.balance
    assert (balance.available, balance.held, balance.spent, balance.granted) == (3, 4, 3, 10)

    released = await wait_for_status(stub, forgotten.reservation_id, RELEASED)
    assert released.release_reason == credit_pb2.RELEASE_REASON_EXPIRED
    assert await buckets(stub, owner) == (7, 0, 3, 10)
    release = (await ledger(stub, owner))[0]
    assert movement(release) == ("RELEASE", 4, -4, 0, 0)
    assert release.reservation_id == forgotten.reservation_id

    late = await refusal(commit(stub, forgotten.reservation_id))
    assert late.code == PRECONDITION
    assert late.reason == "RESERVATION_EXPIRED"
    assert await cancel(stub, forgotten.reservation_id) == released  # nothing left to cancel
    assert (await get_reservation(stub, paid.reservation_id)).status == COMMITTED  # the sweeper left it alone
    assert await buckets(stub, owner) == (7, 0, 3, 10)
    async with expiring_server.pool.acquire() as connection:
        assert await credit_invariant_violations(connection, max_pending_overdue_s=5.0) == []


# --- Listing reservations ---


async def all_pages(
    stub: CreditServiceAsyncStub, request: credit_pb2.ListReservationsRequest
) -> tuple[list[credit_pb2.Reservation], int]:
    """Every reservation the request lists, following page tokens; and how many pages it took."""
    items: list[credit_pb2.Reservation] = []
    page = credit_pb2.ListReservationsRequest()
    page.CopyFrom(request)
    for pages in range(1, 101):
        response = await stub.ListReservations(page)
        items.extend(response.reservations)
        if not response.next_page_token:
            return items, pages
        page.page_token = response.next_page_token
    raise AssertionError("more than 100 pages")


def newest_first(reservations: list[credit_pb2.Reservation]) -> list[str]:
    ordered = sorted(
        reservations,
        key=lambda r: (r.create_time.ToDatetime(), uuid.UUID(r.reservation_id)),
        reverse=True,
    )
    return [r.reservation_id for r in ordered]


@dataclass(frozen=True)
class History:
    owner: str
    reservations: list[credit_pb2.Reservation]  # in creation order, as they are now


@pytest.fixture(scope="module")
async def history(credit_stub: CreditServiceAsyncStub) -> History:
    """One owner with seven reservations: two committed, two cancelled, three pending."""
    owner = await funded_owner(credit_stub, 100)
    made = [await reserve(credit_stub, owner, amount) for amount in range(1, 8)]
    for index in (1, 4):
        await commit(credit_stub, made[index].reservation_id)
    for index in (2, 5):
        await cancel(credit_stub, made[index].reservation_id)
    current = [await get_reservation(credit_stub, r.reservation_id) for r in made]
    return History(owner, current)


async def test_paging_an_owners_reservations_yields_each_once_newest_first(
    credit_stub: CreditServiceAsyncStub, history: History
) -> None:
    items, pages = await all_pages(credit_stub, credit_pb2.ListReservationsRequest(owner_id=history.owner, page_size=3))
    assert pages == 3
    assert [r.reservation_id for r in items] == newest_first(history.reservations)
    # Made one after another, so newest first is the reverse of creation; the pages carry the
    # reservations as they are now.
    assert items == list(reversed(history.reservations))


async def test_listing_filters_by_status(credit_stub: CreditServiceAsyncStub, history: History) -> None:
    for status, count in ((COMMITTED, 2), (RELEASED, 2), (PENDING, 3), (REFUNDED, 0)):
        request = credit_pb2.ListReservationsRequest(owner_id=history.owner, status=status, page_size=1)
        items, pages = await all_pages(credit_stub, request)
        expected = [r for r in history.reservations if r.status == status]
        assert len(expected) == count
        assert [r.reservation_id for r in items] == newest_first(expected)
        assert pages == max(count, 1)


async def test_listing_filters_by_creation_time(credit_stub: CreditServiceAsyncStub, history: History) -> None:
    cutoff = history.reservations[3].create_time
    request = credit_pb2.ListReservationsRequest(owner_id=history.owner, created_before=cutoff, page_size=2)
    items, _ = await all_pages(credit_stub, request)
    assert [r.reservation_id for r in items] == newest_first(history.reservations[:3])


async def test_listing_without_owner_pages_through_every_owner(
    credit_stub: CreditServiceAsyncStub, history: History
) -> None:
    other = await funded_owner(credit_stub, 5)
    other_reservation = await reserve(credit_stub, other, 1)
    request = credit_pb2.ListReservationsRequest(created_before=_after(other_reservation.create_time), page_size=50)
    items, _ = await all_pages(credit_stub, request)
    ids = [r.reservation_id for r in items]
    assert len(ids) == len(set(ids))
    assert ids == newest_first(items)
    assert {r.reservation_id for r in history.reservations} | {other_reservation.reservation_id} <= set(ids)


def _after(instant: timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(instant.ToDatetime(tzinfo=UTC) + timedelta(microseconds=1))
    return later


def _forge(cursor: list[Any], fingerprint: str) -> str:
    payload = json.dumps({"c": cursor, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _open(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    return decoded


async def test_bad_reservation_page_tokens_are_refused_naming_page_token(
    credit_stub: CreditServiceAsyncStub, history: History
) -> None:
    first = await credit_stub.ListReservations(credit_pb2.ListReservationsRequest(owner_id=history.owner, page_size=2))
    token = first.next_page_token
    assert token
    real = _open(token)
    bad_tokens = {
        "truncated": token[: len(token) // 2],
        "garbage": "definitely not a token",
        "too-long": "A" * 2000,
        "not-an-object": base64.urlsafe_b64encode(b"[1, 2]").decode(),
        "cursor-not-a-time": _forge(["yesterday", real["c"][1]], real["f"]),
        "cursor-not-a-uuid": _forge([real["c"][0], "not-a-uuid"], real["f"]),
        "cursor-naive-time": _forge(["2026-01-01T00:00:00", real["c"][1]], real["f"]),
        "cursor-far-past": _forge(["0001-01-01T00:00:00+14:00", real["c"][1]], real["f"]),
        "cursor-wrong-arity": _forge([real["c"][0]], real["f"]),
        "fingerprint-changed": _forge(real["c"], "0" * 16),
    }
    for name, bad in bad_tokens.items():
        request = credit_pb2.ListReservationsRequest(owner_id=history.owner, page_size=2, page_token=bad)
        refused = await refusal(credit_stub.ListReservations(request))
        assert (name, refused.code, list(refused.field_violations)) == (name, INVALID, ["page_token"])

    other_filters = [
        credit_pb2.ListReservationsRequest(owner_id=new_id(), page_size=2, page_token=token),
        credit_pb2.ListReservationsRequest(page_size=2, page_token=token),
        credit_pb2.ListReservationsRequest(owner_id=history.owner, status=PENDING, page_size=2, page_token=token),
        credit_pb2.ListReservationsRequest(
            owner_id=history.owner, created_before=_instant(2090), page_size=2, page_token=token
        ),
    ]
    for request in other_filters:
        refused = await refusal(credit_stub.ListReservations(request))
        assert refused.code == INVALID
        assert list(refused.field_violations) == ["page_token"]
        assert "other filters" in refused.field_violations["page_token"]

    # The same token with another page size is still fine: page size is not a filter.
    second = await credit_stub.ListReservations(
        credit_pb2.ListReservationsRequest(owner_id=history.owner, page_size=5, page_token=token)
    )
    assert [r.reservation_id for r in second.reservations] == newest_first(history.reservations)[2:7]


# --- Listing ledger entries ---


async def test_paging_ledger_entries_yields_each_once_newest_first(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    for _ in range(3):
        await grant(credit_stub, owner, 1)
    held = await reserve(credit_stub, owner, 6)
    await commit(credit_stub, held.reservation_id, 4)  # commit + release: 7 entries in all
    expected = await credit_db.fetch(
        "SELECT entry_id FROM credit.ledger_entries WHERE owner_id = $1 ORDER BY entry_id DESC",
        uuid.UUID(owner),
    )
    assert len(expected) == 7

    seen: list[int] = []
    token, pages = "", 0
    while True:
        pages += 1
        response = await credit_stub.ListLedgerEntries(
            credit_pb2.ListLedgerEntriesRequest(owner_id=owner, page_size=3, page_token=token)
        )
        assert all(entry.owner_id == owner for entry in response.entries)
        seen.extend(entry.entry_id for entry in response.entries)
        token = response.next_page_token
        if not token or pages > 10:
            break
    assert pages == 3
    assert seen == [row["entry_id"] for row in expected]


async def test_ledger_of_an_unknown_owner_is_not_found(credit_stub: CreditServiceAsyncStub) -> None:
    refused = await refusal(credit_stub.ListLedgerEntries(credit_pb2.ListLedgerEntriesRequest(owner_id=new_id())))
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert refused.reason == "ACCOUNT_NOT_FOUND"


async def test_bad_ledger_page_tokens_are_refused_naming_page_token(
    credit_stub: CreditServiceAsyncStub,
) -> None:
    owner = await funded_owner(credit_stub, 1)
    await grant(credit_stub, owner, 1)
    first = await credit_stub.ListLedgerEntries(credit_pb2.ListLedgerEntriesRequest(owner_id=owner, page_size=1))
    token = first.next_page_token
    assert token
    real = _open(token)
    other_owner = await funded_owner(credit_stub, 1)
    cases = {
        "other-owner": (other_owner, token),
        "garbage": (owner, "!!!"),
        "truncated": (owner, token[:-6]),
        "cursor-not-a-number": (owner, _forge(["12"], real["f"])),
        "cursor-beyond-bigint": (owner, _forge([10**30], real["f"])),
        "fingerprint-changed": (owner, _forge(real["c"], "f" * 16)),
    }
    for name, (who, bad) in cases.items():
        request = credit_pb2.ListLedgerEntriesRequest(owner_id=who, page_size=1, page_token=bad)
        refused = await refusal(credit_stub.ListLedgerEntries(request))
        assert (name, refused.code, list(refused.field_violations)) == (name, INVALID, ["page_token"])


# --- The database refuses to let the books drift, whoever writes to it ---


async def refused_by_database(pool: asyncpg.Pool, sql: str, *args: object) -> asyncpg.PostgresError:
    """Runs `sql` in a transaction that is always rolled back, so a missing guard cannot damage
    the shared database; returns the error the database raised."""

    class RolledBack(Exception):
        pass

    async with pool.acquire() as connection:
        try:
            async with connection.transaction():
                try:
                    await connection.execute(sql, *args)
                except asyncpg.PostgresError as error:
                    return error
                raise RolledBack
        except RolledBack:
            pass
    raise AssertionError(f"the database accepted: {sql}")


async def test_direct_balance_updates_are_refused(credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool) -> None:
    owner = await funded_owner(credit_stub, 10)
    owner_uuid = uuid.UUID(owner)
    for sql in (
        "UPDATE credit.accounts SET available = available + 5 WHERE owner_id = $1",
        # Keeps available + held + spent == granted, yet the ledger would no longer sum to it.
        "UPDATE credit.accounts SET available = available + 5, granted = granted + 5 WHERE owner_id = $1",
        "UPDATE credit.accounts SET available = available - 3, held = held + 3 WHERE owner_id = $1",
    ):
        error = await refused_by_database(credit_db, sql, owner_uuid)
        assert isinstance(error, asyncpg.InsufficientPrivilegeError), sql
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)
    await assert_books_straight(credit_db, owner)


async def test_the_ledger_is_append_only(credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool) -> None:
    owner = await funded_owner(credit_stub, 10)
    owner_uuid = uuid.UUID(owner)
    for sql, args in (
        ("DELETE FROM credit.ledger_entries WHERE owner_id = $1", (owner_uuid,)),
        (
            "UPDATE credit.ledger_entries SET available_delta = 11, granted_delta = 11 WHERE owner_id = $1",
            (owner_uuid,),
        ),
        ("UPDATE credit.ledger_entries SET note = 'edited' WHERE owner_id = $1", (owner_uuid,)),
        ("TRUNCATE credit.ledger_entries", ()),
        ("DELETE FROM credit.accounts WHERE owner_id = $1", (owner_uuid,)),
    ):
        error = await refused_by_database(credit_db, sql, *args)
        assert isinstance(error, asyncpg.InsufficientPrivilegeError), sql
    assert [movement(e) for e in await ledger(credit_stub, owner)] == [("GRANT", 10, 0, 0, 10)]
    await assert_books_straight(credit_db, owner)


@pytest.mark.parametrize(
    ("columns", "values"),
    [
        ("available, granted", "5, 5"),
        ("held, granted", "5, 5"),
        ("spent, granted", "5, 5"),
        ("available", "-5"),
    ],
)
async def test_an_account_cannot_be_inserted_with_credits(credit_db: asyncpg.Pool, columns: str, values: str) -> None:
    owner = uuid.uuid4()
    sql = f"INSERT INTO credit.accounts (owner_id, {columns}) VALUES ($1, {values})"
    error = await refused_by_database(credit_db, sql, owner)
    assert isinstance(error, asyncpg.InsufficientPrivilegeError)
    assert await credit_db.fetchval("SELECT count(*) FROM credit.accounts WHERE owner_id = $1", owner) == 0


async def test_a_ledger_entry_that_does_not_conserve_credits_is_refused(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    error = await refused_by_database(
        credit_db,
        """INSERT INTO credit.ledger_entries
               (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta,
                request_id, grant_kind)
           VALUES ($1, 'grant', 5, 0, 0, 3, 'forged', 'purchase')""",
        uuid.UUID(owner),
    )
    assert isinstance(error, asyncpg.CheckViolationError)
    assert error.constraint_name == "ledger_entries_conserve"
    assert await buckets(credit_stub, owner) == (10, 0, 0, 10)


# --- The invariant checker itself notices corrupted books ---


class _Corrupted(Exception):
    """Raised to roll back the corruption once the checker has seen it."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__(violations)
        self.violations = violations


async def corrupt_and_check(connection: Connection, owner: uuid.UUID, released_id: str, overdue_id: str) -> None:
    """Corrupts one account's books in a transaction, runs the checker inside it, rolls back."""
    async with connection.transaction():
        # Triggers off for this transaction only (superuser), so the guards let it through.
        await connection.execute("SET LOCAL session_replication_role = replica")
        await connection.execute(
            "UPDATE credit.accounts SET available = available + 5, granted = granted + 5 WHERE owner_id = $1", owner
        )
        await connection.execute(
            "UPDATE credit.reservations SET status = 'released', release_reason = 'cancelled'"
            " WHERE reservation_id = $1",
            uuid.UUID(released_id),
        )
        await connection.execute(
            "UPDATE credit.reservations SET expires_at = now() - interval '1 minute' WHERE reservation_id = $1",
            uuid.UUID(overdue_id),
        )
        raise _Corrupted(await credit_invariant_violations(connection, [owner], max_pending_overdue_s=30))


async def test_the_invariant_checker_reports_corrupted_books(
    credit_stub: CreditServiceAsyncStub, credit_db: asyncpg.Pool
) -> None:
    owner = await funded_owner(credit_stub, 10)
    held = await reserve(credit_stub, owner, 4)
    overdue = await reserve(credit_stub, owner, 1)
    owner_uuid = uuid.UUID(owner)
    async with credit_db.acquire() as connection:
        assert await credit_invariant_violations(connection, [owner_uuid], max_pending_overdue_s=0) == []
        with pytest.raises(_Corrupted) as corrupted:
            await corrupt_and_check(connection, owner_uuid, held.reservation_id, overdue.reservation_id)
        assert await credit_invariant_violations(connection, [owner_uuid], max_pending_overdue_s=0) == []
    found = corrupted.value.violations
    text = "\n".join(found)
    assert f"account {owner}: available is 10 but its ledger entries sum to 5" in text
    assert f"account {owner}: granted is 15 but its ledger entries sum to 10" in text
    assert f"account {owner}: held is 5 but its pending reservations hold 1" in text
    assert f"reservation {held.reservation_id} of account {owner} (released" in text
    assert f"reservation {overdue.reservation_id} of account {owner} is still pending" in text
    assert len(found) == 5
