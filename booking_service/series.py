"""CreateBookingSeries: a weekly series, from the request to its answer (docs/design.md, "A
weekly series"). The steps of a single booking (booking_flow.py), for every occurrence at once:

    rules     each occurrence's start: the first start's local time in the therapist's zone,
              every week or every other week (18:00 stays 18:00 across a DST change); the rules
              refuse an occurrence or say what it takes from the calendar;
    look up   the series' answer, if it has one; else the cheap pre-check of every occurrence
              and the schedule's version, read-only;
    reserve   every occurrence's credits in one BatchReserveCredits, each under the occurrence's
              booking id (derived from the series key and its index): idempotent, so every copy
              of the request shares the same holds;
    decide    the locked step decides the whole series under the therapist's lock, in one
              transaction, as one answer for the series key: every occurrence placed, or none
              (all or nothing) with the refusal naming each refused occurrence; with
              skip_unavailable, the free ones placed and the others reported;
    pay       every placed occurrence's hold committed; every other hold this call made released.

An occurrence refused before the lock (by the rules, the pre-check or the credit service) goes to
the locked step as refused (no range), which records the series' refusal naming it, or skips it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

import structlog

from booking_service import availability, events
from booking_service.booking_flow import RULES_ATTEMPTS, FlowParts, new_booking
from booking_service.catalogue import checked
from booking_service.decisions import Answer, Answered, Occurrence, PlaceSeries, Refusal, SeriesDecided, Stale
from booking_service.domain import CalendarBusy, Refused, RequestIdReused, SlotUnavailable, domain_error
from booking_service.holds import HoldRequest, HoldReused
from booking_service.practice import BookedSeries, SkippedOccurrence
from booking_service.requests import NewSeries, hold_reference
from booking_service.rules_cache import BookingRules
from booking_service.store.calendar import OCCURRENCE_KEY_PREFIX
from service_kit.errors import DomainError

log = structlog.get_logger()


@dataclass(frozen=True)
class Planned:
    """One occurrence as the rules see it: its start, what it takes from the calendar (None: it
    cannot be placed), and its refusal if it is refused already."""

    index: int
    start: datetime
    local: str  # the start in the therapist's zone, as messages name it
    blocked: availability.Interval | None
    refusal: Refusal | None


class SeriesFlow:
    """The steps of BookingFlow, with its parts, for every occurrence at once."""

    def __init__(self, parts: FlowParts) -> None:
        self._parts = parts

    async def create(self, request: NewSeries) -> BookedSeries:
        held: set[int] = set()  # the occurrences whose holds this call made (kept across tries)
        cost: int | None = None  # the price the holds were made at (a later price is not this series')
        for _ in range(RULES_ATTEMPTS):
            rules = await self._parts.catalogue.rules(request.therapist_id, request.session_type_id)
            planned = plan(rules, request, self._parts.clock())
            refused = {p.index: p.refusal for p in planned if p.refusal is not None}
            answered, version, taken = await self._look_up(request, planned)
            if not answered:
                if version != rules.schedule_version:
                    self._parts.catalogue.forget(request.therapist_id)  # the schedule changed: check it again
                    continue
                refused |= {
                    p.index: _occurrence_refusal(p, SlotUnavailable(p.start)) for p in planned if p.index in taken
                }
                if len(refused) < len(planned) and (request.skip_unavailable or not refused):
                    cost = rules.session_type.credit_cost if cost is None else cost
                    to_hold = [p for p in planned if p.index not in refused and p.index not in held]
                    refused |= await self._reserve(request, cost, to_hold, held)
                self._parts.crash_if("after_reserve")
            price = rules.session_type.credit_cost if cost is None else cost
            decision = await self._parts.calendar.decide(self._proposal(request, rules, price, planned, refused))
            if isinstance(decision, Stale):
                self._parts.catalogue.forget(request.therapist_id)
                continue
            if isinstance(decision, Answered):  # the exclusion constraint refused an occurrence
                decision = SeriesDecided(False, decision.answer, (), {})
            assert isinstance(decision, SeriesDecided), decision
            return await self._answer(request, planned, decision, held)
        raise CalendarBusy("the therapist's schedule kept changing during this series; retry with the same request_id")

    async def _look_up(self, request: NewSeries, planned: Sequence[Planned]) -> tuple[bool, int | None, set[int]]:
        """Whether the series has its answer (its key's, or an occurrence's session); else the
        schedule's version and the occurrences the pre-check finds taken."""
        series, *occurrences = await asyncio.gather(
            self._parts.calendar.look_up(request.key, request.therapist_id, None),
            *(
                self._parts.calendar.look_up(
                    request.occurrence_id(p.index),
                    request.therapist_id,
                    None if p.blocked is None else (p.blocked.start, p.blocked.end),
                )
                for p in planned
            ),
        )
        if isinstance(series, Answer) or any(isinstance(found, Answer) for found in occurrences):
            return True, None, set()
        taken = {p.index for p, found in zip(planned, occurrences, strict=True) if getattr(found, "slot_taken", False)}
        return False, series.schedule_version, taken

    async def _reserve(
        self, request: NewSeries, cost: int, planned: Sequence[Planned], held: set[int]
    ) -> dict[int, Refusal]:
        """Holds every occurrence's credits in one call; the occurrences the credit service refused.
        When it cannot be reached the error goes to the caller: a retry continues with the same
        holds, or the reconciler gives the series up."""
        holds = [
            HoldRequest(
                request.occurrence_id(p.index),
                request.client_id,
                cost,
                hold_reference(request.therapist_id, request.occurrence_id(p.index), request.key),
            )
            for p in planned
        ]
        outcomes = await self._parts.credits.reserve_all(holds)
        refused: dict[int, Refusal] = {}
        for p, outcome in zip(planned, outcomes, strict=True):
            if outcome is None:
                held.add(p.index)
            elif isinstance(outcome, HoldReused):
                raise RequestIdReused(request.request_id)
            else:
                refused[p.index] = _occurrence_refusal(p, outcome)
        return refused

    def _proposal(  # the series, its rules and price, and each occurrence's verdict
        self,
        request: NewSeries,
        rules: BookingRules,
        cost: int,
        planned: Sequence[Planned],
        refused: Mapping[int, Refusal],
    ) -> PlaceSeries:
        now = self._parts.clock()
        occurrences = []
        for p in planned:
            booking_id = request.occurrence_id(p.index)
            booking = new_booking(
                booking_id, request.request_id, request.client_id, rules, p.start, now, cost, request.key, p.index
            )
            occurrences.append(
                Occurrence(
                    booking=booking,
                    blocked=None if p.index in refused else p.blocked,
                    event=events.booking_event(events.CONFIRMED, booking, now),
                    video_room_name=events.video_room_name(booking_id) if self._parts.video_rooms else None,
                    refusal=refused.get(p.index) or _occurrence_refusal(p, SlotUnavailable(p.start)),
                )
            )
        return PlaceSeries(
            request.key,
            request.fingerprint,
            request.therapist_id,
            rules.schedule_version,
            request.skip_unavailable,
            tuple(occurrences),
        )

    async def _answer(
        self, request: NewSeries, planned: Sequence[Planned], decision: SeriesDecided, held: set[int]
    ) -> BookedSeries:
        """Pays for what this call placed, releases every hold it made that pays for nothing, and
        gives the series' answer."""
        bookings = decision.bookings
        if decision.placed:
            log.info("series_confirmed", series_id=str(request.key), occurrences=len(bookings))
            self._parts.crash_if("after_booking_commit")
            bookings = tuple(await asyncio.gather(*(self._parts.payments.pay(booking) for booking in bookings)))
        placed = {booking.series_index for booking in bookings}
        await asyncio.gather(
            *(self._parts.payments.release(request.occurrence_id(index)) for index in sorted(held - placed))
        )
        answer = decision.answer
        if answer.fingerprint is not None and answer.fingerprint != request.fingerprint:
            raise RequestIdReused(request.request_id)
        if answer.refusal is not None:
            raise answer.refusal.error()
        starts = {p.index: p.start for p in planned}
        skipped = tuple(
            SkippedOccurrence(index, starts[index], reason)
            for index, reason in sorted(decision.skipped.items())
            if index in starts
        )
        return BookedSeries(request.key, bookings, skipped)


def plan(rules: BookingRules, request: NewSeries, now: datetime) -> list[Planned]:
    """Every occurrence's start (the first start's wall-clock time in the therapist's zone, every
    `interval_weeks` weeks) and the rules' verdict on it. A local time that does not exist on an
    occurrence's date (a DST gap) refuses that occurrence; one that occurs twice is taken as the
    first start was (the earlier or the later)."""
    schedule, duration, step = rules.schedule, rules.session_type.duration, rules.session_type.start_step
    closed = rules.closed()  # an archived therapist or a retired session type refuses every occurrence
    zone_name = rules.therapist.time_zone
    first = request.first_start.astimezone(availability.zone(zone_name))
    disambiguation = availability.Disambiguation.LATER if first.fold else availability.Disambiguation.EARLIER
    wall = first.replace(tzinfo=None, fold=0)
    planned = []
    for index in range(request.occurrences):
        local = wall + timedelta(weeks=index * request.interval_weeks)
        try:
            start = availability.resolve_local(local, zone_name, disambiguation, field="first_start")
        except availability.NonexistentLocalTime as gap:
            shown = local.isoformat()
            planned.append(Planned(index, request.first_start, shown, None, _refusal(index, shown, gap)))
            continue
        shown = availability.local_rendering(start, zone_name)
        blocked = checked(partial(availability.session_blocked_interval, schedule, start, duration))
        try:
            if closed is not None:
                raise closed
            checked(partial(availability.check_bookable, schedule, start, duration, now, step=step))
        except Refused as refusal:
            planned.append(Planned(index, start, shown, blocked, _refusal(index, shown, refusal)))
            continue
        planned.append(Planned(index, start, shown, blocked, None))
    return planned


def _occurrence_refusal(planned: Planned, error: DomainError) -> Refusal:
    return _refusal(planned.index, planned.local, error)


def _refusal(index: int, when: str, error: DomainError | availability.AvailabilityError) -> Refusal:
    """An occurrence's refusal: its reason, a message naming it, and metadata naming it."""
    if isinstance(error, availability.AvailabilityError):
        error = domain_error(error)
    return Refusal(
        error.reason, f"occurrence {index} ({when}): {error.message}", {f"{OCCURRENCE_KEY_PREFIX}{index}": error.reason}
    )
