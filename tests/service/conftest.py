"""The service test tier: the booking service's use cases in-process, on a real PostgreSQL, with a
scripted credit service (tests/support/fake_credits.py) behind the protocol class the real client
implements, and a clock the test controls. No process, no socket: each branch of the protocol is
driven deliberately, where the process-level tests (tests/integration/test_booking_faults.py)
show the same with real crashes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from booking_service.config import BookingSettings
from booking_service.domain import SessionType, Therapist, WeeklyWindowMinutes
from booking_service.requests import NewBooking
from booking_service.service import BookingService
from booking_service.store import SCHEMA
from service_kit import migrations
from service_kit.database import Database, DatabaseState
from tests.support.fake_credits import FakeCredits
from tests.support.stack import fresh_database, server_environment

COST = 10
GRANTED = 100
SESSION_MINUTES = 50
CALLER = "00000000-0000-4000-8000-00000000c0de"


@dataclass
class Clock:
    """The service's clock: real time shifted by `offset`, which a test moves."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Practice:
    """One therapist open around the clock (UTC), one session type, one funded client, and the
    service under test with its scripted credit service."""

    service: BookingService
    credits: FakeCredits
    clock: Clock
    database: Database
    therapist_id: uuid.UUID
    session_type_id: uuid.UUID
    client_id: uuid.UUID
    made: list[uuid.UUID] = field(default_factory=list)

    def request(
        self, start: datetime, *, client_id: uuid.UUID | None = None, request_id: str | None = None
    ) -> NewBooking:
        return NewBooking(
            CALLER,
            request_id or str(uuid.uuid4()),
            client_id or self.client_id,
            self.therapist_id,
            self.session_type_id,
            start,
        )

    def new_client(self, credits: int = GRANTED) -> uuid.UUID:
        client_id = uuid.uuid4()
        self.credits.grant(client_id, credits)
        return client_id

    async def sql(self, query: str, *args: object) -> list[asyncpg.Record]:
        async with self.database.pool.acquire() as connection:
            return list(await connection.fetch(query, *args))


def future_hour(days_ahead: int = 3, hour: int = 10) -> datetime:
    day = datetime.now(UTC).date() + timedelta(days=days_ahead)
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


@pytest.fixture(scope="module")
async def booking_database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url, "service_tier")


PracticeFactory = Callable[..., Awaitable[Practice]]


@pytest.fixture
async def practice_factory(booking_database_url: str) -> AsyncIterator[PracticeFactory]:
    """Makes a Practice (each with its own service, fake and therapist) with settings over the tier's
    defaults; every service made is closed at the end."""
    made: list[tuple[BookingService, Database]] = []

    async def make(**settings: str) -> Practice:
        env = server_environment(
            "BOOKING",
            booking_database_url,
            BOOKING_VIDEO_PROVIDER="none",
            BOOKING_LOCK_TIMEOUT_MS="300",
            BOOKING_COMMIT_RETRY_AFTER_S="0",
            **settings,
        )
        booking_settings = BookingSettings.from_environment(env)
        database = Database(booking_settings.server, SCHEMA, migrations.load("booking_service"))
        assert await database.check() is DatabaseState.READY, database.detail
        credits, clock = FakeCredits(), Clock()
        service = BookingService(database, credits, booking_settings, clock=clock)
        made.append((service, database))
        now = clock()
        therapist = await service.catalogue.create_therapist(
            str(uuid.uuid4()),
            Therapist(uuid.uuid4(), "Dr. Tier", "UTC", 0, 0, 0, 90, now, now),
        )
        await service.catalogue.set_weekly_schedule(
            therapist.therapist_id, [WeeklyWindowMinutes(day, 0, 24 * 60) for day in range(1, 8)]
        )
        session_type = await service.catalogue.create_session_type(
            str(uuid.uuid4()), SessionType(uuid.uuid4(), therapist.therapist_id, "Session", SESSION_MINUTES, COST)
        )
        client_id = uuid.uuid4()
        credits.grant(client_id, GRANTED)
        return Practice(
            service, credits, clock, database, therapist.therapist_id, session_type.session_type_id, client_id
        )

    yield make
    for service, database in made:
        await service.close()
        await database.close()
