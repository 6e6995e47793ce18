"""Credit holds as the booking service sees them: a hold to make, a hold the reconciler lists,
and the credit service's answers that are errors here (a reused key, a reservation in another
state, an unexpected answer, no answer). No I/O; `credits` speaks the protocol.

The refusals a client can be given for credits (InsufficientCredits, NoCreditAccount) stay in
`domain`: they are recorded as a request's answer with the other refusals.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from service_kit.errors import DomainError


@dataclass(frozen=True)
class HoldRequest:
    """A credit hold to make: for a booking (its reservation id is the booking id), by `reference`."""

    reservation_id: uuid.UUID
    owner_id: uuid.UUID
    amount: int
    reference: str


@dataclass(frozen=True)
class HeldReservation:
    """A credit hold, as the reconciler lists them."""

    reservation_id: uuid.UUID
    reference: str
    created_at: datetime


class HoldReused(DomainError):
    """The credit service holds this request's key for another amount: the request_id was used
    for another booking (see RequestIdReused, which the flow raises for it)."""

    reason = "RESERVATION_ID_REUSED"


class ReservationGone(DomainError):
    """The credit service refused a transition because of the reservation's state; `reason`
    says which (RESERVATION_EXPIRED, RESERVATION_NOT_PENDING, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # type: ignore[misc]  # the credit service's reason, passed on


class UnexpectedCreditAnswer(DomainError):
    """An answer the protocol does not expect (a bug on one side); mapped to INTERNAL."""

    reason = "CREDIT_SERVICE_ERROR"


class CreditServiceUnavailable(DomainError):
    reason = "CREDIT_SERVICE_UNAVAILABLE"


class CreditServiceTimeout(DomainError):
    reason = "CREDIT_SERVICE_TIMEOUT"
