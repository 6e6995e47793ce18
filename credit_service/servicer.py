"""credit.v1.CreditService over gRPC: protobuf <-> domain, and the one table of status codes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from credit.v1 import credit_pb2, credit_pb2_grpc
from credit_service import domain
from credit_service.domain import MAX_AMOUNT, MAX_NOTE_LENGTH, MAX_REFERENCE_LENGTH
from credit_service.service import CreditService
from credit_service.store import ReserveItem
from service_kit import pagination
from service_kit.auth import ADMIN, CLIENT, SERVICE, AccessRules, anyone_with, either, own
from service_kit.errors import DeadlineExceeded, DomainError, InvalidArgument, Unavailable, status_message_for
from service_kit.interceptor import code_for
from service_kit.validation import Checks

SERVICE_NAME = credit_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name
ERROR_DOMAIN = SERVICE_NAME
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_ENTRY_ID = 2**63 - 1  # ledger_entries.entry_id is a bigint
# Items of one batch RPC: a booking service sends at most its own batch bound (64).
MAX_BATCH_ITEMS = 100

# The one table from domain errors to status codes (subclasses inherit their parent's code).
# Who may call what (docs/security.md). Only the booking service (role `service`) moves credits
# between available, held and spent; a client reads its own account only; grants are an admin's.
ACCESS_RULES: AccessRules = {
    "GrantCredits": anyone_with(ADMIN),
    "GetBalance": either(anyone_with(ADMIN), own(CLIENT, "owner_id")),
    "ListLedgerEntries": either(anyone_with(ADMIN), own(CLIENT, "owner_id")),
    "ReserveCredits": anyone_with(SERVICE),
    "BatchReserveCredits": anyone_with(SERVICE),
    "CommitReservation": anyone_with(SERVICE),
    "BatchCommitReservations": anyone_with(SERVICE),
    "CancelReservation": anyone_with(SERVICE),
    "RefundReservation": anyone_with(SERVICE),
    "GetReservation": anyone_with(SERVICE, ADMIN),
    "ListReservations": anyone_with(SERVICE, ADMIN),
}

ERROR_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    # DESIGN.md failure class 6: reserving from a missing account is a precondition failure.
    domain.NoAccountToReserveFrom: grpc.StatusCode.FAILED_PRECONDITION,
    domain.InsufficientCredits: grpc.StatusCode.FAILED_PRECONDITION,
    domain.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    domain.ReservationNotFound: grpc.StatusCode.NOT_FOUND,
    domain.ReservationStateError: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_STATUS_TO_PROTO = {
    domain.ReservationStatus.PENDING: credit_pb2.RESERVATION_STATUS_PENDING,
    domain.ReservationStatus.COMMITTED: credit_pb2.RESERVATION_STATUS_COMMITTED,
    domain.ReservationStatus.RELEASED: credit_pb2.RESERVATION_STATUS_RELEASED,
    domain.ReservationStatus.REFUNDED: credit_pb2.RESERVATION_STATUS_REFUNDED,
}
_STATUS_FROM_PROTO = {number: status for status, number in _STATUS_TO_PROTO.items()}
_RELEASE_TO_PROTO = {
    domain.ReleaseReason.CANCELLED: credit_pb2.RELEASE_REASON_CANCELLED,
    domain.ReleaseReason.EXPIRED: credit_pb2.RELEASE_REASON_EXPIRED,
}
_ENTRY_KIND_TO_PROTO = {
    domain.EntryKind.GRANT: credit_pb2.LEDGER_ENTRY_KIND_GRANT,
    domain.EntryKind.RESERVE: credit_pb2.LEDGER_ENTRY_KIND_RESERVE,
    domain.EntryKind.COMMIT: credit_pb2.LEDGER_ENTRY_KIND_COMMIT,
    domain.EntryKind.RELEASE: credit_pb2.LEDGER_ENTRY_KIND_RELEASE,
    domain.EntryKind.REFUND: credit_pb2.LEDGER_ENTRY_KIND_REFUND,
}
_GRANT_KIND_FROM_PROTO = {
    credit_pb2.GRANT_KIND_PURCHASE: domain.GrantKind.PURCHASE,
    credit_pb2.GRANT_KIND_PROMOTION: domain.GrantKind.PROMOTION,
    credit_pb2.GRANT_KIND_ADJUSTMENT: domain.GrantKind.ADJUSTMENT,
}

Context = grpc.aio.ServicerContext[Any, Any]


def timestamp(instant: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(instant.astimezone(UTC))
    return message


def balance_message(balance: domain.Balance) -> credit_pb2.Balance:
    return credit_pb2.Balance(
        owner_id=str(balance.owner_id),
        available=balance.available,
        held=balance.held,
        spent=balance.spent,
        granted=balance.granted,
        update_time=timestamp(balance.updated_at),
    )


def reservation_message(reservation: domain.Reservation) -> credit_pb2.Reservation:
    return credit_pb2.Reservation(
        reservation_id=str(reservation.reservation_id),
        owner_id=str(reservation.owner_id),
        amount=reservation.amount,
        committed_amount=reservation.committed_amount,
        refunded_amount=reservation.refunded_amount,
        status=_STATUS_TO_PROTO[reservation.status],
        release_reason=_RELEASE_TO_PROTO[reservation.release_reason]
        if reservation.release_reason
        else credit_pb2.RELEASE_REASON_UNSPECIFIED,
        reference=reservation.reference,
        create_time=timestamp(reservation.created_at),
        update_time=timestamp(reservation.updated_at),
        expire_time=timestamp(reservation.expires_at),
    )


def entry_message(entry: domain.LedgerEntry) -> credit_pb2.LedgerEntry:
    return credit_pb2.LedgerEntry(
        entry_id=entry.entry_id,
        owner_id=str(entry.owner_id),
        kind=_ENTRY_KIND_TO_PROTO[entry.kind],
        available_delta=entry.available_delta,
        held_delta=entry.held_delta,
        spent_delta=entry.spent_delta,
        granted_delta=entry.granted_delta,
        reservation_id=str(entry.reservation_id) if entry.reservation_id else "",
        request_id=entry.request_id or "",
        create_time=timestamp(entry.created_at),
    )


def _optional_amount(checks: Checks, request: Any, prefix: str = "") -> int | None:
    if not request.HasField("amount"):
        return None
    return checks.integer(f"{prefix}amount", request.amount, minimum=1, maximum=MAX_AMOUNT)


def _reserve_item(checks: Checks, request: credit_pb2.ReserveCreditsRequest, prefix: str = "") -> ReserveItem:
    return ReserveItem(
        reservation_id=checks.uuid(f"{prefix}reservation_id", request.reservation_id),
        owner_id=checks.uuid(f"{prefix}owner_id", request.owner_id),
        amount=checks.integer(f"{prefix}amount", request.amount, minimum=1, maximum=MAX_AMOUNT),
        reference=checks.text(f"{prefix}reference", request.reference, max_length=MAX_REFERENCE_LENGTH),
    )


def _batch_size(checks: Checks, size: int) -> None:
    if not 1 <= size <= MAX_BATCH_ITEMS:
        checks.fail("requests", f"must hold 1 to {MAX_BATCH_ITEMS} items, got {size}")


def _distinct_ids(checks: Checks, reservation_ids: list[uuid.UUID]) -> None:
    """Each reservation id at most once in a batch: two outcomes for one id would contradict."""
    seen: set[uuid.UUID] = set()
    for i, reservation_id in enumerate(reservation_ids):
        if reservation_id in seen and reservation_id.int != 0:  # the nil UUID is refused already
            checks.fail(f"requests[{i}].reservation_id", "appears twice in the batch")
        seen.add(reservation_id)


def _item_status(error: DomainError) -> status_pb2.Status:
    """One item's refusal, as ReserveCredits or CommitReservation alone would have answered it."""
    return status_message_for(error, code_for(error, ERROR_CODES), domain=ERROR_DOMAIN)


class CreditServicer(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, service: CreditService) -> None:
        self._service = service

    async def GrantCredits(
        self, request: credit_pb2.GrantCreditsRequest, context: Context
    ) -> credit_pb2.GrantCreditsResponse:
        checks = Checks()
        request_id = checks.request_id("request_id", request.request_id)
        owner_id = checks.uuid("owner_id", request.owner_id)
        amount = checks.integer("amount", request.amount, minimum=1, maximum=MAX_AMOUNT)
        kind = checks.enum("kind", request.kind, credit_pb2.GrantKind.Name)
        note = checks.text("note", request.note, max_length=MAX_NOTE_LENGTH, multiline=True)
        checks.done()
        balance, entry = await self._service.grant(request_id, owner_id, amount, _GRANT_KIND_FROM_PROTO[kind], note)
        return credit_pb2.GrantCreditsResponse(balance=balance_message(balance), entry=entry_message(entry))

    async def GetBalance(
        self, request: credit_pb2.GetBalanceRequest, context: Context
    ) -> credit_pb2.GetBalanceResponse:
        checks = Checks()
        owner_id = checks.uuid("owner_id", request.owner_id)
        checks.done()
        return credit_pb2.GetBalanceResponse(balance=balance_message(await self._service.balance(owner_id)))

    async def ReserveCredits(
        self, request: credit_pb2.ReserveCreditsRequest, context: Context
    ) -> credit_pb2.ReserveCreditsResponse:
        checks = Checks()
        item = _reserve_item(checks, request)
        checks.done()
        reservation, balance = await self._service.reserve(
            item.reservation_id, item.owner_id, item.amount, item.reference
        )
        return credit_pb2.ReserveCreditsResponse(
            reservation=reservation_message(reservation), balance=balance_message(balance)
        )

    async def BatchReserveCredits(
        self, request: credit_pb2.BatchReserveCreditsRequest, context: Context
    ) -> credit_pb2.BatchReserveCreditsResponse:
        checks = Checks()
        _batch_size(checks, len(request.requests))
        items = [_reserve_item(checks, one, f"requests[{i}].") for i, one in enumerate(request.requests)]
        _distinct_ids(checks, [item.reservation_id for item in items])
        checks.done()
        results = []
        for outcome in await self._service.reserve_many(items):
            if isinstance(outcome, DomainError):
                results.append(credit_pb2.ReserveCreditsResult(error=_item_status(outcome)))
            else:
                reservation, balance = outcome
                response = credit_pb2.ReserveCreditsResponse(
                    reservation=reservation_message(reservation), balance=balance_message(balance)
                )
                results.append(credit_pb2.ReserveCreditsResult(response=response))
        return credit_pb2.BatchReserveCreditsResponse(results=results)

    async def CommitReservation(
        self, request: credit_pb2.CommitReservationRequest, context: Context
    ) -> credit_pb2.CommitReservationResponse:
        checks = Checks()
        reservation_id = checks.uuid("reservation_id", request.reservation_id)
        amount = _optional_amount(checks, request)
        checks.done()
        reservation = await self._service.commit(reservation_id, amount)
        return credit_pb2.CommitReservationResponse(reservation=reservation_message(reservation))

    async def BatchCommitReservations(
        self, request: credit_pb2.BatchCommitReservationsRequest, context: Context
    ) -> credit_pb2.BatchCommitReservationsResponse:
        checks = Checks()
        _batch_size(checks, len(request.requests))
        items = [
            (
                checks.uuid(f"requests[{i}].reservation_id", one.reservation_id),
                _optional_amount(checks, one, f"requests[{i}]."),
            )
            for i, one in enumerate(request.requests)
        ]
        _distinct_ids(checks, [reservation_id for reservation_id, _ in items])
        checks.done()
        results = []
        for outcome in await self._service.commit_many(items):
            if isinstance(outcome, DomainError):
                results.append(credit_pb2.CommitReservationResult(error=_item_status(outcome)))
            else:
                response = credit_pb2.CommitReservationResponse(reservation=reservation_message(outcome))
                results.append(credit_pb2.CommitReservationResult(response=response))
        return credit_pb2.BatchCommitReservationsResponse(results=results)

    async def CancelReservation(
        self, request: credit_pb2.CancelReservationRequest, context: Context
    ) -> credit_pb2.CancelReservationResponse:
        checks = Checks()
        reservation_id = checks.uuid("reservation_id", request.reservation_id)
        checks.done()
        reservation = await self._service.cancel(reservation_id)
        return credit_pb2.CancelReservationResponse(reservation=reservation_message(reservation))

    async def RefundReservation(
        self, request: credit_pb2.RefundReservationRequest, context: Context
    ) -> credit_pb2.RefundReservationResponse:
        checks = Checks()
        reservation_id = checks.uuid("reservation_id", request.reservation_id)
        amount = _optional_amount(checks, request)
        checks.done()
        reservation = await self._service.refund(reservation_id, amount)
        return credit_pb2.RefundReservationResponse(reservation=reservation_message(reservation))

    async def GetReservation(
        self, request: credit_pb2.GetReservationRequest, context: Context
    ) -> credit_pb2.GetReservationResponse:
        checks = Checks()
        reservation_id = checks.uuid("reservation_id", request.reservation_id)
        checks.done()
        reservation = await self._service.get_reservation(reservation_id)
        return credit_pb2.GetReservationResponse(reservation=reservation_message(reservation))

    async def ListReservations(
        self, request: credit_pb2.ListReservationsRequest, context: Context
    ) -> credit_pb2.ListReservationsResponse:
        checks = Checks()
        owner_id = checks.optional_uuid("owner_id", request.owner_id)
        status_number = checks.enum("status", request.status, credit_pb2.ReservationStatus.Name, allow_unspecified=True)
        created_before = (
            checks.instant("created_before", request.created_before) if request.HasField("created_before") else None
        )
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        filters = (owner_id, status_number, created_before)
        after = pagination.decode_instant_and_id(request.page_token, filters)
        page = await self._service.list_reservations(
            owner_id=owner_id,
            status=_STATUS_FROM_PROTO.get(status_number),
            created_before=created_before,
            after=after,
            page_size=page_size,
        )
        next_token = ""
        if page.has_more:
            last = page.items[-1]
            next_token = pagination.encode_instant_and_id(last.created_at, last.reservation_id, filters)
        return credit_pb2.ListReservationsResponse(
            reservations=[reservation_message(r) for r in page.items], next_page_token=next_token
        )

    async def ListLedgerEntries(
        self, request: credit_pb2.ListLedgerEntriesRequest, context: Context
    ) -> credit_pb2.ListLedgerEntriesResponse:
        checks = Checks()
        owner_id = checks.uuid("owner_id", request.owner_id)
        page_size = checks.page_size("page_size", request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        checks.done()
        filters = (owner_id,)
        cursor = pagination.decode(request.page_token, filters, arity=1)
        before_entry_id = None
        if cursor is not None:
            # Entry ids are positive bigints; a forged one outside that range would fail in the driver.
            if not isinstance(cursor[0], int) or not 1 <= cursor[0] <= MAX_ENTRY_ID:
                raise InvalidArgument.of("page_token", "is not a page token from this API")
            before_entry_id = cursor[0]
        page = await self._service.list_entries(owner_id, before_entry_id=before_entry_id, page_size=page_size)
        next_token = pagination.encode([page.items[-1].entry_id], filters) if page.has_more else ""
        return credit_pb2.ListLedgerEntriesResponse(
            entries=[entry_message(e) for e in page.items], next_page_token=next_token
        )
