"""The booking service's client of credit.v1.CreditService.

Every call carries a deadline: the caller's remaining budget minus a margin, capped by
`call_timeout_s`, so a slow credit service gives a clear UNAVAILABLE or DEADLINE_EXCEEDED and
never a hang. All the calls made here are idempotent by reservation id, so the channel retries
them on UNAVAILABLE (a gRPC service-config retry policy, bounded).

Reserves and commits of concurrent bookings are coalesced (service_kit/batching.py): a lone one
goes out as ReserveCredits or CommitReservation with its caller's request id and trace; several
at once go out as one BatchReserveCredits or BatchCommitReservations, each item with the outcome
the single call would have had. Each caller still waits only its own budget.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import message, timestamp_pb2

from booking_service.domain import InsufficientCredits, NoCreditAccount
from booking_service.holds import (
    CreditServiceTimeout,
    CreditServiceUnavailable,
    HeldReservation,
    HoldRequest,
    HoldReused,
    ReservationGone,
    UnexpectedCreditAnswer,
)
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.auth import ServiceToken
from service_kit.batching import DEFAULT_BATCHING, BatchObserver, BatchSettings, Coalescer
from service_kit.errors import DomainError, ErrorDetails, error_details, status_message_details
from service_kit.interceptor import outgoing_metadata, remaining_budget_s
from service_kit.tls import ClientTls, aio_channel

T = TypeVar("T")
M = TypeVar("M", bound=message.Message)

# Leave this much of the caller's budget for our own work after the credit call returns.
DEADLINE_MARGIN_S = 0.2
MINIMUM_CALL_TIMEOUT_S = 0.05

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "credit.v1.CreditService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class CreditClient:
    def __init__(
        self,
        target: str,
        *,
        call_timeout_s: float,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        token: ServiceToken | None = None,
        batching: BatchSettings = DEFAULT_BATCHING,
        batch_observer: BatchObserver | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """`interceptors` see every call (the client metrics); each call carries the request id
        and the trace of the RPC being served (`outgoing_metadata`), and this service's own token
        (never the caller's: the credit service trusts the booking service, not its callers).
        `tls`: the channel's TLS (service_kit/tls.py); None: plaintext."""
        self._token = token
        self._channel = aio_channel(
            target,
            tls,
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.lb_policy_name", "round_robin"),
            ],
            interceptors=interceptors,
        )
        self._stub = credit_pb2_grpc.CreditServiceStub(self._channel)
        self._call_timeout_s = call_timeout_s
        # Concurrent bookings' reserves and commits travel together (service_kit/batching.py).
        self._reserves: Coalescer[_Call[credit_pb2.ReserveCreditsRequest], None] = Coalescer(
            "reserve_credits", self._reserve_batch, observer=batch_observer, **batching.bounds()
        )
        self._commits: Coalescer[_Call[credit_pb2.CommitReservationRequest], None] = Coalescer(
            "commit_reservations", self._commit_batch, observer=batch_observer, **batching.bounds()
        )

    async def close(self) -> None:
        await self._reserves.close()
        await self._commits.close()
        await self._channel.close()

    def _timeout_s(self) -> float:
        remaining = remaining_budget_s()
        if remaining is None:
            return self._call_timeout_s
        return max(MINIMUM_CALL_TIMEOUT_S, min(self._call_timeout_s, remaining - DEADLINE_MARGIN_S))

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return outgoing_metadata()
        return (*outgoing_metadata(), self._token.metadata())

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from None

    async def reserve(self, reservation_id: uuid.UUID, owner_id: uuid.UUID, amount: int, reference: str) -> None:
        request = credit_pb2.ReserveCreditsRequest(
            reservation_id=str(reservation_id), owner_id=str(owner_id), amount=amount, reference=reference
        )
        await self._submit(self._reserves, request, reservation_id)

    async def reserve_all(self, holds: Sequence[HoldRequest]) -> list[DomainError | None]:
        """The holds of one series together: one BatchReserveCredits (one transaction on the credit
        side), each hold with the outcome its own ReserveCredits would have had (None: held).
        UNAVAILABLE or DEADLINE_EXCEEDED for the whole call: which holds exist is then unknown, and
        a retry with the same ids makes the missing ones (each hold is idempotent)."""
        if len(holds) == 1:
            (hold,) = holds
            try:
                await self.reserve(hold.reservation_id, hold.owner_id, hold.amount, hold.reference)
            except (InsufficientCredits, NoCreditAccount, HoldReused) as refused:
                return [refused]
            return [None]
        timeout_s = self._timeout_s()
        calls = [
            _Call(
                credit_pb2.ReserveCreditsRequest(
                    reservation_id=str(hold.reservation_id),
                    owner_id=str(hold.owner_id),
                    amount=hold.amount,
                    reference=hold.reference,
                ),
                hold.reservation_id,
                (),
                timeout_s,
            )
            for hold in holds
        ]
        try:
            async with asyncio.timeout(timeout_s):
                batch_request = credit_pb2.BatchReserveCreditsRequest
                outcomes = await self._batch(calls, self._stub.BatchReserveCredits, batch_request)
        except TimeoutError:
            raise CreditServiceTimeout("the credit service did not answer in time; retry later") from None
        for outcome in outcomes:
            if outcome is not None and not isinstance(outcome, InsufficientCredits | NoCreditAccount | HoldReused):
                raise outcome  # an answer for the whole call (unavailable, a bug): no item's refusal
        return [outcome if isinstance(outcome, DomainError) else None for outcome in outcomes]

    async def commit(self, reservation_id: uuid.UUID) -> None:
        request = credit_pb2.CommitReservationRequest(reservation_id=str(reservation_id))
        await self._submit(self._commits, request, reservation_id)

    async def _submit(self, coalescer: Coalescer[_Call[M], None], request: M, reservation_id: uuid.UUID) -> None:
        """One item through its coalescer, within this call's own budget: a caller whose budget
        runs out stops waiting with CREDIT_SERVICE_TIMEOUT, whatever the batch it rode in does."""
        timeout_s = self._timeout_s()
        try:
            async with asyncio.timeout(timeout_s):
                await coalescer.submit(_Call(request, reservation_id, self._metadata(), timeout_s))
        except TimeoutError:
            raise CreditServiceTimeout("the credit service did not answer in time; retry later") from None

    async def _reserve_batch(self, calls: Sequence[_Call[credit_pb2.ReserveCreditsRequest]]) -> list[Exception | None]:
        return await self._coalesced(
            calls, self._stub.ReserveCredits, self._stub.BatchReserveCredits, credit_pb2.BatchReserveCreditsRequest
        )

    async def _commit_batch(
        self, calls: Sequence[_Call[credit_pb2.CommitReservationRequest]]
    ) -> list[Exception | None]:
        return await self._coalesced(
            calls,
            self._stub.CommitReservation,
            self._stub.BatchCommitReservations,
            credit_pb2.BatchCommitReservationsRequest,
        )

    async def _batch(
        self,
        unique: list[_Call[M]],
        method: Callable[..., Awaitable[Any]],
        request_type: Callable[..., message.Message],
    ) -> list[Exception | None]:
        response = await self._call(
            method(
                request_type(requests=[call.request for call in unique]),
                timeout=max(call.timeout_s for call in unique),
                metadata=self._batch_metadata(),
            )
        )
        return _outcomes(response.results, len(unique))

    async def _coalesced(
        self,
        calls: Sequence[_Call[M]],
        single: Callable[..., Awaitable[object]],
        batch_method: Callable[..., Awaitable[Any]],
        batch_request: Callable[..., message.Message],
    ) -> list[Exception | None]:
        """One batch RPC for the calls, each reservation once: callers asking the very same thing
        at once (a repeated booking, the outbox and the inline commit) share one item and its
        answer; another request for an id already in the batch (which the credit service would
        refuse as a whole) goes on its own. A lone call is the plain RPC, with its caller's request
        id and trace."""
        if len(calls) == 1:
            return [await self._single(single, calls[0])]
        unique: list[_Call[M]] = []
        position_of: dict[bytes, int] = {}
        reservation_ids: set[uuid.UUID] = set()
        apart: list[int] = []
        positions: list[int] = []
        for i, call in enumerate(calls):
            key = call.request.SerializeToString(deterministic=True)
            if key not in position_of and call.reservation_id in reservation_ids:
                apart.append(i)
                positions.append(-1)
                continue
            if key not in position_of:
                position_of[key] = len(unique)
                unique.append(call)
                reservation_ids.add(call.reservation_id)
            positions.append(position_of[key])
        together, alone = await asyncio.gather(
            self._batch(unique, batch_method, batch_request),
            asyncio.gather(*(self._single(single, calls[i]) for i in apart)),
        )
        outcomes = [together[position] if position >= 0 else None for position in positions]
        for i, outcome in zip(apart, alone, strict=True):
            outcomes[i] = outcome
        return outcomes

    async def _single(self, method: Callable[..., Awaitable[object]], call: _Call[M]) -> Exception | None:
        try:
            await self._call(method(call.request, timeout=call.timeout_s, metadata=call.metadata))
        except DomainError as refusal:
            return refusal
        return None

    def _batch_metadata(self) -> tuple[tuple[str, str], ...]:
        """A batch serves many callers: it carries this service's token and no caller's request id
        or trace (the credit service starts its own; each reservation id names its booking)."""
        return () if self._token is None else (self._token.metadata(),)

    async def cancel(self, reservation_id: uuid.UUID) -> None:
        request = credit_pb2.CancelReservationRequest(reservation_id=str(reservation_id))
        await self._call(self._stub.CancelReservation(request, timeout=self._timeout_s(), metadata=self._metadata()))

    async def refund(self, reservation_id: uuid.UUID, amount: int) -> None:
        request = credit_pb2.RefundReservationRequest(reservation_id=str(reservation_id), amount=amount)
        await self._call(self._stub.RefundReservation(request, timeout=self._timeout_s(), metadata=self._metadata()))

    async def stale_pending(self, created_before: datetime, limit: int) -> list[HeldReservation]:
        """Pending reservations made before `created_before`, oldest pages first is not needed:
        the reconciler takes one bounded page per pass."""
        before = timestamp_pb2.Timestamp()
        before.FromDatetime(created_before)
        request = credit_pb2.ListReservationsRequest(
            status=credit_pb2.RESERVATION_STATUS_PENDING, created_before=before, page_size=limit
        )
        response = await self._call(
            self._stub.ListReservations(request, timeout=self._call_timeout_s, metadata=self._metadata())
        )
        return [
            HeldReservation(uuid.UUID(r.reservation_id), r.reference, r.create_time.ToDatetime(tzinfo=UTC))
            for r in response.reservations
        ]


@dataclass(frozen=True)
class _Call(Generic[M]):
    """One caller's item: its request, the metadata and the timeout it would have called with."""

    request: M
    reservation_id: uuid.UUID
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float


def _outcomes(
    results: Sequence[credit_pb2.ReserveCreditsResult | credit_pb2.CommitReservationResult], expected: int
) -> list[Exception | None]:
    if len(results) != expected:
        raise UnexpectedCreditAnswer(f"the credit service answered {len(results)} results for {expected} requests")
    return [_item_outcome(result) for result in results]


def _item_outcome(result: credit_pb2.ReserveCreditsResult | credit_pb2.CommitReservationResult) -> Exception | None:
    if result.WhichOneof("result") == "response":
        return None
    if result.WhichOneof("result") == "error":
        return _translate_details(status_message_details(result.error))
    return UnexpectedCreditAnswer("the credit service answered an item without a result")


def _translate(error: grpc.aio.AioRpcError) -> DomainError:
    return _translate_details(error_details(error))


def _translate_details(details: ErrorDetails) -> DomainError:  # noqa: PLR0911  # one answer per case
    code = details.code
    if code == grpc.StatusCode.UNAVAILABLE:
        return CreditServiceUnavailable("the credit service is unavailable; retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CreditServiceTimeout("the credit service did not answer in time; retry later")
    if details.reason == "INSUFFICIENT_CREDITS":
        return InsufficientCredits(details.message, metadata=details.metadata)
    if details.reason == "ACCOUNT_NOT_FOUND":
        return NoCreditAccount(details.message, metadata=details.metadata)
    if details.reason == HoldReused.reason:
        return HoldReused(details.message, metadata=details.metadata)
    if code == grpc.StatusCode.FAILED_PRECONDITION and details.reason:
        return ReservationGone(details.reason, details.message)
    # Anything else is a bug on one side or the other: INTERNAL for our caller, the detail in our log.
    return UnexpectedCreditAnswer(f"the credit service answered {code.name} ({details.reason}): {details.message}")
