"""The credit domain: balances, reservations and their state machine. No I/O here.

            Reserve                Commit
   (none) ----------> PENDING ---------------> COMMITTED ---Refund---> REFUNDED
                        |
                        +--- Cancel / expiry --> RELEASED

Each transition is planned here as a list of ledger movements plus the reservation's new state;
the store writes them in one transaction. Repeating a finished transition plans nothing and
returns the reservation as it is (idempotency); an impossible one raises a domain error.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from service_kit.errors import DomainError

MAX_AMOUNT = 1_000_000
MAX_REFERENCE_LENGTH = 200
MAX_NOTE_LENGTH = 500


class ReservationStatus(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"
    RELEASED = "released"
    REFUNDED = "refunded"


class ReleaseReason(enum.Enum):
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class EntryKind(enum.Enum):
    GRANT = "grant"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    REFUND = "refund"


class GrantKind(enum.Enum):
    PURCHASE = "purchase"
    PROMOTION = "promotion"
    ADJUSTMENT = "adjustment"


@dataclass(frozen=True)
class Balance:
    owner_id: uuid.UUID
    available: int
    held: int
    spent: int
    granted: int
    updated_at: datetime

    def __post_init__(self) -> None:
        assert min(self.available, self.held, self.spent, self.granted) >= 0, self
        assert self.available + self.held + self.spent == self.granted, self


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: int
    owner_id: uuid.UUID
    kind: EntryKind
    available_delta: int
    held_delta: int
    spent_delta: int
    granted_delta: int
    reservation_id: uuid.UUID | None
    request_id: str | None
    grant_kind: GrantKind | None
    note: str
    created_at: datetime


@dataclass(frozen=True)
class Movement:
    """A ledger entry to write: credits moved between buckets of one account."""

    kind: EntryKind
    amount: int

    def deltas(self) -> tuple[int, int, int, int]:
        """(available, held, spent, granted) deltas; each kind moves between two buckets."""
        assert self.amount > 0
        a = self.amount
        return {
            EntryKind.GRANT: (a, 0, 0, a),
            EntryKind.RESERVE: (-a, a, 0, 0),
            EntryKind.COMMIT: (0, -a, a, 0),
            EntryKind.RELEASE: (a, -a, 0, 0),
            EntryKind.REFUND: (a, 0, -a, 0),
        }[self.kind]


@dataclass(frozen=True)
class Reservation:
    reservation_id: uuid.UUID
    owner_id: uuid.UUID
    amount: int
    committed_amount: int
    refunded_amount: int
    status: ReservationStatus
    release_reason: ReleaseReason | None
    reference: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime

    def same_request(self, owner_id: uuid.UUID, amount: int, reference: str) -> bool:
        return (self.owner_id, self.amount, self.reference) == (owner_id, amount, reference)

    def plan_commit(self, amount: int | None) -> Transition:
        if self.status in (ReservationStatus.COMMITTED, ReservationStatus.REFUNDED):
            if amount is None or amount == self.committed_amount:
                return Transition(self, ())
            raise ReservationAlreadyCommitted(self, f"it was committed with {self.committed_amount} credits")
        if self.status is ReservationStatus.RELEASED:
            if self.release_reason is ReleaseReason.EXPIRED:
                raise ReservationExpired(self)
            raise ReservationNotPending(self, "it was cancelled")
        spend = self.amount if amount is None else amount
        if not 1 <= spend <= self.amount:
            raise AmountExceedsReservation(self, spend)
        movements = [Movement(EntryKind.COMMIT, spend)]
        if spend < self.amount:
            movements.append(Movement(EntryKind.RELEASE, self.amount - spend))
        return Transition(replace(self, status=ReservationStatus.COMMITTED, committed_amount=spend), tuple(movements))

    def plan_cancel(self) -> Transition:
        if self.status is ReservationStatus.RELEASED:
            return Transition(self, ())
        if self.status is not ReservationStatus.PENDING:
            raise ReservationAlreadyCommitted(self, "a committed reservation is refunded, not cancelled")
        return self._release(ReleaseReason.CANCELLED)

    def plan_expiry(self) -> Transition:
        assert self.status is ReservationStatus.PENDING, self
        return self._release(ReleaseReason.EXPIRED)

    def _release(self, reason: ReleaseReason) -> Transition:
        released = replace(self, status=ReservationStatus.RELEASED, release_reason=reason)
        return Transition(released, (Movement(EntryKind.RELEASE, self.amount),))

    def plan_refund(self, amount: int | None) -> Transition:
        if self.status is ReservationStatus.REFUNDED:
            if amount is None or amount == self.refunded_amount:
                return Transition(self, ())
            raise ReservationAlreadyRefunded(self)
        if self.status is not ReservationStatus.COMMITTED:
            raise ReservationNotCommitted(self)
        give_back = self.committed_amount if amount is None else amount
        if not 1 <= give_back <= self.committed_amount:
            raise AmountExceedsReservation(self, give_back, of_what="committed")
        refunded = replace(self, status=ReservationStatus.REFUNDED, refunded_amount=give_back)
        return Transition(refunded, (Movement(EntryKind.REFUND, give_back),))


@dataclass(frozen=True)
class Transition:
    """The reservation after a transition and the ledger movements that pay for it; no
    movements means there is nothing to write (a repeat of a finished transition)."""

    after: Reservation
    movements: tuple[Movement, ...]

    @property
    def changes_anything(self) -> bool:
        return bool(self.movements)


# --- Domain errors. The servicer's table maps each to a status code. ---


class AccountNotFound(DomainError):
    reason = "ACCOUNT_NOT_FOUND"

    def __init__(self, owner_id: uuid.UUID) -> None:
        super().__init__(
            f"no credit account for owner {owner_id}; accounts open with their first grant",
            metadata={"owner_id": str(owner_id)},
        )


class NoAccountToReserveFrom(AccountNotFound):
    """The same reason, but a precondition of a reserve rather than a missing resource."""


class InsufficientCredits(DomainError):
    reason = "INSUFFICIENT_CREDITS"

    def __init__(self, owner_id: uuid.UUID, requested: int, available: int) -> None:
        super().__init__(
            f"owner {owner_id} has {available} credits available, {requested} requested",
            metadata={"owner_id": str(owner_id), "requested": str(requested), "available": str(available)},
        )


class IdempotencyKeyReused(DomainError):
    def __init__(self, message: str, metadata: dict[str, str]) -> None:
        super().__init__(message, metadata=metadata)


class ReservationIdReused(IdempotencyKeyReused):
    reason = "RESERVATION_ID_REUSED"

    def __init__(self, existing: Reservation) -> None:
        super().__init__(
            f"reservation {existing.reservation_id} already exists with other values "
            f"(owner {existing.owner_id}, amount {existing.amount}); use a new reservation_id",
            {"reservation_id": str(existing.reservation_id)},
        )


class RequestIdReused(IdempotencyKeyReused):
    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for another grant; use a new request_id",
            {"request_id": request_id},
        )


class ReservationNotFound(DomainError):
    reason = "RESERVATION_NOT_FOUND"

    def __init__(self, reservation_id: uuid.UUID) -> None:
        super().__init__(f"no reservation {reservation_id}", metadata={"reservation_id": str(reservation_id)})


class ReservationStateError(DomainError):
    def __init__(self, reservation: Reservation, message: str) -> None:
        super().__init__(
            f"reservation {reservation.reservation_id} is {reservation.status.value}: {message}",
            metadata={"reservation_id": str(reservation.reservation_id), "status": reservation.status.value},
        )


class ReservationNotPending(ReservationStateError):
    reason = "RESERVATION_NOT_PENDING"


class ReservationExpired(ReservationStateError):
    reason = "RESERVATION_EXPIRED"

    def __init__(self, reservation: Reservation) -> None:
        super().__init__(
            reservation,
            f"the hold expired at {reservation.expires_at.isoformat()} and its credits went back to available",
        )


class ReservationAlreadyCommitted(ReservationStateError):
    reason = "RESERVATION_ALREADY_COMMITTED"


class ReservationNotCommitted(ReservationStateError):
    reason = "RESERVATION_NOT_COMMITTED"

    def __init__(self, reservation: Reservation) -> None:
        super().__init__(reservation, "only committed credits can be refunded")


class ReservationAlreadyRefunded(ReservationStateError):
    reason = "RESERVATION_ALREADY_REFUNDED"

    def __init__(self, reservation: Reservation) -> None:
        super().__init__(reservation, f"it was refunded with {reservation.refunded_amount} credits")


class AmountExceedsReservation(ReservationStateError):
    reason = "AMOUNT_EXCEEDS_RESERVATION"

    def __init__(self, reservation: Reservation, amount: int, of_what: str = "held") -> None:
        limit = reservation.amount if of_what == "held" else reservation.committed_amount
        super().__init__(reservation, f"amount {amount} must be between 1 and the {of_what} {limit}")
