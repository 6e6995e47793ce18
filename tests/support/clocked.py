"""The booking service's use cases in the test's own process, on a database of their own and the
session's real credit service, with a clock the test moves (service.py takes a `clock`): for
time-based behaviour (outcomes, the sweeper, reminders) without sleeps. The workers' passes
(`sweep_once`, `deliver_once`, ...) are called by the test, when it wants them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from booking_service.config import BookingSettings
from booking_service.credits import CreditClient
from booking_service.domain import SessionType, Therapist, WeeklyWindowMinutes
from booking_service.requests import NewBooking
from booking_service.server import service_token
from booking_service.service import BookingService
from booking_service.store import SCHEMA
from credit.v1 import credit_pb2
from service_kit import migrations
from service_kit.database import Database, DatabaseState
from tests.support.stack import fresh_database, server_environment

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

ALL_DAY = [WeeklyWindowMinutes(weekday, 0, 1440) for weekday in range(1, 8)]


@dataclass
class Clock:
    """The service's clock: it says `now` until the test moves it."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def move_to(self, instant: datetime) -> None:
        assert instant >= self.now, "the clock moves forward only"
        self.now = instant


@dataclass
class SentNotification:
    event_id: str
    event_type: str
    body: bytes


@dataclass
class Recorder:
    """A notifier that keeps what it was given (the real sinks are tested in test_side_effects.py)."""

    sent: list[SentNotification] = field(default_factory=list)

    async def send(self, event_id: str, event_type: str, body: bytes) -> None:
        self.sent.append(SentNotification(event_id, event_type, body))

    async def close(self) -> None:
        return None

    def of_type(self, event_type: str) -> list[SentNotification]:
        return [n for n in self.sent if n.event_type == event_type]


@dataclass
class Clocked:
    service: BookingService
    clock: Clock
    notifier: Recorder
    database: Database


@asynccontextmanager
async def clocked_service(postgres_server_url: str, credit_address: str, **settings: str) -> AsyncIterator[Clocked]:
    """A BookingService on a fresh database (migrated here), paying through the real credit
    service, with a clock of the test's and a recording notifier. `settings`: BOOKING_* values."""
    url = await fresh_database(postgres_server_url, "booking_clocked")
    env: Mapping[str, str] = server_environment(
        "BOOKING", url, BOOKING_CREDIT_TARGET=credit_address, BOOKING_VIDEO_PROVIDER="none", **settings
    )
    config = BookingSettings.from_environment(env)
    database = Database(config.server, SCHEMA, migrations.load("booking_service"))
    assert await database.check() is DatabaseState.READY, database.detail
    credits = CreditClient(credit_address, call_timeout_s=config.credit_call_timeout_s, token=service_token(config))
    clock, notifier = Clock(), Recorder()
    service = BookingService(database, credits, config, clock=clock, notifier=notifier)
    try:
        yield Clocked(service, clock, notifier, database)
    finally:
        await service.close()
        await credits.close()
        await database.close()


async def therapist_with_type(
    service: BookingService,
    *,
    time_zone: str = "UTC",
    duration_minutes: int = 50,
    credit_cost: int = 10,
    **policy: int | None,
) -> tuple[Therapist, SessionType]:
    """A therapist open around the clock, and one session type with `policy` fields."""
    now = datetime.now(UTC)
    therapist = await service.catalogue.create_therapist(
        str(uuid.uuid4()), Therapist(uuid.uuid4(), "Dr. Clock", time_zone, 0, 0, 0, 365, now, now)
    )
    await service.catalogue.set_weekly_schedule(therapist.therapist_id, ALL_DAY)
    session_type = await service.catalogue.create_session_type(
        str(uuid.uuid4()),
        SessionType(uuid.uuid4(), therapist.therapist_id, "Clocked", duration_minutes, credit_cost, **policy),  # type: ignore[arg-type]
    )
    return therapist, session_type


def new_booking(therapist: Therapist, session_type: SessionType, client_id: uuid.UUID, start: datetime) -> NewBooking:
    therapist_id, session_type_id = therapist.therapist_id, session_type.session_type_id
    return NewBooking("clocked-test", str(uuid.uuid4()), client_id, therapist_id, session_type_id, start)


async def available(credit: CreditServiceAsyncStub, client_id: uuid.UUID) -> tuple[int, int, int]:
    """(available, held, spent) of a client's credits."""
    balance = (await credit.GetBalance(credit_pb2.GetBalanceRequest(owner_id=str(client_id)))).balance
    return balance.available, balance.held, balance.spent


def whole_hour_after(instant: datetime, hours: int) -> datetime:
    return instant.replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)
