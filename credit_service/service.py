"""Use cases of the credit service. Each runs in one READ COMMITTED transaction.

Nobody pre-checks a balance and then acts on it later (failure class 1): a reserve locks the
owner's account row, compares, and inserts the hold and its ledger entry in the same transaction
(credit.reserve_many, migration 0003); the account's CHECK refuses anything the comparison let
through. Reserves and commits take many items at once (the batch RPCs); a single call is a batch
of one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
import structlog

from credit_service import store
from credit_service.domain import (
    AccountNotFound,
    Balance,
    GrantKind,
    InsufficientCredits,
    LedgerEntry,
    NoAccountToReserveFrom,
    RequestIdReused,
    Reservation,
    ReservationIdReused,
    ReservationNotFound,
    ReservationStatus,
    Transition,
)
from service_kit.connection import Connection
from service_kit.database import Database, autocommit, in_transaction
from service_kit.errors import DomainError
from service_kit.pagination import Page

log = structlog.get_logger()
# Reads and compare-and-sets of one transition: the state machine moves at most twice after a read.
TRANSITION_ATTEMPTS = 4
# A transition that happened: the reservation before it and after it.
Moved = tuple[Reservation, Reservation]


def _committing(amount: int | None) -> Callable[[Reservation], Transition]:
    return lambda reservation: reservation.plan_commit(amount)


class CreditService:
    def __init__(self, database: Database, *, reservation_ttl_s: float) -> None:
        self._database = database
        self._reservation_ttl_s = reservation_ttl_s

    async def grant(
        self, request_id: str, owner_id: uuid.UUID, amount: int, kind: GrantKind, note: str
    ) -> tuple[Balance, LedgerEntry]:
        async def work(connection: Connection) -> tuple[Balance, LedgerEntry]:
            entry = await store.fetch_grant(connection, request_id)
            if entry is None:
                await store.ensure_account(connection, owner_id)
                entry = await store.insert_grant(connection, owner_id, amount, request_id, kind, note)
                log.info("credits_granted", owner_id=str(owner_id), amount=amount, grant_kind=kind.value)
            elif (entry.owner_id, entry.granted_delta, entry.grant_kind, entry.note) != (
                owner_id,
                amount,
                kind,
                note,
            ):
                raise RequestIdReused(request_id)
            balance = await store.fetch_balance(connection, owner_id)
            assert balance is not None
            return balance, entry

        try:
            return await in_transaction(self._database.pool, work)
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name != "ledger_entries_one_grant_per_request":
                raise
            # A concurrent call with the same request_id won; run again to return its result.
            return await in_transaction(self._database.pool, work)

    async def balance(self, owner_id: uuid.UUID) -> Balance:
        async with self._database.pool.acquire() as connection:
            balance = await store.fetch_balance(connection, owner_id)
        if balance is None:
            raise AccountNotFound(owner_id)
        return balance

    async def reserve(
        self, reservation_id: uuid.UUID, owner_id: uuid.UUID, amount: int, reference: str
    ) -> tuple[Reservation, Balance]:
        (result,) = await self.reserve_many([store.ReserveItem(reservation_id, owner_id, amount, reference)])
        if isinstance(result, DomainError):
            raise result
        return result

    async def reserve_many(self, items: Sequence[store.ReserveItem]) -> list[tuple[Reservation, Balance] | DomainError]:
        """Holds for many reservations in one call and one transaction (migration 0003); each
        item's outcome in order: the reservation and its owner's balance, or its refusal. The
        caller gives each reservation id once."""
        assert len({item.reservation_id for item in items}) == len(items), "a reservation id twice in one batch"

        async def work(connection: Connection) -> list[store.ReserveOutcome]:
            return await store.reserve_many(connection, items, self._reservation_ttl_s)

        # One call does it all, so no explicit transaction is needed.
        outcomes = await autocommit(self._database.pool, work)
        return [self._reserve_result(item, outcome) for item, outcome in zip(items, outcomes, strict=True)]

    def _reserve_result(
        self, item: store.ReserveItem, outcome: store.ReserveOutcome
    ) -> tuple[Reservation, Balance] | DomainError:
        if outcome.outcome == "no_account":
            return NoAccountToReserveFrom(item.owner_id)
        if outcome.outcome == "insufficient":
            assert outcome.balance is not None, item
            return InsufficientCredits(item.owner_id, item.amount, outcome.balance.available)
        assert outcome.outcome in ("created", "existing") and outcome.reservation is not None, outcome
        if not outcome.reservation.same_request(item.owner_id, item.amount, item.reference):
            return ReservationIdReused(outcome.reservation)
        if outcome.outcome == "created":
            # Debug: the call's canonical line (rpc_finished) is the one info line of a reserve.
            log.debug("credits_reserved", reservation_id=str(item.reservation_id), amount=item.amount)
        assert outcome.balance is not None, item  # the hold's own owner has an account
        return outcome.reservation, outcome.balance

    async def commit(self, reservation_id: uuid.UUID, amount: int | None) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_commit(amount))

    async def commit_many(self, items: Sequence[tuple[uuid.UUID, int | None]]) -> list[Reservation | DomainError]:
        """Commits many reservations in one compare-and-set statement; each item's outcome in order."""
        return await self._transition_many([(reservation_id, _committing(amount)) for reservation_id, amount in items])

    async def cancel(self, reservation_id: uuid.UUID) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_cancel())

    async def refund(self, reservation_id: uuid.UUID, amount: int | None) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_refund(amount))

    async def _transition(self, reservation_id: uuid.UUID, plan: Callable[[Reservation], Transition]) -> Reservation:
        (result,) = await self._transition_many([(reservation_id, plan)])
        if isinstance(result, DomainError):
            raise result
        return result

    async def _transition_many(
        self, plans: Sequence[tuple[uuid.UUID, Callable[[Reservation], Transition]]]
    ) -> list[Reservation | DomainError]:
        """Reads, plans each in the domain, then applies every plan as one compare-and-set
        statement (`store.apply_transitions`): two round trips for the lot, and no explicit
        transaction. A reservation that another transition moved between the read and the write
        is planned again from its new state; the state machine moves at most twice, so a bounded
        number of rounds always suffices."""
        assert len({reservation_id for reservation_id, _ in plans}) == len(plans), "a reservation id twice"

        async def work(connection: Connection) -> tuple[dict[int, Reservation | DomainError], list[Moved]]:
            results: dict[int, Reservation | DomainError] = {}
            moved: list[Moved] = []
            waiting = list(range(len(plans)))
            for _ in range(TRANSITION_ATTEMPTS):
                current = await store.fetch_reservations(connection, [plans[i][0] for i in waiting])
                planned: list[tuple[int, Transition, Reservation]] = []
                for i in waiting:
                    reservation_id, plan = plans[i]
                    reservation = current.get(reservation_id)
                    if reservation is None:
                        results[i] = ReservationNotFound(reservation_id)
                        continue
                    try:
                        transition = plan(reservation)
                    except DomainError as refusal:
                        results[i] = refusal
                        continue
                    if not transition.changes_anything:
                        results[i] = reservation  # a repeat of a finished transition
                        continue
                    planned.append((i, transition, reservation))
                if not planned:
                    return results, moved
                after = await store.apply_transitions(connection, [(t, before.status) for _, t, before in planned])
                waiting = []
                for i, transition, before in planned:
                    moved_to = after.get(transition.after.reservation_id)
                    if moved_to is None:
                        waiting.append(i)  # another transition got there first: plan again
                    else:
                        results[i] = moved_to
                        moved.append((before, moved_to))
                if not waiting:
                    return results, moved
            raise AssertionError(f"reservations changed more often than their state machine allows: {waiting}")

        results, moved = await autocommit(self._database.pool, work)
        for before, after in moved:
            log.debug(  # as credits_reserved: rpc_finished is the call's info line
                "reservation_transitioned",
                reservation_id=str(after.reservation_id),
                from_status=before.status.value,
                to_status=after.status.value,
            )
        return [results[i] for i in range(len(plans))]

    async def get_reservation(self, reservation_id: uuid.UUID) -> Reservation:
        async with self._database.pool.acquire() as connection:
            reservation = await store.fetch_reservation(connection, reservation_id)
        if reservation is None:
            raise ReservationNotFound(reservation_id)
        return reservation

    async def list_reservations(
        self,
        *,
        owner_id: uuid.UUID | None,
        status: ReservationStatus | None,
        created_before: datetime | None,
        after: tuple[datetime, uuid.UUID] | None,
        page_size: int,
    ) -> Page[Reservation]:
        async with self._database.pool.acquire() as connection:
            rows = await store.list_reservations(
                connection,
                owner_id=owner_id,
                status=status,
                created_before=created_before,
                after=after,
                limit=page_size + 1,
            )
        return Page.from_rows(rows, page_size)

    async def list_entries(
        self, owner_id: uuid.UUID, *, before_entry_id: int | None, page_size: int
    ) -> Page[LedgerEntry]:
        async with self._database.pool.acquire() as connection:
            if await store.fetch_balance(connection, owner_id) is None:
                raise AccountNotFound(owner_id)
            rows = await store.list_entries(connection, owner_id, before_entry_id=before_entry_id, limit=page_size + 1)
        return Page.from_rows(rows, page_size)

    async def release_expired(self, batch_size: int) -> int:
        """Releases up to `batch_size` expired holds; returns how many."""

        async def work(connection: Connection) -> int:
            expired = await store.lock_expired_reservations(connection, batch_size)
            for reservation in expired:
                transition = reservation.plan_expiry()
                await store.write_movements(
                    connection, reservation.owner_id, reservation.reservation_id, transition.movements
                )
                await store.update_reservation(connection, transition.after)
            return len(expired)

        released = await in_transaction(self._database.pool, work)
        if released:
            log.info("expired_reservations_released", count=released)
        return released
