"""A scripted stand-in for the credit service, behind the same protocol class the real client
implements (booking_service.payments.Credits), for the service test tier: the booking flow runs
on a real PostgreSQL with no process and no socket, and each test scripts what the credit service
answers and when.

It keeps holds in memory with the credit service's rules (idempotent by reservation id, the same
id with other values refused, a commit or a cancel of a finished hold answered as the credit
service answers it), so that the flow's bookkeeping can be checked against it. Hooks run inside a
call, before it takes effect (`before_reserve`) or after (`after_reserve`), so that a test can make
the world change while a booking waits on the credit service.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from booking_service.domain import InsufficientCredits, NoCreditAccount
from booking_service.holds import (
    CreditServiceTimeout,
    CreditServiceUnavailable,
    HeldReservation,
    HoldRequest,
    HoldReused,
    ReservationGone,
)
from service_kit.errors import DomainError

Hook = Callable[[uuid.UUID], Awaitable[None]]


class HoldState(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"
    RELEASED = "released"
    REFUNDED = "refunded"


@dataclass
class Hold:
    owner_id: uuid.UUID
    amount: int
    reference: str
    state: HoldState = HoldState.PENDING
    refunded: int = 0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class FakeCredits:
    """Accounts and holds in memory. `calls` records every call as (method, reservation id)."""

    balances: dict[uuid.UUID, int] = field(default_factory=dict)
    holds: dict[uuid.UUID, Hold] = field(default_factory=dict)
    calls: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    # Scripted failures, consumed in order: an exception raised instead of (or, for
    # `reserve_lost_answer`, after) the call's effect.
    reserve_failures: list[Exception] = field(default_factory=list)
    commit_failures: list[Exception] = field(default_factory=list)
    # The hold is made but the answer is lost (a timeout after the credit service acted).
    reserve_lost_answer: int = 0
    before_reserve: Hook | None = None
    after_reserve: Hook | None = None

    def grant(self, owner_id: uuid.UUID, amount: int) -> None:
        self.balances[owner_id] = self.balances.get(owner_id, 0) + amount

    def available(self, owner_id: uuid.UUID) -> int:
        return self.balances.get(owner_id, 0)

    def held(self, owner_id: uuid.UUID) -> int:
        return sum(h.amount for h in self.holds.values() if h.owner_id == owner_id and h.state is HoldState.PENDING)

    async def reserve(self, reservation_id: uuid.UUID, owner_id: uuid.UUID, amount: int, reference: str) -> None:
        self.calls.append(("reserve", reservation_id))
        if self.before_reserve is not None:
            await self.before_reserve(reservation_id)
        if self.reserve_failures:
            raise self.reserve_failures.pop(0)
        existing = self.holds.get(reservation_id)
        if existing is not None:
            if (existing.owner_id, existing.amount, existing.reference) != (owner_id, amount, reference):
                raise HoldReused("reservation id reused with other values")
        elif owner_id not in self.balances:
            raise NoCreditAccount(f"no credit account for {owner_id}")
        elif self.balances[owner_id] < amount:
            raise InsufficientCredits(
                f"owner {owner_id} has {self.balances[owner_id]} credits available, {amount} requested",
                metadata={"available": str(self.balances[owner_id]), "requested": str(amount)},
            )
        else:
            self.balances[owner_id] -= amount
            self.holds[reservation_id] = Hold(owner_id, amount, reference)
        if self.after_reserve is not None:
            await self.after_reserve(reservation_id)
        if self.reserve_lost_answer:
            self.reserve_lost_answer -= 1
            raise CreditServiceTimeout("the credit service did not answer in time; retry later")

    async def reserve_all(self, holds: Sequence[HoldRequest]) -> list[DomainError | None]:
        """The holds of a series, each with its own outcome (the credit service's batch); a
        failure of the call itself (a scripted one) is raised for all."""
        outcomes: list[DomainError | None] = []
        for hold in holds:
            try:
                await self.reserve(hold.reservation_id, hold.owner_id, hold.amount, hold.reference)
            except (InsufficientCredits, NoCreditAccount, HoldReused) as refused:
                outcomes.append(refused)
            else:
                outcomes.append(None)
        return outcomes

    async def commit(self, reservation_id: uuid.UUID) -> None:
        self.calls.append(("commit", reservation_id))
        if self.commit_failures:
            raise self.commit_failures.pop(0)
        hold = self._hold(reservation_id)
        if hold.state is HoldState.RELEASED:
            raise ReservationGone("RESERVATION_NOT_PENDING", "the reservation was released")
        if hold.state is HoldState.PENDING:
            hold.state = HoldState.COMMITTED

    async def cancel(self, reservation_id: uuid.UUID) -> None:
        self.calls.append(("cancel", reservation_id))
        hold = self._hold(reservation_id)
        if hold.state in (HoldState.COMMITTED, HoldState.REFUNDED):
            raise ReservationGone("RESERVATION_ALREADY_COMMITTED", "the reservation was committed")
        if hold.state is HoldState.PENDING:
            hold.state = HoldState.RELEASED
            self.balances[hold.owner_id] += hold.amount

    async def refund(self, reservation_id: uuid.UUID, amount: int) -> None:
        self.calls.append(("refund", reservation_id))
        hold = self._hold(reservation_id)
        if hold.state is HoldState.REFUNDED:
            raise ReservationGone("RESERVATION_ALREADY_REFUNDED", "the reservation was refunded")
        if hold.state is not HoldState.COMMITTED:
            raise ReservationGone("RESERVATION_NOT_COMMITTED", "the reservation is not committed")
        hold.state, hold.refunded = HoldState.REFUNDED, amount
        self.balances[hold.owner_id] += amount

    async def stale_pending(self, created_before: datetime, limit: int) -> list[HeldReservation]:
        pending = [
            HeldReservation(reservation_id, hold.reference, hold.created_at)
            for reservation_id, hold in self.holds.items()
            if hold.state is HoldState.PENDING and hold.created_at < created_before
        ]
        return pending[:limit]

    def _hold(self, reservation_id: uuid.UUID) -> Hold:
        hold = self.holds.get(reservation_id)
        if hold is None:
            raise ReservationGone("RESERVATION_NOT_FOUND", f"no reservation {reservation_id}")
        return hold


def unavailable() -> CreditServiceUnavailable:
    return CreditServiceUnavailable("the credit service is unavailable; retry later")
