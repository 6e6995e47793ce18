"""The booking service's client of credit.v1.CreditService.

Every call carries a deadline: the caller's remaining budget minus a margin, capped by
`call_timeout_s`, so a slow credit service gives a clear UNAVAILABLE or DEADLINE_EXCEEDED and
never a hang. All the calls made here are idempotent by reservation id, so the channel retries
them on UNAVAILABLE (a gRPC service-config retry policy, bounded).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from booking_service.domain import (
    CreditServiceTimeout,
    CreditServiceUnavailable,
    InsufficientCredits,
    NoCreditAccount,
)
from credit.v1 import credit_pb2, credit_pb2_grpc
from service_kit.auth import ServiceToken
from service_kit.errors import DomainError, error_details
from service_kit.interceptor import outgoing_metadata, remaining_budget_s
from service_kit.tls import ClientTls, aio_channel

T = TypeVar("T")

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


@dataclass(frozen=True)
class HeldReservation:
    reservation_id: uuid.UUID
    status: str  # pending, committed, released, refunded
    release_reason: str  # cancelled, expired, or ""
    reference: str
    created_at: datetime


class ReservationGone(DomainError):
    """The credit service refused a transition because of the reservation's state; `reason`
    says which (RESERVATION_EXPIRED, RESERVATION_NOT_PENDING, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # type: ignore[misc]  # the credit service's reason, passed on


class UnexpectedCreditAnswer(DomainError):
    """An answer the protocol does not expect (a bug on one side); mapped to INTERNAL."""

    reason = "CREDIT_SERVICE_ERROR"


_STATUS_NAMES = {
    credit_pb2.RESERVATION_STATUS_PENDING: "pending",
    credit_pb2.RESERVATION_STATUS_COMMITTED: "committed",
    credit_pb2.RESERVATION_STATUS_RELEASED: "released",
    credit_pb2.RESERVATION_STATUS_REFUNDED: "refunded",
}
_RELEASE_NAMES = {
    credit_pb2.RELEASE_REASON_CANCELLED: "cancelled",
    credit_pb2.RELEASE_REASON_EXPIRED: "expired",
}


class CreditClient:
    def __init__(
        self,
        target: str,
        *,
        call_timeout_s: float,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        token: ServiceToken | None = None,
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

    async def close(self) -> None:
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
        await self._call(self._stub.ReserveCredits(request, timeout=self._timeout_s(), metadata=self._metadata()))

    async def commit(self, reservation_id: uuid.UUID) -> None:
        request = credit_pb2.CommitReservationRequest(reservation_id=str(reservation_id))
        await self._call(self._stub.CommitReservation(request, timeout=self._timeout_s(), metadata=self._metadata()))

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
            HeldReservation(
                reservation_id=uuid.UUID(r.reservation_id),
                status=_STATUS_NAMES.get(r.status, "unknown"),
                release_reason=_RELEASE_NAMES.get(r.release_reason, ""),
                reference=r.reference,
                created_at=r.create_time.ToDatetime(),
            )
            for r in response.reservations
        ]


def _translate(error: grpc.aio.AioRpcError) -> DomainError:
    details = error_details(error)
    code = details.code
    if code == grpc.StatusCode.UNAVAILABLE:
        return CreditServiceUnavailable("the credit service is unavailable; retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CreditServiceTimeout("the credit service did not answer in time; retry later")
    if details.reason == "INSUFFICIENT_CREDITS":
        return InsufficientCredits(details.message, metadata=details.metadata)
    if details.reason == "ACCOUNT_NOT_FOUND":
        return NoCreditAccount(details.message, metadata=details.metadata)
    if code == grpc.StatusCode.FAILED_PRECONDITION and details.reason:
        return ReservationGone(details.reason, details.message)
    # Anything else is a bug on one side or the other: INTERNAL for our caller, the detail in our log.
    return UnexpectedCreditAnswer(f"the credit service answered {code.name} ({details.reason}): {details.message}")
