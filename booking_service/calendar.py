"""The booking database's steps of the protocol, one request at a time.

`look_up` (read-only: a request's answer, or whether its slot is taken), `decide` (the locked
step, booking.decide: the one place where a request gets its answer) and `mark_paid`. The flow
calls them for one request; concurrent requests' steps travel together (service_kit/batching.py),
one statement and one transaction per batch, each request with its own outcome, as `credits.py`
does for the credit calls.

A batch never waits for one therapist's calendar: it only tries each lock, and a proposal whose
calendar another transaction holds comes back `Busy` and is decided again alone, waiting then (at
most BOOKING_LOCK_TIMEOUT_MS). An exclusion violation undoes a whole batch; each proposal is then
decided alone, so that only the one concerned is refused, and a proposal that the constraint
refuses alone is answered with the refusal a taken slot gets.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime

import structlog

from booking_service.decisions import Answer, Busy, Decision, Move, Proposal, Refuse, Unanswered
from booking_service.domain import SessionsOverlap
from booking_service.store import calendar as store
from service_kit.batching import BatchObserver, BatchSettings, Coalescer
from service_kit.connection import Connection
from service_kit.database import Database, autocommit
from service_kit.errors import DomainError

log = structlog.get_logger()


class Calendar:
    def __init__(
        self, database: Database, batching: BatchSettings, *, lock_timeout_ms: int, observer: BatchObserver | None
    ) -> None:
        self._database = database
        self._lock_timeout_ms = lock_timeout_ms
        bounds = batching.bounds()
        self._lookups: Coalescer[tuple[uuid.UUID, uuid.UUID, tuple[datetime, datetime] | None], Answer | Unanswered] = (
            Coalescer("look_up", self._look_up_batch, observer=observer, **bounds)
        )
        self._decisions: Coalescer[Proposal, Decision] = Coalescer(
            "decide", self._decide_batch, observer=observer, **bounds
        )
        self._marks: Coalescer[uuid.UUID, None] = Coalescer(
            "mark_paid", self._mark_paid_batch, observer=observer, **bounds
        )

    async def close(self) -> None:
        await self._lookups.close()
        await self._decisions.close()
        await self._marks.close()

    async def look_up(
        self, request_key: uuid.UUID, therapist_id: uuid.UUID, blocked: tuple[datetime, datetime] | None
    ) -> Answer | Unanswered:
        """The request's answer if it has one; else whether `blocked` is taken (the cheap
        pre-check, None without a range) and the therapist's schedule version."""
        return await self._lookups.submit((request_key, therapist_id, blocked))

    async def decide(self, proposal: Proposal) -> Decision:
        """The locked step for one proposal: never Busy (this waits for the lock, at most
        BOOKING_LOCK_TIMEOUT_MS, then raises CalendarBusy)."""
        decision = await self._decisions.submit(proposal)
        assert not isinstance(decision, Busy), proposal
        return decision

    async def mark_paid(self, booking_id: uuid.UUID) -> None:
        """Marks a booking whose hold was committed PAID (if it is still COMMITTING)."""
        await self._marks.submit(booking_id)

    async def _look_up_batch(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, tuple[datetime, datetime] | None]]
    ) -> list[Answer | Unanswered]:
        async def work(connection: Connection) -> list[Answer | Unanswered]:
            return await store.look_up(connection, items)

        return await autocommit(self._database.pool, work)

    async def _decide_batch(self, proposals: Sequence[Proposal]) -> list[Decision | Exception]:
        if len(proposals) == 1:
            return [await self._decide_alone(proposals[0])]
        try:
            decisions: list[Decision | Exception] = list(await self._run(proposals, wait=False))
        except SessionsOverlap:
            log.info("decide_batch_split", size=len(proposals))
            decisions = [Busy()] * len(proposals)
        again = [i for i, decision in enumerate(decisions) if isinstance(decision, Busy)]
        if again:
            log.info("decide_batch_busy", size=len(proposals), busy=len(again))
        alone = await asyncio.gather(*(self._decide_alone(proposals[i]) for i in again))
        for i, decision in zip(again, alone, strict=True):
            decisions[i] = decision
        return decisions

    async def _decide_alone(self, proposal: Proposal) -> Decision | Exception:
        """One proposal, waiting for its calendar's lock. A slot the exclusion constraint refused
        is answered as a taken slot: the refusal is recorded, as the check would have."""
        try:
            (decision,) = await self._run([proposal], wait=True)
            return decision
        except SessionsOverlap:
            assert not isinstance(proposal, Refuse), proposal  # a refusal inserts no session
            concerns = None
            if isinstance(proposal, Move):
                concerns = proposal.booking.booking_id  # a reschedule's answer names its booking
            refuse = Refuse(
                proposal.request_key, proposal.fingerprint, proposal.therapist_id, concerns, proposal.if_taken
            )
            return await self._decide_alone(refuse)
        except DomainError as error:  # CalendarBusy: this proposal's outcome, not its batch's
            return error

    async def _run(self, proposals: Sequence[Proposal], *, wait: bool) -> list[Decision]:
        async def work(connection: Connection) -> list[Decision]:
            return await store.decide(connection, proposals, wait=wait, lock_timeout_ms=self._lock_timeout_ms)

        return await autocommit(self._database.pool, work)

    async def _mark_paid_batch(self, booking_ids: Sequence[uuid.UUID]) -> list[None]:
        async def work(connection: Connection) -> None:
            await store.mark_paid(connection, booking_ids)

        await autocommit(self._database.pool, work)
        return [None] * len(booking_ids)
