"""Use cases of the booking service, the coordinator of the two-phase credit reservation.

CreateBooking, following DESIGN.md:
  1. the request_id is bound to a booking id (durably, before any credit moves), so a repeat or a
     retry after a crash reuses the same booking id and therefore the same, idempotent, hold;
  2. a cheap pre-check (availability, notice, horizon, the conflict predicate) so that obviously
     bad requests hold no credits;
  3. ReserveCredits with the booking id as reservation id;
  4. one READ COMMITTED transaction: the therapist's advisory lock, the conflict predicate again,
     the decision `commit` (the commit point of the whole booking), the session, an outbox row;
  5. CommitReservation inline; if it fails, the outbox row retries it;
  6. on a refusal in 4: the decision `abort`, then CancelReservation.
The reconciler resolves every PENDING hold older than a bound from the decision log.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
import structlog

from booking_service import availability, store
from booking_service.config import BookingSettings
from booking_service.credits import HeldReservation, ReservationGone
from booking_service.delivery import PermanentFailure, RetryLater
from booking_service.domain import (
    Actor,
    Booking,
    BookingAborted,
    BookingNotActive,
    BookingNotFound,
    BookingStatus,
    CancelReason,
    DateOverride,
    DeadLetterNotFound,
    InsufficientCredits,
    NoCreditAccount,
    PaymentStatus,
    RequestIdReused,
    SessionAlreadyStarted,
    SessionType,
    SessionTypeNotFound,
    SlotUnavailable,
    Therapist,
    TherapistNotFound,
    VideoRoom,
    VideoRoomState,
    WeeklyWindowMinutes,
    domain_error,
    fingerprint,
    notification,
    refund_for,
    schedule_of,
    video_room_name,
    video_room_window,
)
from booking_service.metrics import BookingMetrics
from booking_service.rules_cache import BookingRules, RulesCache
from booking_service.side_effects import LogNotifier, Notifier, VideoProvider
from service_kit.batching import Coalescer
from service_kit.connection import Connection
from service_kit.database import Database, autocommit, in_transaction
from service_kit.errors import DomainError
from service_kit.pagination import Page

log = structlog.get_logger()
T = TypeVar("T")

RESERVATION_REFERENCE_PREFIX = "booking:"
# Exit code of a deliberate crash at a crash point (fault tests only), like SIGKILL's 128 + 9.
CRASH_EXIT_CODE = 137
# Claims of one request whose bound booking id keeps turning out aborted: one replacement is the
# normal case; more means the reconciler keeps aborting it, and the caller should retry later.
CLAIM_ATTEMPTS = 3
# Outbox kinds of the side effects (docs/notifications.md); the payment kinds are above them.
# booking.decide_booking (migration 0003) writes the first two of a new booking by these names.
NOTIFICATION = "notification"
CREATE_VIDEO_ROOM = "create_video_room"
MOVE_VIDEO_ROOM = "move_video_room"
DELETE_VIDEO_ROOM = "delete_video_room"
VIDEO_ROOM_KINDS = (CREATE_VIDEO_ROOM, MOVE_VIDEO_ROOM, DELETE_VIDEO_ROOM)


class Credits(Protocol):
    """What the coordinator needs of the credit service."""

    async def reserve(self, reservation_id: uuid.UUID, owner_id: uuid.UUID, amount: int, reference: str) -> None: ...
    async def commit(self, reservation_id: uuid.UUID) -> None: ...
    async def cancel(self, reservation_id: uuid.UUID) -> None: ...
    async def refund(self, reservation_id: uuid.UUID, amount: int) -> None: ...
    async def stale_pending(self, created_before: datetime, limit: int) -> list[HeldReservation]: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


class BookingService:
    def __init__(
        self,
        database: Database,
        credits: Credits,
        settings: BookingSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        metrics: BookingMetrics | None = None,
        notifier: Notifier | None = None,
        video: VideoProvider | None = None,
    ) -> None:
        self._database = database
        self._credits = credits
        self._settings = settings
        self._clock = clock
        self._metrics = metrics if metrics is not None else BookingMetrics()
        self._notifier = notifier if notifier is not None else LogNotifier()
        # None: no video rooms at all (BOOKING_VIDEO_PROVIDER=none).
        self._video = video
        self._rules = RulesCache(settings.context_cache_size)
        # The database steps of concurrent bookings travel together (service_kit/batching.py),
        # each as one call and one transaction for the lot: the claims, the locked decisions,
        # and the marks of payment.
        bounds = settings.batching.bounds()
        observer = self._metrics.batch_finished
        self._claims: Coalescer[store.ClaimRequest, store.Claim | None] = Coalescer(
            "claim_attempts", self._claim_batch, observer=observer, **bounds
        )
        self._decisions: Coalescer[store.Decision, tuple[str, Booking | None]] = Coalescer(
            "decide_bookings", self._decide_batch, observer=observer, **bounds
        )
        self._payments: Coalescer[uuid.UUID, store.PaidMark | None] = Coalescer(
            "mark_paid", self._mark_paid_batch, observer=observer, **bounds
        )

    async def close(self) -> None:
        """Stops the coalescers (after the server stopped taking calls)."""
        for coalescer in (self._claims, self._decisions, self._payments):
            await coalescer.close()

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._database.pool

    def _crash_if(self, point: str) -> None:
        """A deliberate process death at a protocol step, for fault tests only."""
        if point in self._settings.crash_points:
            log.warning("crash_point_reached", point=point)
            os._exit(CRASH_EXIT_CODE)

    # --- therapists, schedules, session types (admin) ---

    async def create_therapist(self, request_id: str, therapist: Therapist) -> Therapist:
        _check(lambda: availability.zone(therapist.time_zone))
        async with self._pool.acquire() as connection:
            created = await store.insert_therapist(connection, request_id, therapist)
            if created is not None:
                log.info("therapist_created", therapist_id=str(created.therapist_id))
                return created
            existing = await store.therapist_by_request(connection, request_id)
        assert existing is not None
        if (
            replace(
                existing,
                therapist_id=therapist.therapist_id,
                created_at=therapist.created_at,
                updated_at=therapist.updated_at,
            )
            != therapist
        ):
            raise RequestIdReused(request_id)
        return existing

    async def therapist(self, therapist_id: uuid.UUID) -> Therapist:
        async with self._pool.acquire() as connection:
            found = await store.fetch_therapist(connection, therapist_id)
        if found is None:
            raise TherapistNotFound(therapist_id)
        return found

    async def update_therapist(self, therapist_id: uuid.UUID, changes: dict[str, Any]) -> Therapist:
        if "time_zone" in changes:
            _check(lambda: availability.zone(changes["time_zone"]))

        async def work(connection: Connection) -> Therapist:
            current = await store.fetch_therapist(connection, therapist_id, for_update=True)
            if current is None:
                raise TherapistNotFound(therapist_id)
            return await store.update_therapist(connection, replace(current, **changes))

        return await in_transaction(self._pool, work)

    async def set_weekly_schedule(
        self, therapist_id: uuid.UUID, windows: list[WeeklyWindowMinutes]
    ) -> list[WeeklyWindowMinutes]:
        async def work(connection: Connection) -> list[WeeklyWindowMinutes]:
            therapist = await store.fetch_therapist(connection, therapist_id, for_update=True)
            if therapist is None:
                raise TherapistNotFound(therapist_id)
            _check(lambda: schedule_of(therapist, windows, []).validate())
            await store.replace_weekly_windows(connection, therapist_id, windows)
            return await store.weekly_windows(connection, therapist_id)

        return await in_transaction(self._pool, work)

    async def set_date_override(self, therapist_id: uuid.UUID, override: DateOverride) -> DateOverride:
        async def work(connection: Connection) -> DateOverride:
            therapist = await store.fetch_therapist(connection, therapist_id, for_update=True)
            if therapist is None:
                raise TherapistNotFound(therapist_id)
            _check(lambda: schedule_of(therapist, [], [override]).validate())
            await store.upsert_override(connection, therapist_id, override)
            return override

        return await in_transaction(self._pool, work)

    async def delete_date_override(self, therapist_id: uuid.UUID, local_date: str) -> None:
        async with self._pool.acquire() as connection:
            if await store.fetch_therapist(connection, therapist_id) is None:
                raise TherapistNotFound(therapist_id)
            await store.delete_override(connection, therapist_id, local_date)

    async def schedule(
        self, therapist_id: uuid.UUID
    ) -> tuple[Therapist, list[WeeklyWindowMinutes], list[DateOverride]]:
        async with self._pool.acquire() as connection:
            therapist = await store.fetch_therapist(connection, therapist_id)
            if therapist is None:
                raise TherapistNotFound(therapist_id)
            today = self._clock().astimezone(availability.zone(therapist.time_zone)).date()
            weekly = await store.weekly_windows(connection, therapist_id)
            upcoming = await store.overrides(connection, therapist_id, from_date=today.isoformat())
        return therapist, weekly, upcoming

    async def create_session_type(self, request_id: str, session_type: SessionType) -> SessionType:
        async with self._pool.acquire() as connection:
            if await store.fetch_therapist(connection, session_type.therapist_id) is None:
                raise TherapistNotFound(session_type.therapist_id)
            created = await store.insert_session_type(connection, request_id, session_type)
            if created is not None:
                return created
            existing = await store.session_type_by_request(connection, request_id)
        assert existing is not None
        if replace(existing, session_type_id=session_type.session_type_id) != session_type:
            raise RequestIdReused(request_id)
        return existing

    async def session_types(self, therapist_id: uuid.UUID) -> list[SessionType]:
        async with self._pool.acquire() as connection:
            if await store.fetch_therapist(connection, therapist_id) is None:
                raise TherapistNotFound(therapist_id)
            return await store.session_types(connection, therapist_id)

    async def _booking_context(
        self, connection: Connection, therapist_id: uuid.UUID, session_type_id: uuid.UUID
    ) -> tuple[Therapist, SessionType, availability.Schedule]:
        rules = await self._read_rules(connection, therapist_id, session_type_id)
        return rules.therapist, rules.session_type, rules.schedule

    async def _read_rules(
        self, connection: Connection, therapist_id: uuid.UUID, session_type_id: uuid.UUID
    ) -> BookingRules:
        context = await store.booking_context(connection, therapist_id, session_type_id)
        if context is None:
            raise TherapistNotFound(therapist_id)
        session_type = context.session_type
        if session_type is None or session_type.therapist_id != therapist_id:
            raise SessionTypeNotFound(session_type_id)
        schedule = schedule_of(context.therapist, context.weekly, context.overrides)
        return BookingRules(context.therapist, session_type, schedule, context.schedule_version)

    async def _booking_rules(self, therapist_id: uuid.UUID, session_type_id: uuid.UUID) -> BookingRules:
        """The rules' inputs from memory when they are there (rules_cache.py: the claim checks
        their version), from the database otherwise."""
        rules = self._rules.get(therapist_id, session_type_id)
        if rules is None:
            async with self._pool.acquire() as connection:
                rules = await self._read_rules(connection, therapist_id, session_type_id)
            self._rules.put(rules)
        return rules

    async def available_slots(
        self, therapist_id: uuid.UUID, session_type_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[Therapist, list[availability.Interval]]:
        async with self._pool.acquire() as connection:
            therapist, session_type, schedule = await self._booking_context(connection, therapist_id, session_type_id)
            # Busy ranges are the blocked ranges (with buffers) of confirmed sessions near the range.
            margin = schedule.buffer_before + schedule.buffer_after + session_type.duration
            busy = await store.busy_ranges(connection, therapist_id, start - margin, end + margin)
        slots = _check(
            lambda: availability.free_slots(
                schedule,
                session_type.duration,
                start,
                end,
                self._clock(),
                [availability.Interval(s, e) for s, e in busy],
            )
        )
        return therapist, slots

    # --- bookings ---

    async def create_booking(
        self,
        request_id: str,
        client_id: uuid.UUID,
        therapist_id: uuid.UUID,
        session_type_id: uuid.UUID,
        start: datetime,
    ) -> Booking:
        request_fingerprint = fingerprint(client_id, therapist_id, session_type_id, start.isoformat())
        claim, rules, blocked, refusal = await self._claim_attempt(
            request_id, request_fingerprint, therapist_id, session_type_id, start
        )
        booking_id = claim.booking_id
        if claim.finished:
            return await self.booking(booking_id)  # a repeat of a request that already made its booking
        if refusal is not None:
            raise refusal
        assert blocked is not None
        if claim.conflict:
            raise SlotUnavailable(start)
        session_type = rules.session_type
        now = self._clock()
        draft = Booking(
            booking_id=booking_id,
            request_id=request_id,
            client_id=client_id,
            therapist_id=therapist_id,
            session_type_id=session_type_id,
            starts_at=start,
            ends_at=start + session_type.duration,
            time_zone=rules.therapist.time_zone,
            credit_cost=session_type.credit_cost,
            status=BookingStatus.CONFIRMED,
            payment_status=PaymentStatus.COMMITTING,
            cancelled_by=None,
            cancel_reason=None,
            refunded_credits=0,
            cancelled_at=None,
            reschedule_count=0,
            created_at=now,
            updated_at=now,
        )
        await self._reserve(draft)
        self._crash_if("after_reserve")
        booking = await self._decide(draft, (blocked.start, blocked.end))
        self._crash_if("after_booking_commit")
        return await self._commit_payment_or_defer(booking)

    async def _claim_attempt(
        self,
        request_id: str,
        request_fingerprint: str,
        therapist_id: uuid.UUID,
        session_type_id: uuid.UUID,
        start: datetime,
    ) -> tuple[store.Claim, BookingRules, availability.Interval | None, DomainError | None]:
        """Checks the rules that need no database, then binds request_id to a booking id and
        pre-checks the slot (booking.claim_attempts, migration 0004, with other bookings' claims).
        Returns the claim, the rules' inputs, the blocked range and the rules' refusal, which the
        caller raises after the look-up of a finished booking: the claim applies the verdicts as
        before, forgetting the attempt when a rule or a conflict refuses (so a retry starts afresh)."""
        stale = False
        for _ in range(CLAIM_ATTEMPTS):
            rules = await self._booking_rules(therapist_id, session_type_id)
            blocked, blocked_error, bookable_error = self._rule_verdicts(rules, start)
            claim = await self._claims.submit(
                store.ClaimRequest(
                    request_id=request_id,
                    booking_id=uuid.uuid4(),
                    fingerprint=request_fingerprint,
                    therapist_id=therapist_id,
                    blocked=None if blocked is None else (blocked.start, blocked.end),
                    bookable=bookable_error is None,
                    schedule_version=rules.schedule_version,
                )
            )
            stale = claim is None
            if claim is None:
                self._rules.forget(therapist_id)  # the schedule changed since it was read: again
                continue
            if claim.fingerprint != request_fingerprint:
                raise RequestIdReused(request_id)
            if not claim.aborted:
                return claim, rules, blocked, blocked_error or bookable_error
            # An earlier try of this request was aborted (by the reconciler, after a crash or a
            # long outage): its booking id can never commit, so this try starts over with a new
            # one. Whoever replaces it first wins; the next claim returns the winner's id.
            async with self._pool.acquire() as connection:
                await store.replace_attempt(connection, request_id, claim.booking_id, uuid.uuid4())
        if stale:
            raise BookingAborted("the therapist's schedule kept changing during this booking; retry")
        raise BookingAborted("this booking attempt was aborted; retry with a new request_id")

    def _rule_verdicts(
        self, rules: BookingRules, start: datetime
    ) -> tuple[availability.Interval | None, DomainError | None, DomainError | None]:
        """The rules that need no database: the blocked range (or why it cannot be computed), and
        whether the schedule takes a booking then (or why not)."""
        duration = rules.session_type.duration
        blocked, blocked_error = _attempt(
            lambda: availability.session_blocked_interval(rules.schedule, start, duration)
        )
        _, bookable_error = _attempt(
            lambda: availability.check_bookable(rules.schedule, start, duration, self._clock())
        )
        return blocked, blocked_error, bookable_error

    async def _claim_batch(self, claims: Sequence[store.ClaimRequest]) -> list[store.Claim | None]:
        async def work(connection: Connection) -> list[store.Claim | None]:
            return await store.claim_attempts(connection, claims)

        return await autocommit(self._pool, work)

    async def _reserve(self, draft: Booking) -> None:
        reference = f"{RESERVATION_REFERENCE_PREFIX}{draft.booking_id}"
        try:
            await self._credits.reserve(draft.booking_id, draft.client_id, draft.credit_cost, reference)
        except (InsufficientCredits, NoCreditAccount):
            # Nothing is held: forget the attempt so that a retry (after a top-up) starts afresh.
            async with self._pool.acquire() as connection:
                await store.forget_attempt(connection, draft.request_id, draft.booking_id)
            raise
        # Unavailable or timed out: the hold may or may not exist. The attempt stays, so a retry
        # continues with the same id; if nobody retries, the reconciler releases the hold.

    async def _decide(self, draft: Booking, blocked: tuple[datetime, datetime]) -> Booking:
        """The commit point (booking.decide_bookings, migration 0004, with other bookings'
        decisions): under the therapist's lock, the conflict check again, the decision, the
        session, the outbox rows (CommitReservation's retry, and the side effects, which commit
        with the booking and nothing waits for). A conflict is decided `abort` in the same
        transaction; what is left here is to release the hold."""
        confirmed = notification("booking.confirmed", draft, self._clock())
        room_name = None if self._video is None else video_room_name(draft.booking_id)
        try:
            outcome, booking = await self._decisions.submit(store.Decision(draft, blocked, confirmed, room_name))
        except asyncpg.ExclusionViolationError as error:
            if error.constraint_name != "sessions_no_overlap":
                raise
            await self._abort(draft)
            raise SlotUnavailable(draft.starts_at) from None
        except asyncpg.LockNotAvailableError:
            await self._abort(draft)
            raise BookingAborted("the therapist's calendar is busy; retry with a new request_id") from None
        if outcome == "conflict":
            await self._release(draft)
            raise SlotUnavailable(draft.starts_at)
        if outcome == "aborted":
            await self._abort(draft)
            raise BookingAborted("this booking attempt was aborted; retry with a new request_id")
        if booking is None:  # "existing": a concurrent repeat of this request got here first
            booking = await self.booking(draft.booking_id)
        elif room_name is not None:
            booking = replace(booking, video_room=VideoRoom(VideoRoomState.PENDING, None, None))
        log.info("booking_confirmed", booking_id=str(booking.booking_id), therapist_id=str(booking.therapist_id))
        return booking

    async def _decide_batch(self, decisions: Sequence[store.Decision]) -> list[tuple[str, Booking | None] | Exception]:
        """The locked step of many bookings in one transaction. A batch of several never waits
        for a therapist's lock: a booking whose therapist another transaction holds ('busy'), and
        every booking of a batch that an exclusion violation undid, is decided again on its own,
        waiting for the lock then, so that a refusal reaches only the booking it concerns."""
        if len(decisions) == 1:
            return await self._decide_alone(decisions[0])
        try:
            outcomes: list[tuple[str, Booking | None] | Exception] = list(
                await self._decide_together(decisions, wait=False)
            )
        except asyncpg.ExclusionViolationError as error:
            log.info("decide_batch_split", size=len(decisions), error=type(error).__name__)
            outcomes = [("busy", None)] * len(decisions)
        again = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, tuple) and outcome[0] == "busy"]
        if again:
            log.info("decide_batch_busy", size=len(decisions), busy=len(again))
            alone = await asyncio.gather(*(self._decide_alone(decisions[i]) for i in again))
            for i, (outcome,) in zip(again, alone, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def _decide_alone(self, decision: store.Decision) -> list[tuple[str, Booking | None] | Exception]:
        try:
            return list(await self._decide_together([decision], wait=True))
        except (asyncpg.LockNotAvailableError, asyncpg.ExclusionViolationError) as error:
            return [error]

    async def _decide_together(
        self, decisions: Sequence[store.Decision], *, wait: bool
    ) -> list[tuple[str, Booking | None]]:
        async def work(connection: Connection) -> list[tuple[str, Booking | None]]:
            return await store.decide_bookings(
                connection,
                self._settings.lock_timeout_ms,
                self._settings.commit_retry_after_s,
                decisions,
                wait=wait,
            )

        return await autocommit(self._pool, work)

    async def _release(self, draft: Booking) -> None:
        """Releases the hold of a booking decided `abort`; what fails here the reconciler finishes."""
        try:
            await self._credits.cancel(draft.booking_id)
        except Exception as error:  # noqa: BLE001  # the refusal stands; recovery is the reconciler's
            log.warning("booking_abort_deferred", booking_id=str(draft.booking_id), error=repr(error))

    async def _abort(self, draft: Booking) -> None:
        """Records `abort` and releases the hold; what fails here the reconciler finishes."""
        try:
            async with self._pool.acquire() as connection:
                decision = await store.record_decision(connection, draft.booking_id, "abort")
                await store.forget_attempt(connection, draft.request_id, draft.booking_id)
        except Exception as error:  # noqa: BLE001  # the refusal stands; recovery is the reconciler's
            log.warning("booking_abort_deferred", booking_id=str(draft.booking_id), error=repr(error))
            return
        if decision == "abort":
            await self._release(draft)

    async def _commit_payment_or_defer(self, booking: Booking) -> Booking:
        try:
            marked = await self._commit_payment(booking.booking_id)
        except DomainError as error:
            log.warning("reservation_commit_deferred", booking_id=str(booking.booking_id), reason=error.reason)
            return booking
        if marked is None:  # no longer COMMITTING: the outbox marked it first, or it was cancelled
            return await self.booking(booking.booking_id)
        return replace(
            booking, payment_status=PaymentStatus.PAID, updated_at=marked.updated_at, video_room=marked.video_room
        )

    async def _commit_payment(self, booking_id: uuid.UUID) -> store.PaidMark | None:
        """Commits the hold of a decided booking and marks it paid; idempotent. Returns the mark,
        or None when the booking was not COMMITTING any more (read it again). A hold that can no
        longer be committed (it expired) cancels the booking: no session stays unpaid."""
        self._crash_if("before_commit_reservation")
        try:
            await self._credits.commit(booking_id)
        except ReservationGone as gone:
            log.error("reservation_lost_before_commit", booking_id=str(booking_id), reason=gone.reason)
            await self._cancel_unpaid(booking_id)
            return None
        return await self._payments.submit(booking_id)

    async def _mark_paid_batch(self, booking_ids: Sequence[uuid.UUID]) -> list[store.PaidMark | None]:
        async def work(connection: Connection) -> dict[uuid.UUID, store.PaidMark]:
            return await store.mark_paid(connection, booking_ids)

        marked = await autocommit(self._pool, work)
        return [marked.get(booking_id) for booking_id in booking_ids]

    async def _cancel_unpaid(self, booking_id: uuid.UUID) -> Booking:
        async def work(connection: Connection) -> Booking:
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            await store.outbox_delivered(connection, booking_id, "commit_reservation")
            if booking.status is BookingStatus.CANCELLED:
                return await store.cancel_booking(
                    connection,
                    booking_id,
                    actor=booking.cancelled_by or Actor.SYSTEM,
                    reason=booking.cancel_reason or CancelReason.PAYMENT_FAILED,
                    refunded_credits=booking.refunded_credits,
                    payment_status=PaymentStatus.REFUNDED,
                )
            cancelled = await store.cancel_booking(
                connection,
                booking_id,
                actor=Actor.SYSTEM,
                reason=CancelReason.PAYMENT_FAILED,
                refunded_credits=0,
                payment_status=PaymentStatus.REFUNDED,
            )
            return await self._enqueue_cancellation_effects(connection, cancelled, booking)

        return await in_transaction(self._pool, work)

    async def booking(self, booking_id: uuid.UUID) -> Booking:
        async with self._pool.acquire() as connection:
            found = await store.fetch_booking(connection, booking_id)
        if found is None:
            raise BookingNotFound(booking_id)
        return found

    async def list_bookings(
        self,
        *,
        client_id: uuid.UUID | None,
        therapist_id: uuid.UUID | None,
        start_after: datetime | None,
        start_before: datetime | None,
        status: BookingStatus | None,
        after: tuple[datetime, uuid.UUID] | None,
        page_size: int,
    ) -> Page[Booking]:
        async with self._pool.acquire() as connection:
            rows = await store.list_bookings(
                connection,
                client_id=client_id,
                therapist_id=therapist_id,
                start_after=start_after,
                start_before=start_before,
                status=status,
                after=after,
                limit=page_size + 1,
            )
        return Page.from_rows(rows, page_size)

    async def cancel_booking(self, booking_id: uuid.UUID, actor: Actor, reason: CancelReason) -> Booking:
        now = self._clock()
        free_cancellation = timedelta(hours=self._settings.free_cancellation_hours)

        async def work(connection: Connection) -> tuple[Booking, int]:
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            if booking is None:
                raise BookingNotFound(booking_id)
            if booking.status is BookingStatus.CANCELLED:
                return booking, 0  # cancelling twice returns the first cancellation
            if booking.starts_at <= now and actor is not Actor.ADMIN:
                raise SessionAlreadyStarted(booking_id, booking.starts_at)
            refund = refund_for(booking, actor, now, free_cancellation)
            payment = PaymentStatus.REFUNDING if refund > 0 else booking.payment_status
            cancelled = await store.cancel_booking(
                connection,
                booking_id,
                actor=actor,
                reason=reason,
                refunded_credits=refund,
                payment_status=payment,
            )
            if refund > 0:
                await store.enqueue(connection, "refund_reservation", booking_id, {"amount": refund})
            cancelled = await self._enqueue_cancellation_effects(connection, cancelled, booking)
            log.info("booking_cancelled", booking_id=str(booking_id), actor=actor.value, refund=refund)
            return cancelled, refund

        cancelled, refund = await in_transaction(self._pool, work)
        if refund == 0:
            return cancelled
        try:
            return await self._refund_payment(booking_id, refund)
        except DomainError as error:
            log.warning("refund_deferred", booking_id=str(booking_id), reason=error.reason)
            return cancelled

    async def _refund_payment(self, booking_id: uuid.UUID, amount: int) -> Booking:
        """Commits (idempotent) then refunds the booking's credits; marks it refunded."""
        try:
            await self._credits.commit(booking_id)
            await self._credits.refund(booking_id, amount)
        except ReservationGone as gone:
            if gone.reason not in ("RESERVATION_EXPIRED", "RESERVATION_ALREADY_REFUNDED"):
                raise
            # Expired: the hold already went back to available; refunded: done before.
        async with self._pool.acquire() as connection, connection.transaction():
            await store.mark_payment(
                connection, booking_id, expected=PaymentStatus.REFUNDING, new=PaymentStatus.REFUNDED
            )
            await store.outbox_delivered(connection, booking_id, "refund_reservation")
            await store.outbox_delivered(connection, booking_id, "commit_reservation")
            booking = await store.fetch_booking(connection, booking_id)
        assert booking is not None
        return booking

    async def _enqueue_notification(
        self, connection: Connection, event_type: str, booking: Booking, **extra: object
    ) -> None:
        await store.enqueue(
            connection, NOTIFICATION, booking.booking_id, notification(event_type, booking, self._clock(), **extra)
        )

    async def _enqueue_cancellation_effects(
        self, connection: Connection, cancelled: Booking, before: Booking
    ) -> Booking:
        """The notification and the room's deletion, in the cancelling transaction."""
        await self._enqueue_notification(connection, "booking.cancelled", cancelled)
        if before.video_room is None:
            return cancelled
        await store.enqueue(connection, DELETE_VIDEO_ROOM, cancelled.booking_id)
        return replace(cancelled, video_room=before.video_room)

    async def reschedule_booking(self, booking_id: uuid.UUID, request_id: str, start: datetime) -> Booking:
        request_fingerprint = fingerprint(booking_id, start.isoformat())
        now = self._clock()
        async with self._pool.acquire() as connection:
            current = await store.fetch_booking(connection, booking_id)
            if current is None:
                raise BookingNotFound(booking_id)
            _, session_type, schedule = await self._booking_context(
                connection, current.therapist_id, current.session_type_id
            )
        blocked = _check(lambda: availability.session_blocked_interval(schedule, start, session_type.duration))

        async def work(connection: Connection) -> Booking:
            recorded = await store.claim_reschedule(connection, request_id, booking_id, request_fingerprint)
            if recorded is not None:
                if recorded != request_fingerprint:
                    raise RequestIdReused(request_id)
                repeated = await store.fetch_booking(connection, booking_id)
                assert repeated is not None
                return repeated
            await store.set_lock_timeout(connection, self._settings.lock_timeout_ms)
            await store.lock_therapist_calendar(connection, current.therapist_id)
            booking = await store.fetch_booking(connection, booking_id, for_update=True)
            assert booking is not None
            if booking.status is BookingStatus.CANCELLED:
                raise BookingNotActive(booking_id)
            if booking.starts_at <= now:
                raise SessionAlreadyStarted(booking_id, booking.starts_at)
            _check(lambda: availability.check_bookable(schedule, start, session_type.duration, now))
            if await store.slot_conflicts(connection, booking.therapist_id, (blocked.start, blocked.end), booking_id):
                raise SlotUnavailable(start)
            moved = await store.move_booking(
                connection, booking_id, start, start + session_type.duration, (blocked.start, blocked.end)
            )
            await self._enqueue_notification(
                connection, "booking.rescheduled", moved, previous_start_time=booking.starts_at.isoformat()
            )
            if booking.video_room is not None:
                await store.enqueue(connection, MOVE_VIDEO_ROOM, booking_id)
                await store.set_video_room(connection, booking_id, VideoRoomState.PENDING)
                moved = replace(moved, video_room=VideoRoom(VideoRoomState.PENDING, None, None))
            log.info("booking_rescheduled", booking_id=str(booking_id), start=start.isoformat())
            return moved

        try:
            return await in_transaction(self._pool, work)
        except asyncpg.ExclusionViolationError as error:
            if error.constraint_name != "sessions_no_overlap":
                raise
            raise SlotUnavailable(start) from None
        except asyncpg.LockNotAvailableError:
            raise BookingAborted("the therapist's calendar is busy; retry") from None

    # --- recovery ---

    async def reconcile_once(self) -> bool:
        """Resolves up to one batch of stale PENDING holds; True when more may be waiting."""
        cutoff = self._clock() - timedelta(seconds=self._settings.reconcile_after_s)
        try:
            held = await self._credits.stale_pending(cutoff, self._settings.reconcile_batch_size)
        except DomainError as error:
            # The credit service is down or slow: expected during an outage; the next pass retries.
            log.warning("reconcile_pass_skipped", reason=error.reason)
            return False
        for reservation in held:
            if not reservation.reference.startswith(RESERVATION_REFERENCE_PREFIX):
                continue  # not a booking's hold
            try:
                await self._resolve(reservation.reservation_id)
            except DomainError as error:
                log.warning("reconcile_deferred", reservation_id=str(reservation.reservation_id), reason=error.reason)
                self._metrics.reconciler_action("deferred")
        return len(held) == self._settings.reconcile_batch_size

    async def _resolve(self, reservation_id: uuid.UUID) -> None:
        async with self._pool.acquire() as connection:
            # No decision yet means the booking transaction never committed (or is still running
            # and will now fail to insert its `commit`: the decision row is unique).
            decision = await store.record_decision(connection, reservation_id, "abort")
        if decision == "commit":
            await self._commit_payment(reservation_id)
            log.info("reconciler_committed", reservation_id=str(reservation_id))
            self._metrics.reconciler_action("committed")
        else:
            await self._credits.cancel(reservation_id)
            log.info("reconciler_released", reservation_id=str(reservation_id))
            self._metrics.reconciler_action("released")

    async def deliver_outbox_once(self) -> bool:
        """Delivers up to one batch of due outbox events; True when the batch was full.

        Events of different bookings go out concurrently (the batch takes about one timeout, well
        inside the lease); those of one booking in order, so a room is never moved or deleted by
        two workers of this process at once. The bookings the video rooms follow are read once
        for the batch, and every delivered event is marked so (with its room's new state) in one
        statement at the end: a worker that dies before that leaves them to be delivered again
        when their lease runs out (at-least-once, as always)."""
        async with self._pool.acquire() as connection:
            events = await store.lease_due_events(
                connection, self._settings.outbox_batch_size, self._settings.outbox_lease_s
            )
            room_bookings = {event.booking_id for event in events if event.kind in VIDEO_ROOM_KINDS}
            bookings = await store.fetch_bookings(connection, list(room_bookings)) if room_bookings else {}
        by_booking: dict[uuid.UUID, list[store.OutboxEvent]] = {}
        for event in events:
            by_booking.setdefault(event.booking_id, []).append(event)
        delivered = Delivered()
        await asyncio.gather(
            *(
                self._deliver_in_order(group, bookings.get(booking_id), delivered)
                for booking_id, group in by_booking.items()
            )
        )
        if delivered.event_ids:
            async with self._pool.acquire() as connection:
                await store.finish_events(connection, delivered.event_ids, delivered.rooms)
            for booking_id, kind, state in delivered.synced:
                log.info("video_room_synced", booking_id=str(booking_id), kind=kind, state=state.value)
        return len(events) == self._settings.outbox_batch_size

    async def _deliver_in_order(
        self, events: list[store.OutboxEvent], booking: Booking | None, delivered: Delivered
    ) -> None:
        for event in events:
            await self._deliver(event, booking, delivered)

    async def _deliver(self, event: store.OutboxEvent, booking: Booking | None, delivered: Delivered) -> None:
        try:
            if event.kind == "commit_reservation":
                await self._commit_payment(event.booking_id)
            elif event.kind == "refund_reservation":
                await self._refund_payment(event.booking_id, int(str(event.payload["amount"])))
            elif event.kind == NOTIFICATION:
                await self._notify(event)
            elif event.kind in VIDEO_ROOM_KINDS:
                await self._sync_video_room(event, booking, delivered)
            else:
                raise AssertionError(f"unknown outbox event kind {event.kind}")
        except RetryLater as later:
            backoff_s = later.delay_s if later.delay_s is not None else self._backoff_s(event.attempts)
            await self._failed(event, later.reason, min(self._settings.outbox_max_delay_s, backoff_s))
            return
        except PermanentFailure as failure:
            await self._failed(event, failure.reason, 0.0, permanent=True)
            return
        except Exception as error:  # noqa: BLE001  # any failure counts as an attempt, so a poison event dead-letters
            await self._failed(event, repr(error), self._backoff_s(event.attempts))
            return
        delivered.event_ids.append(event.event_id)

    def _backoff_s(self, attempts: int) -> float:
        """Exponential backoff with jitter (half to all of the doubled delay), bounded."""
        base_s = self._settings.outbox_base_delay_s * float(2 ** min(attempts, 30))
        return min(self._settings.outbox_max_delay_s, base_s) * random.uniform(0.5, 1.0)

    async def _failed(self, event: store.OutboxEvent, error: str, delay_s: float, *, permanent: bool = False) -> None:
        attempts = event.attempts + 1
        dead = permanent or attempts >= self._settings.outbox_max_attempts
        async with self._pool.acquire() as connection, connection.transaction():
            await store.retry_event(connection, event.event_id, delay_s, error, dead=dead)
            if dead and event.kind in VIDEO_ROOM_KINDS:
                await store.set_video_room(connection, event.booking_id, VideoRoomState.FAILED, failure_reason=error)
        level = log.error if dead else log.warning
        level(
            "outbox_delivery_failed",
            event_id=str(event.event_id),
            kind=event.kind,
            attempts=attempts,
            dead=dead,
            retry_in_s=None if dead else round(delay_s, 3),
            error=error,
        )

    async def _notify(self, event: store.OutboxEvent) -> None:
        # Serialized the same way on every attempt, so a retry carries the same bytes.
        body = json.dumps({"id": str(event.event_id), **event.payload}, sort_keys=True, separators=(",", ":"))
        await self._notifier.send(str(event.event_id), str(event.payload.get("type")), body.encode())

    async def _sync_video_room(self, event: store.OutboxEvent, booking: Booking | None, delivered: Delivered) -> None:
        """Brings the room to the booking's state as read for this batch, whatever the event's
        kind: events of one booking may be delivered late or retried out of order, the booking
        row is the truth. The room's new state is written with the event's delivery."""
        state, url = VideoRoomState.DELETED, None
        if booking is not None and booking.video_room is not None and self._video is not None:
            name = video_room_name(booking.booking_id)
            if booking.status is BookingStatus.CANCELLED:
                await self._video.delete_room(name)
            else:
                opens_at, expires_at = video_room_window(
                    booking, self._settings.video_opens_before_s, self._settings.video_expires_after_s
                )
                room = await self._video.ensure_room(name, opens_at, expires_at)
                state, url = VideoRoomState.READY, room.url
        if booking is not None and booking.video_room is not None:
            delivered.rooms[event.booking_id] = (state, url)
        delivered.synced.append((event.booking_id, event.kind, state))

    # --- dead letters (admin) ---

    async def dead_letters(self, after: tuple[datetime, uuid.UUID] | None, page_size: int) -> Page[store.DeadLetter]:
        async with self._pool.acquire() as connection:
            rows = await store.dead_letters(connection, after, page_size + 1)
        return Page.from_rows(rows, page_size)

    async def retry_dead_letter(self, event_id: uuid.UUID) -> store.DeadLetter:
        """Makes a dead event due again with fresh attempts (after the cause is fixed)."""
        async with self._pool.acquire() as connection, connection.transaction():
            revived = await store.revive_dead_letter(connection, event_id)
            if revived is None:
                raise DeadLetterNotFound(event_id)
            if revived.kind in VIDEO_ROOM_KINDS:
                await store.set_video_room(connection, revived.booking_id, VideoRoomState.PENDING)
        log.info("dead_letter_retried", event_id=str(event_id), kind=revived.kind)
        return revived


@dataclass
class Delivered:
    """What one outbox pass delivered, written back in one statement at its end."""

    event_ids: list[uuid.UUID] = field(default_factory=list)
    # The rooms' new states, by booking: the last event of a booking decides.
    rooms: dict[uuid.UUID, tuple[VideoRoomState, str | None]] = field(default_factory=dict)
    synced: list[tuple[uuid.UUID, str, VideoRoomState]] = field(default_factory=list)


def _attempt(action: Callable[[], T]) -> tuple[T | None, DomainError | None]:
    """Runs an availability rule: (its value, None), or (None, the domain error it refused with)."""
    try:
        return _check(action), None
    except DomainError as error:
        return None, error


def _check(action: Callable[[], T]) -> T:
    """Runs an availability rule, turning its errors into domain errors."""
    try:
        return action()
    except availability.AvailabilityError as error:
        raise domain_error(error) from None
