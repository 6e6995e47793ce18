"""The catalogue: therapists, their schedules and session types, the free slots, and the rules a
booking is checked against (read through a cache, rules_cache.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from booking_service import availability
from booking_service.domain import (
    DateOverride,
    RequestIdReused,
    SessionType,
    SessionTypeNotFound,
    Therapist,
    TherapistNotFound,
    WeeklyWindowMinutes,
    domain_error,
    schedule_of,
)
from booking_service.rules_cache import BookingRules, RulesCache
from booking_service.store import catalogue as store
from service_kit.connection import Connection
from service_kit.database import Database, in_transaction

log = structlog.get_logger()
T = TypeVar("T")

# The most slots one answer of ListAvailableSlots holds.
MAX_SLOTS = 1000


def checked(rule: Callable[[], T]) -> T:
    """Runs an availability rule, turning its errors into domain errors."""
    try:
        return rule()
    except availability.AvailabilityError as error:
        raise domain_error(error) from None


class Catalogue:
    def __init__(self, database: Database, clock: Callable[[], datetime], rules_cache_size: int) -> None:
        self._database = database
        self._clock = clock
        self._rules = RulesCache(rules_cache_size)

    @property
    def _pool(self) -> Any:
        return self._database.pool

    # --- the rules a booking is checked against ---

    async def rules(self, therapist_id: uuid.UUID, session_type_id: uuid.UUID) -> BookingRules:
        """The rules' inputs from memory when they are there, from the database otherwise. Memory
        is never trusted alone: the protocol checks their schedule_version against the database's
        before any credit moves, and again in the locked step (booking.look_up, booking.decide)."""
        rules = self._rules.get(therapist_id, session_type_id)
        if rules is None:
            async with self._pool.acquire() as connection:
                rules = await self._read_rules(connection, therapist_id, session_type_id)
            self._rules.put(rules)
        return rules

    def forget(self, therapist_id: uuid.UUID) -> None:
        """The database holds a newer schedule: read it again next time."""
        self._rules.forget(therapist_id)

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

    async def available_slots(
        self, therapist_id: uuid.UUID, session_type_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[Therapist, list[availability.Interval]]:
        async with self._pool.acquire() as connection:
            rules = await self._read_rules(connection, therapist_id, session_type_id)
            closed = rules.closed()
            if closed is not None:
                raise closed  # no slot of an archived therapist or a retired type is bookable
            schedule, duration = rules.schedule, rules.session_type.duration
            busy = await store.busy_ranges(connection, [(therapist_id, *busy_window(schedule, duration, start, end))])
        step = rules.session_type.start_step
        return rules.therapist, free_slots(schedule, duration, start, end, self._clock(), busy[therapist_id], step)

    # --- therapists and schedules (admin, or the therapist) ---

    async def create_therapist(self, request_id: str, therapist: Therapist) -> Therapist:
        checked(lambda: availability.zone(therapist.time_zone))
        async with self._pool.acquire() as connection:
            created = await store.insert_therapist(connection, request_id, therapist)
            if created is not None:
                log.info("therapist_created", therapist_id=str(created.therapist_id))
                return created
            existing = await store.therapist_by_request(connection, request_id)
        assert existing is not None
        asked = replace(
            existing,
            therapist_id=therapist.therapist_id,
            created_at=therapist.created_at,
            updated_at=therapist.updated_at,
            archived_at=therapist.archived_at,
        )
        if asked != therapist:
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
            checked(lambda: availability.zone(changes["time_zone"]))

        async def work(connection: Connection) -> Therapist:
            current = await self._therapist_for_update(connection, therapist_id)
            return await store.update_therapist(connection, replace(current, **changes))

        return await in_transaction(self._pool, work)

    async def set_weekly_schedule(
        self, therapist_id: uuid.UUID, windows: list[WeeklyWindowMinutes]
    ) -> list[WeeklyWindowMinutes]:
        async def work(connection: Connection) -> list[WeeklyWindowMinutes]:
            therapist = await self._therapist_for_update(connection, therapist_id)
            checked(lambda: schedule_of(therapist, windows, []).validate())
            await store.replace_weekly_windows(connection, therapist_id, windows)
            return await store.weekly_windows(connection, therapist_id)

        return await in_transaction(self._pool, work)

    async def set_date_override(self, therapist_id: uuid.UUID, override: DateOverride) -> DateOverride:
        async def work(connection: Connection) -> DateOverride:
            therapist = await self._therapist_for_update(connection, therapist_id)
            checked(lambda: schedule_of(therapist, [], [override]).validate())
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

    async def set_archived(self, therapist_id: uuid.UUID, *, archived: bool) -> Therapist:
        """Archives (or restores) the therapist. The update moves the schedule_version on, so every
        replica reads the rules again and refuses (or takes) the next booking."""
        async with self._pool.acquire() as connection:
            therapist = await store.set_archived(connection, therapist_id, archived=archived)
        if therapist is None:
            raise TherapistNotFound(therapist_id)
        log.info("therapist_archived" if archived else "therapist_unarchived", therapist_id=str(therapist_id))
        return therapist

    async def _therapist_for_update(self, connection: Connection, therapist_id: uuid.UUID) -> Therapist:
        therapist = await store.fetch_therapist(connection, therapist_id, for_update=True)
        if therapist is None:
            raise TherapistNotFound(therapist_id)
        return therapist

    # --- session types ---

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

    async def session_types(self, therapist_id: uuid.UUID, *, include_retired: bool = False) -> list[SessionType]:
        async with self._pool.acquire() as connection:
            if await store.fetch_therapist(connection, therapist_id) is None:
                raise TherapistNotFound(therapist_id)
            return await store.session_types(connection, therapist_id, include_retired=include_retired)

    async def update_session_type(
        self, therapist_id: uuid.UUID, session_type_id: uuid.UUID, changes: dict[str, Any]
    ) -> SessionType:
        """Changes the name, the price or the refund policy. The therapist's row is locked first
        (the order every catalogue change takes); the trigger then moves its schedule_version on."""

        async def work(connection: Connection) -> SessionType:
            current = await self._session_type_for_update(connection, therapist_id, session_type_id)
            return await store.update_session_type(connection, replace(current, **changes))

        updated = await in_transaction(self._pool, work)
        log.info("session_type_updated", session_type_id=str(session_type_id), fields=sorted(changes))
        return updated

    async def retire_session_type(self, therapist_id: uuid.UUID, session_type_id: uuid.UUID) -> SessionType:
        async def work(connection: Connection) -> SessionType:
            current = await self._session_type_for_update(connection, therapist_id, session_type_id)
            if current.retired_at is not None:
                return current  # retiring twice changes nothing (and moves no version on)
            return await store.retire_session_type(connection, session_type_id)

        retired = await in_transaction(self._pool, work)
        log.info("session_type_retired", session_type_id=str(session_type_id))
        return retired

    async def _session_type_for_update(
        self, connection: Connection, therapist_id: uuid.UUID, session_type_id: uuid.UUID
    ) -> SessionType:
        await self._therapist_for_update(connection, therapist_id)
        found = await store.fetch_session_type(connection, therapist_id, session_type_id)
        if found is None:
            raise SessionTypeNotFound(session_type_id)
        return found


def busy_window(
    schedule: availability.Schedule, duration: timedelta, start: datetime, end: datetime
) -> tuple[datetime, datetime]:
    """Where the sessions that can touch a slot starting in [start, end) lie: a slot's blocked
    range reaches buffer_before before its start and its duration and buffer_after beyond; so
    does an existing session's, the other way."""
    margin = schedule.buffer_before + schedule.buffer_after + duration
    return start - margin, end + margin


def free_slots(
    schedule: availability.Schedule,
    duration: timedelta,
    start: datetime,
    end: datetime,
    now: datetime,
    busy: list[tuple[datetime, datetime]],
    step: timedelta,
    max_slots: int = MAX_SLOTS,
) -> list[availability.Interval]:
    """The free slots of one therapist on the grid of `step`: ListAvailableSlots and
    SearchAvailability both answer with this, given the busy ranges of `busy_window`
    (store.busy_ranges)."""
    busy_intervals = [availability.Interval(s, e) for s, e in busy]
    return checked(
        lambda: availability.free_slots(schedule, duration, start, end, now, busy_intervals, step, max_slots=max_slots)
    )
