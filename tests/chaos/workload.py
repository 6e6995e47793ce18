"""The clients of a chaos run, and what each of them was told.

Every client is an asyncio task with its own client id, credits and seeded `random.Random`. It
grants itself credits, books (often on a few hot, overlapping slots, so that clients collide),
cancels and reschedules its own bookings, one request at a time, as a real client would: a call
that fails with UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED is retried with the SAME request id,
with bounded backoff, a bounded number of times (the client's patience); after that the client
gives up and the outcome is unknown. Every answer is recorded (`ClientRecord`), so that the
checks afterwards can hold the system to what it acknowledged, and can insist that what it never
answered still ended consistent.
"""

from __future__ import annotations

import asyncio
import enum
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from service_kit.errors import error_details
from tests.support.world import ts

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

T = TypeVar("T")

# A client retries these with the same request id: the call may or may not have happened.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# ABORTED with these reasons is no answer either: retry with the same request id (docs/http-api.md).
RETRYABLE_REASONS = frozenset({"CALENDAR_BUSY", "REQUEST_IN_PROGRESS"})
# The server failed without saying what it did: the outcome is unknown, and retrying blindly
# is not what a careful client does with an error it does not understand.
UNKNOWN_OUTCOME_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CALL_TIMEOUT_S = 4.0
RETRY_BASE_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 1.5
# Attempts per request: most clients are patient (about 7 s of retries), a few give up at once
# and walk away, leaving whatever their call started for the system to finish or undo.
PATIENT_ATTEMPTS = 8
IMPATIENT_ATTEMPTS = 2
IMPATIENT_SHARE = 0.25
THINK_TIME_S = (0.15, 0.6)

SESSION_MINUTES = 50
CREDIT_COST = 10
INITIAL_CREDITS = 30
GRANT_AMOUNTS = (10, 20, 30)
# Hot slots: 50-minute sessions starting 0, 30 and 60 minutes past these hours on the first
# day, so that 0 and 60 fit together and 30 collides with both.
HOT_HOURS = (10, 14)
HOT_OFFSETS_MIN = (0, 30, 60)
HOT_SHARE = 0.5
# Everything at least two days ahead: a client's cancellation is then always refunded in full
# (the free-cancellation window is 24 h), so every acknowledged cancellation must refund.
FIRST_DAY_AHEAD = 2
SPREAD_DAYS = 40
# Operation weights when the client has an active booking; without one it books or grants.
WEIGHTS = {"book": 40, "series": 10, "grant": 15, "cancel": 20, "reschedule": 20}
# Weekly series: 2 or 3 occurrences, all or nothing but for a share that books what is free; their
# first days leave room for every occurrence before the prober's days.
SERIES_OCCURRENCES = (2, 3)
SERIES_SKIP_SHARE = 0.25
SERIES_LAST_FIRST_DAY = SPREAD_DAYS - 7 * (max(SERIES_OCCURRENCES) - 1) - 1


class Operation(enum.StrEnum):
    GRANT = "grant"
    BOOK = "book"
    SERIES = "series"
    CANCEL = "cancel"
    RESCHEDULE = "reschedule"


@dataclass(frozen=True)
class Answer(Generic[T]):
    """How one request ended for the client: acknowledged, refused (with its reason), or
    unknown (the client gave up, or the server failed without saying what it did)."""

    response: T | None = None
    refusal: str | None = None
    unknown: str | None = None


class CancelState(enum.Enum):
    NONE = "none"
    ACKNOWLEDGED = "acknowledged"
    UNKNOWN = "unknown"


@dataclass
class BookingRecord:
    """A booking the system acknowledged, and what the client was told about it since."""

    booking_id: str
    request_id: str
    client_id: str
    therapist_id: str
    credit_cost: int
    start: datetime | None  # None: a reschedule of it ended with an unknown outcome
    cancel: CancelState = CancelState.NONE
    refunded_credits: int = 0  # as the acknowledged cancellation said


@dataclass
class SeriesRecord:
    """A series request and what its client was told: "booked <ids>" (by index, comma-separated),
    "refused <reason>", or None when the outcome is unknown."""

    request_id: str
    occurrences: int
    skip_unavailable: bool
    told: str | None


@dataclass
class ClientRecord:
    client_id: str
    attempts_per_request: int
    grants_acknowledged: dict[str, int] = field(default_factory=dict)  # request id -> amount
    grants_unknown: dict[str, int] = field(default_factory=dict)
    grants_refused: dict[str, str] = field(default_factory=dict)  # request id -> reason
    bookings: dict[str, BookingRecord] = field(default_factory=dict)  # acknowledged, by booking id
    booking_requests_unknown: dict[str, str] = field(default_factory=dict)  # request id -> last error
    booking_requests_refused: dict[str, str] = field(default_factory=dict)  # request id -> reason
    series: dict[str, SeriesRecord] = field(default_factory=dict)  # by request id
    # Every booking or series request answered (acknowledged or refused), to ask again after the run.
    answered_requests: dict[str, booking_pb2.CreateBookingRequest | booking_pb2.CreateBookingSeriesRequest] = field(
        default_factory=dict
    )

    def answer_to(self, request_id: str) -> str:
        """What the client was told of an answered booking request: "booked <id>" or "refused <reason>"."""
        if request_id in self.series:
            return str(self.series[request_id].told)
        if request_id in self.booking_requests_refused:
            return f"refused {self.booking_requests_refused[request_id]}"
        (booking_id,) = [b.booking_id for b in self.bookings.values() if b.request_id == request_id]
        return f"booked {booking_id}"

    def active_bookings(self) -> list[BookingRecord]:
        return [b for b in self.bookings.values() if b.cancel is CancelState.NONE]


@dataclass
class Tally:
    """Operations tried and how they ended, for the progress line and the summary."""

    tried: Counter[str] = field(default_factory=Counter)
    acknowledged: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    unknown: Counter[str] = field(default_factory=Counter)  # by the last error seen
    refused_by_operation: Counter[str] = field(default_factory=Counter)
    unknown_by_operation: Counter[str] = field(default_factory=Counter)
    retried_requests: int = 0
    retry_attempts: int = 0

    @property
    def total_tried(self) -> int:
        return sum(self.tried.values())

    def line(self) -> str:
        return (
            f"ops {self.total_tried} (ack {sum(self.acknowledged.values())}, refused {sum(self.refused.values())}, "
            f"unknown {sum(self.unknown.values())}, retried {self.retried_requests})"
        )


@dataclass(frozen=True)
class Therapist:
    therapist_id: str
    session_type_id: str


@dataclass(frozen=True)
class Calendar:
    """Where clients book: a few hot slots that collide, and many spread ones that rarely do."""

    therapists: tuple[Therapist, ...]
    first_day: datetime  # midnight UTC, FIRST_DAY_AHEAD days from the run's start

    @classmethod
    def starting_now(cls, therapists: tuple[Therapist, ...]) -> Calendar:
        today = datetime.now(UTC).date()
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        return cls(therapists, midnight + timedelta(days=FIRST_DAY_AHEAD))

    def start_for(self, therapist: Therapist, rng: random.Random) -> datetime:
        if rng.random() < HOT_SHARE:
            return self.first_day + timedelta(hours=rng.choice(HOT_HOURS), minutes=rng.choice(HOT_OFFSETS_MIN))
        return self.first_day + timedelta(days=rng.randrange(SPREAD_DAYS), hours=rng.randrange(24))

    def slot(self, rng: random.Random) -> tuple[Therapist, datetime]:
        therapist = rng.choice(self.therapists)
        return therapist, self.start_for(therapist, rng)

    def series_slot(self, rng: random.Random) -> tuple[Therapist, datetime]:
        """A series' first start: sometimes a hot slot, else a spread one early enough that every
        occurrence stays within the clients' days."""
        therapist = rng.choice(self.therapists)
        if rng.random() < HOT_SHARE:
            return therapist, self.start_for(therapist, rng)
        return therapist, self.first_day + timedelta(days=rng.randrange(SERIES_LAST_FIRST_DAY), hours=rng.randrange(24))

    def probe_slot(self, index: int) -> tuple[Therapist, datetime]:
        """The prober's own slot, past every day the clients book: the probe must pass the
        availability pre-check and reserve, or it cannot reach the crash point under test."""
        therapist = self.therapists[index % len(self.therapists)]
        return therapist, self.first_day + timedelta(days=SPREAD_DAYS + index, hours=12)

    def therapist(self, therapist_id: str) -> Therapist:
        return next(t for t in self.therapists if t.therapist_id == therapist_id)


class Client:
    """One client: a loop of random operations, each retried as a real client would."""

    def __init__(
        self,
        record: ClientRecord,
        rng: random.Random,
        booking: BookingServiceAsyncStub,
        credit: CreditServiceAsyncStub,
        calendar: Calendar,
        tally: Tally,
    ) -> None:
        self.record = record
        self._rng = rng
        # Backoff jitter from its own generator, so that the choices of operations depend on the
        # seed and on the answers only, not on how many retries the faults happened to cause.
        self._jitter = random.Random(rng.random())
        self._booking = booking
        self._credit = credit
        self._calendar = calendar
        self._tally = tally

    async def run(self, keep_going: Callable[[], bool]) -> None:
        while keep_going():
            await self.step()
            await asyncio.sleep(self._rng.uniform(*THINK_TIME_S))

    async def step(self) -> None:
        active = self.record.active_bookings()
        weights = {k: w for k, w in WEIGHTS.items() if active or k in ("book", "grant")}
        operation = self._rng.choices(list(weights), weights=list(weights.values()))[0]
        if operation == "book":
            therapist, start = self._calendar.slot(self._rng)
            await self.book(therapist, start)
        elif operation == "series":
            therapist, start = self._calendar.series_slot(self._rng)
            await self.book_series(therapist, start)
        elif operation == "grant":
            await self.grant(self._rng.choice(GRANT_AMOUNTS))
        elif operation == "cancel":
            await self.cancel(self._rng.choice(active))
        else:
            booking = self._rng.choice(active)
            await self.reschedule(
                booking, self._calendar.start_for(self._calendar.therapist(booking.therapist_id), self._rng)
            )

    async def _call(self, operation: Operation, invoke: Callable[[], Awaitable[T]]) -> Answer[T]:
        """Calls until answered, retrying the same request on a transient failure."""
        self._tally.tried[operation] += 1
        last_error = ""
        for attempt in range(self.record.attempts_per_request):
            if attempt:
                self._tally.retry_attempts += 1
                if attempt == 1:
                    self._tally.retried_requests += 1
                delay_s = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
                await asyncio.sleep(delay_s * self._jitter.uniform(0.5, 1.0))
            try:
                response = await invoke()
            except grpc.aio.AioRpcError as error:
                details = error_details(error)
                label = details.code.name if details.reason is None else f"{details.code.name}/{details.reason}"
                if details.code in RETRYABLE_CODES or (
                    details.code == grpc.StatusCode.ABORTED and details.reason in RETRYABLE_REASONS
                ):
                    last_error = label
                    continue
                if details.code in UNKNOWN_OUTCOME_CODES:
                    return self._unknown(operation, label)
                self._tally.refused[label] += 1
                self._tally.refused_by_operation[operation] += 1
                return Answer(refusal=details.reason or details.code.name)
            self._tally.acknowledged[operation] += 1
            return Answer(response=response)
        return self._unknown(operation, f"gave up after {self.record.attempts_per_request} tries: {last_error}")

    def _unknown(self, operation: Operation, label: str) -> Answer[T]:
        self._tally.unknown[label.split(": ", 1)[-1]] += 1
        self._tally.unknown_by_operation[operation] += 1
        return Answer(unknown=label)

    async def grant(self, amount: int) -> None:
        request = credit_pb2.GrantCreditsRequest(
            request_id=str(uuid.uuid4()),
            owner_id=self.record.client_id,
            amount=amount,
            kind=credit_pb2.GRANT_KIND_PURCHASE,
        )
        answer = await self._call(Operation.GRANT, lambda: self._credit.GrantCredits(request, timeout=CALL_TIMEOUT_S))
        if answer.response is not None:
            self.record.grants_acknowledged[request.request_id] = amount
        elif answer.refusal is not None:
            self.record.grants_refused[request.request_id] = answer.refusal
        else:
            self.record.grants_unknown[request.request_id] = amount

    async def book(self, therapist: Therapist, start: datetime, *, via: BookingServiceAsyncStub | None = None) -> None:
        stub = via or self._booking
        request = booking_pb2.CreateBookingRequest(
            request_id=str(uuid.uuid4()),
            client_id=self.record.client_id,
            therapist_id=therapist.therapist_id,
            session_type_id=therapist.session_type_id,
            start_time=ts(start),
        )
        answer = await self._call(Operation.BOOK, lambda: stub.CreateBooking(request, timeout=CALL_TIMEOUT_S))
        if answer.response is not None:
            booking = answer.response.booking
            self.record.bookings[booking.booking_id] = BookingRecord(
                booking_id=booking.booking_id,
                request_id=request.request_id,
                client_id=self.record.client_id,
                therapist_id=therapist.therapist_id,
                credit_cost=booking.credit_cost,
                start=start,
            )
        elif answer.refusal is not None:
            self.record.booking_requests_refused[request.request_id] = answer.refusal
        else:
            assert answer.unknown is not None
            self.record.booking_requests_unknown[request.request_id] = answer.unknown
        if answer.unknown is None:
            self.record.answered_requests[request.request_id] = request

    async def book_series(self, therapist: Therapist, start: datetime) -> None:
        request = booking_pb2.CreateBookingSeriesRequest(
            request_id=str(uuid.uuid4()),
            client_id=self.record.client_id,
            therapist_id=therapist.therapist_id,
            session_type_id=therapist.session_type_id,
            start_time=ts(start),
            occurrences=self._rng.choice(SERIES_OCCURRENCES),
            skip_unavailable=self._rng.random() < SERIES_SKIP_SHARE,
        )
        answer = await self._call(
            Operation.SERIES, lambda: self._booking.CreateBookingSeries(request, timeout=CALL_TIMEOUT_S)
        )
        told = None
        if answer.response is not None:
            told = _series_told(answer.response)
            for booking in answer.response.bookings:
                self.record.bookings[booking.booking_id] = BookingRecord(
                    booking_id=booking.booking_id,
                    request_id=request.request_id,
                    client_id=self.record.client_id,
                    therapist_id=therapist.therapist_id,
                    credit_cost=booking.credit_cost,
                    start=booking.start_time.ToDatetime(tzinfo=UTC),
                )
        elif answer.refusal is not None:
            told = f"refused {answer.refusal}"
        self.record.series[request.request_id] = SeriesRecord(
            request.request_id, request.occurrences, request.skip_unavailable, told
        )
        if told is not None:
            self.record.answered_requests[request.request_id] = request

    async def ask_again(
        self, request: booking_pb2.CreateBookingRequest | booking_pb2.CreateBookingSeriesRequest
    ) -> str:
        """The answer to a booking or series request sent once more, in the form of
        `ClientRecord.answer_to` (or "unknown ..." when it cannot be had)."""
        if isinstance(request, booking_pb2.CreateBookingSeriesRequest):
            series = await self._call(
                Operation.SERIES, lambda: self._booking.CreateBookingSeries(request, timeout=CALL_TIMEOUT_S)
            )
            if series.response is not None:
                return _series_told(series.response)
            return f"refused {series.refusal}" if series.refusal is not None else f"unknown {series.unknown}"
        answer = await self._call(Operation.BOOK, lambda: self._booking.CreateBooking(request, timeout=CALL_TIMEOUT_S))
        if answer.response is not None:
            return f"booked {answer.response.booking.booking_id}"
        return f"refused {answer.refusal}" if answer.refusal is not None else f"unknown {answer.unknown}"

    async def cancel(self, booking: BookingRecord) -> None:
        # CancelBooking has no request id: cancelling twice returns the first cancellation.
        request = booking_pb2.CancelBookingRequest(
            booking_id=booking.booking_id,
            actor=booking_pb2.CANCELLATION_ACTOR_CLIENT,
            reason=booking_pb2.CANCELLATION_REASON_NO_LONGER_NEEDED,
        )
        answer = await self._call(
            Operation.CANCEL, lambda: self._booking.CancelBooking(request, timeout=CALL_TIMEOUT_S)
        )
        if answer.response is not None:
            booking.cancel = CancelState.ACKNOWLEDGED
            booking.refunded_credits = answer.response.booking.cancellation.refunded_credits
        elif answer.unknown is not None:
            booking.cancel = CancelState.UNKNOWN

    async def reschedule(self, booking: BookingRecord, start: datetime) -> None:
        request = booking_pb2.RescheduleBookingRequest(
            booking_id=booking.booking_id, request_id=str(uuid.uuid4()), start_time=ts(start)
        )
        answer = await self._call(
            Operation.RESCHEDULE, lambda: self._booking.RescheduleBooking(request, timeout=CALL_TIMEOUT_S)
        )
        if answer.response is not None:
            booking.start = start
        elif answer.unknown is not None:
            booking.start = None  # moved or not: nobody knows


def attempts_for(rng: random.Random) -> int:
    return IMPATIENT_ATTEMPTS if rng.random() < IMPATIENT_SHARE else PATIENT_ATTEMPTS


def _series_told(response: booking_pb2.CreateBookingSeriesResponse) -> str:
    return "booked " + ",".join(booking.booking_id for booking in response.bookings)
