"""Use cases of the credit service. Each runs in one READ COMMITTED transaction.

Nobody pre-checks a balance and then acts on it: a reserve inserts its ledger entry and the
account's CHECK refuses it atomically when too few credits are available (failure class 1).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
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
from service_kit.pagination import Page

log = structlog.get_logger()
# Reads and compare-and-sets of one transition: the state machine moves at most twice after a read.
TRANSITION_ATTEMPTS = 4


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
        async def work(connection: Connection) -> tuple[Reservation, bool, Balance | None]:
            return await store.reserve(connection, reservation_id, owner_id, amount, reference, self._reservation_ttl_s)

        try:
            # One call does it all (migration 0002), so no explicit transaction is needed.
            reservation, created, balance = await autocommit(self._database.pool, work)
        except asyncpg.ForeignKeyViolationError as error:
            if error.constraint_name == "reservations_owner_id_fkey":
                raise NoAccountToReserveFrom(owner_id) from None
            raise
        except asyncpg.CheckViolationError as error:
            if error.constraint_name != "accounts_available_nonnegative":
                raise
            current = await self.balance(owner_id)
            raise InsufficientCredits(owner_id, amount, current.available) from None
        if not reservation.same_request(owner_id, amount, reference):
            raise ReservationIdReused(reservation)
        if created:
            log.info("credits_reserved", reservation_id=str(reservation_id), amount=amount)
        assert balance is not None, owner_id  # the hold's own owner has an account
        return reservation, balance

    async def commit(self, reservation_id: uuid.UUID, amount: int | None) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_commit(amount))

    async def cancel(self, reservation_id: uuid.UUID) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_cancel())

    async def refund(self, reservation_id: uuid.UUID, amount: int | None) -> Reservation:
        return await self._transition(reservation_id, lambda r: r.plan_refund(amount))

    async def _transition(self, reservation_id: uuid.UUID, plan: Callable[[Reservation], Transition]) -> Reservation:
        """Reads, plans in the domain, then applies the plan as one compare-and-set statement
        (`store.apply_transition`): two round trips and no explicit transaction. When another
        transition wins between the read and the write, it plans again from the new state; the
        state machine moves at most twice, so a bounded number of tries always suffices."""

        async def work(connection: Connection) -> tuple[Reservation, Reservation | None]:
            for _ in range(TRANSITION_ATTEMPTS):
                current = await store.fetch_reservation(connection, reservation_id)
                if current is None:
                    raise ReservationNotFound(reservation_id)
                transition = plan(current)
                if not transition.changes_anything:
                    return current, None  # a repeat of a finished transition
                after = await store.apply_transition(connection, transition, planned_from=current.status)
                if after is not None:
                    return current, after
            raise AssertionError(f"reservation {reservation_id} changed more often than its state machine allows")

        before, after = await autocommit(self._database.pool, work)
        if after is None:
            return before
        log.info(
            "reservation_transitioned",
            reservation_id=str(reservation_id),
            from_status=before.status.value,
            to_status=after.status.value,
        )
        return after

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
