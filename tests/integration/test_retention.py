"""The retention worker (docs/operations.md, "Retention"), on a real PostgreSQL, with a clock the
test controls: rows are written with the ages the test chooses, and the worker's clock says when
"now" is. What is purged and what is kept at each bound, batches that are bounded, rows another
transaction holds skipped rather than waited for, two workers at once deleting each row once,
batches read through indexes in every plan, and, through the real services, a refused request
answered the same within its retention and afresh after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from booking_service.config import BookingSettings
from booking_service.metrics import BookingMetrics
from booking_service.retention import PassResult, Retention
from booking_service.store import SCHEMA
from booking_service.store import retention as store_retention
from booking_service.store.retention import Purged
from service_kit import migrations
from service_kit.config import ConfigError
from service_kit.database import Database, DatabaseState
from tests.integration.test_listing_plans import nodes
from tests.support.pair import own_services
from tests.support.stack import fresh_database, server_environment
from tests.support.world import World, future_hour, grant, outcome

pytestmark = pytest.mark.timeout(120)

REQUEST_HOURS = 24
DELIVERED_HOURS = 2
DEAD_HOURS = 48
PREVIOUS_HOURS = 8 * 24
BOUNDS = {
    Purged.REQUEST_ANSWERS: timedelta(hours=REQUEST_HOURS),
    Purged.DELIVERED_EVENTS: timedelta(hours=DELIVERED_HOURS),
    Purged.DEAD_LETTERS: timedelta(hours=DEAD_HOURS),
    Purged.PREVIOUS_ATTEMPTS: timedelta(hours=PREVIOUS_HOURS),
    Purged.PREVIOUS_DECISIONS: timedelta(hours=PREVIOUS_HOURS),
    Purged.PREVIOUS_RESCHEDULES: timedelta(hours=PREVIOUS_HOURS),
}
NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)
ONE_S = timedelta(seconds=1)
THERAPIST = uuid.UUID("00000000-0000-4000-8000-00000000000a")
SESSION_TYPE = uuid.UUID("00000000-0000-4000-8000-00000000000b")


class Clock:
    """The worker's clock: whatever the test says."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def retention_environment(url: str, **extra: str) -> dict[str, str]:
    return server_environment(
        "BOOKING",
        url,
        BOOKING_REQUEST_RETENTION_HOURS=str(REQUEST_HOURS),
        BOOKING_OUTBOX_DELIVERED_RETENTION_HOURS=str(DELIVERED_HOURS),
        BOOKING_OUTBOX_DEAD_RETENTION_HOURS=str(DEAD_HOURS),
        BOOKING_PREVIOUS_VERSION_RETENTION_HOURS=str(PREVIOUS_HOURS),
        **extra,
    )


@contextlib.asynccontextmanager
async def worker(url: str, clock: Clock, *, batch_size: int = 1000) -> AsyncIterator[Retention]:
    """A retention worker of its own (its own pool) on the database at `url`, migrated."""
    environment = retention_environment(url, BOOKING_RETENTION_BATCH_SIZE=str(batch_size))
    settings = BookingSettings.from_environment(environment)
    database = Database(settings.server, SCHEMA, migrations.load("booking_service"))
    assert await database.check() is DatabaseState.READY, database.detail
    try:
        yield Retention(database, settings.retention, BookingMetrics(), clock=clock)
    finally:
        await database.close()


@pytest.fixture
async def database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url, "retention")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async with worker(database_url, Clock(NOW)):  # migrates
        pass
    connection = await asyncpg.connect(database_url)
    await seed_calendar(connection)
    yield connection
    await connection.close()


@dataclass(frozen=True)
class Sessions:
    paid: uuid.UUID
    committing: uuid.UUID
    refunding: uuid.UUID


SESSIONS = Sessions(
    uuid.UUID("00000000-0000-4000-8000-0000000000c1"),
    uuid.UUID("00000000-0000-4000-8000-0000000000c2"),
    uuid.UUID("00000000-0000-4000-8000-0000000000c3"),
)


async def seed_calendar(connection: asyncpg.Connection) -> None:
    """A therapist and three sessions whose payments are paid, committing and refunding."""
    await connection.execute(
        """INSERT INTO booking.therapists (therapist_id, request_id, display_name, time_zone)
           VALUES ($1, 'retention-therapist', 'Dr. Retention', 'UTC')""",
        THERAPIST,
    )
    await connection.execute(
        """INSERT INTO booking.session_types
                  (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost)
           VALUES ($1, $2, 'retention-type', 'Session', 50, 1)""",
        SESSION_TYPE,
        THERAPIST,
    )
    for hour, (booking_id, status, payment) in enumerate(
        [
            (SESSIONS.paid, "confirmed", "paid"),
            (SESSIONS.committing, "confirmed", "committing"),
            (SESSIONS.refunding, "cancelled", "refunding"),
        ]
    ):
        starts_at = NOW + timedelta(days=3, hours=hour)
        await connection.execute(
            """INSERT INTO booking.sessions
                      (booking_id, request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, blocked,
                       time_zone, credit_cost, status, payment_status, cancelled_at)
               VALUES ($1, $8, gen_random_uuid(), $2, $3, $4, $5, tstzrange($4, $5), 'UTC', 1, $6, $7,
                       CASE WHEN $6 = 'cancelled' THEN $4 END)""",
            booking_id,
            THERAPIST,
            SESSION_TYPE,
            starts_at,
            starts_at + timedelta(minutes=50),
            status,
            payment,
            f"retention-{payment}",
        )


async def add_rows(connection: asyncpg.Connection, kind: Purged, at: datetime, count: int = 1) -> list[str]:
    """`count` rows of a kind whose age column is `at`; their keys, as text."""
    statements = {
        Purged.REQUEST_ANSWERS: """
            INSERT INTO booking.request_answers (request_key, fingerprint, refusal_reason, refusal_message, created_at)
            SELECT gen_random_uuid(), 'f', 'SLOT_UNAVAILABLE', 'taken', $1 FROM generate_series(1, $2)
            RETURNING request_key::text""",
        Purged.DELIVERED_EVENTS: f"""
            INSERT INTO booking.outbox (event_id, kind, booking_id, status, attempts, created_at, updated_at)
            SELECT gen_random_uuid(), 'booking_event', '{SESSIONS.paid}', 'delivered', 1, $1, $1
              FROM generate_series(1, $2)
            RETURNING event_id::text""",
        Purged.DEAD_LETTERS: f"""
            INSERT INTO booking.outbox (event_id, kind, booking_id, status, attempts, created_at, updated_at)
            SELECT gen_random_uuid(), 'booking_event', '{SESSIONS.paid}', 'dead', 12, $1, $1
              FROM generate_series(1, $2)
            RETURNING event_id::text""",
        Purged.PREVIOUS_ATTEMPTS: """
            INSERT INTO booking.booking_attempts (request_id, booking_id, fingerprint, created_at)
            SELECT gen_random_uuid()::text, gen_random_uuid(), 'f', $1 FROM generate_series(1, $2)
            RETURNING request_id""",
        Purged.PREVIOUS_DECISIONS: """
            INSERT INTO booking.decisions (reservation_id, decision, decided_at)
            SELECT gen_random_uuid(), 'commit', $1 FROM generate_series(1, $2)
            RETURNING reservation_id::text""",
        Purged.PREVIOUS_RESCHEDULES: f"""
            INSERT INTO booking.reschedules (request_id, booking_id, fingerprint, created_at)
            SELECT gen_random_uuid()::text, '{SESSIONS.paid}', 'f', $1 FROM generate_series(1, $2)
            RETURNING request_id""",
    }
    return [row[0] for row in await connection.fetch(statements[kind], at, count)]


_KEYS = {
    Purged.REQUEST_ANSWERS: "SELECT request_key::text FROM booking.request_answers",
    Purged.DELIVERED_EVENTS: "SELECT event_id::text FROM booking.outbox WHERE status = 'delivered'",
    Purged.DEAD_LETTERS: "SELECT event_id::text FROM booking.outbox WHERE status = 'dead'",
    Purged.PREVIOUS_ATTEMPTS: "SELECT request_id FROM booking.booking_attempts",
    Purged.PREVIOUS_DECISIONS: "SELECT reservation_id::text FROM booking.decisions",
    Purged.PREVIOUS_RESCHEDULES: "SELECT request_id FROM booking.reschedules",
}


async def keys(connection: asyncpg.Connection, kind: Purged) -> set[str]:
    return {row[0] for row in await connection.fetch(_KEYS[kind])}


async def until_done(retention: Retention) -> list[PassResult]:
    """Passes until one finds no full batch (as the periodic worker runs them back to back)."""
    passes = [await retention.purge_pass()]
    while passes[-1].full:
        assert len(passes) < 1000, "the purge does not end"
        passes.append(await retention.purge_pass())
    return passes


async def test_what_is_past_its_bound_goes_and_everything_else_stays(db: asyncpg.Connection, database_url: str) -> None:
    gone: dict[Purged, set[str]] = {}
    kept: dict[Purged, set[str]] = {}
    for kind, bound in BOUNDS.items():
        cutoff = NOW - bound
        gone[kind] = set(await add_rows(db, kind, cutoff - ONE_S)) | set(await add_rows(db, kind, cutoff - 400 * bound))
        # A row exactly at its bound is still within it: a request may be given its answer then.
        kept[kind] = set(await add_rows(db, kind, cutoff)) | set(await add_rows(db, kind, cutoff + ONE_S))
    # A reschedule's answer (a moved booking) goes like a refusal; its booking stays.
    gone[Purged.REQUEST_ANSWERS].add(
        await db.fetchval(
            """INSERT INTO booking.request_answers (request_key, fingerprint, booking_id, created_at)
               VALUES (gen_random_uuid(), 'f', $1, $2) RETURNING request_key::text""",
            SESSIONS.paid,
            NOW - BOUNDS[Purged.REQUEST_ANSWERS] - ONE_S,
        )
    )
    # A series' answer stays however old while the series has a session: it is the only record of
    # which request made the series.
    series_key = await db.fetchval(
        """INSERT INTO booking.request_answers (request_key, fingerprint, booking_id, created_at)
           VALUES (gen_random_uuid(), 'f', $1, $2) RETURNING request_key""",
        SESSIONS.paid,
        NOW - timedelta(days=1000),
    )
    await db.execute(
        "UPDATE booking.sessions SET series_id = $1, series_index = 0 WHERE booking_id = $2", series_key, SESSIONS.paid
    )
    kept[Purged.REQUEST_ANSWERS].add(str(series_key))
    # Dead letters of bookings still waiting for their payment stay, however old: a person
    # re-drives them (the runbook). Events not delivered yet stay, however old.
    ancient = NOW - timedelta(days=1000)
    for booking_id in (SESSIONS.committing, SESSIONS.refunding):
        kept[Purged.DEAD_LETTERS].add(
            await db.fetchval(
                """INSERT INTO booking.outbox (event_id, kind, booking_id, status, attempts, created_at, updated_at)
                   VALUES (gen_random_uuid(), 'booking_event', $1, 'dead', 12, $2, $2) RETURNING event_id::text""",
                booking_id,
                ancient,
            )
        )
    pending = await db.fetchval(
        """INSERT INTO booking.outbox (event_id, kind, booking_id, created_at, updated_at, next_attempt_at)
           VALUES (gen_random_uuid(), 'booking_event', $1, $2, $2, $2) RETURNING event_id::text""",
        SESSIONS.committing,
        ancient,
    )

    async with worker(database_url, Clock(NOW)) as retention:
        passes = await until_done(retention)

    assert len(passes) == 1, "one pass: no batch was full"
    assert {kind: n for kind, n in passes[0].purged.items()} == {kind: len(gone[kind]) for kind in BOUNDS}
    for kind in BOUNDS:
        assert await keys(db, kind) == kept[kind], kind
    assert await db.fetchval("SELECT status FROM booking.outbox WHERE event_id = $1::uuid", pending) == "pending"
    assert await db.fetchval("SELECT count(*) FROM booking.sessions") == 3, "sessions are business records"


async def test_the_clock_decides_when_an_answer_may_go(db: asyncpg.Connection, database_url: str) -> None:
    recorded_at = NOW
    (answer,) = await add_rows(db, Purged.REQUEST_ANSWERS, recorded_at)
    clock = Clock(recorded_at + BOUNDS[Purged.REQUEST_ANSWERS] - ONE_S)
    async with worker(database_url, clock) as retention:
        await until_done(retention)
        assert await keys(db, Purged.REQUEST_ANSWERS) == {answer}, "within its retention"
        clock.now = recorded_at + BOUNDS[Purged.REQUEST_ANSWERS]
        await until_done(retention)
        assert await keys(db, Purged.REQUEST_ANSWERS) == {answer}, "at its retention's end, still given"
        clock.now += timedelta(milliseconds=1)
        await until_done(retention)
        assert await keys(db, Purged.REQUEST_ANSWERS) == set(), "past its retention"


async def test_every_batch_is_bounded_and_a_full_one_asks_for_the_next(
    db: asyncpg.Connection, database_url: str
) -> None:
    for kind, bound in BOUNDS.items():
        await add_rows(db, kind, NOW - bound - ONE_S, count=25)
        await add_rows(db, kind, NOW, count=3)
    async with worker(database_url, Clock(NOW), batch_size=10) as retention:
        passes = await until_done(retention)
        again = await retention.purge_pass()
    assert [p.full for p in passes] == [True, True, False]
    for kind in BOUNDS:
        assert [p.purged[kind] for p in passes] == [10, 10, 5], kind
        assert len(await keys(db, kind)) == 3, kind
    assert again == PassResult({kind: 0 for kind in BOUNDS}, full=False), "nothing more: a pass does nothing"


async def test_rows_another_transaction_holds_are_skipped_not_waited_for(
    db: asyncpg.Connection, database_url: str
) -> None:
    old = NOW - BOUNDS[Purged.REQUEST_ANSWERS] - ONE_S
    held, *free = await add_rows(db, Purged.REQUEST_ANSWERS, old, count=4)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM booking.request_answers WHERE request_key = $1::uuid FOR UPDATE", held)
            async with worker(database_url, Clock(NOW)) as retention:
                # Were the purge to wait for the lock, its statement would time out and this raise.
                result = await retention.purge_pass()
            assert result.purged[Purged.REQUEST_ANSWERS] == len(free)
            assert await keys(db, Purged.REQUEST_ANSWERS) == {held}
        async with worker(database_url, Clock(NOW)) as retention:
            await until_done(retention)
        assert await keys(db, Purged.REQUEST_ANSWERS) == set(), "released, it goes at the next pass"
    finally:
        await other.close()


async def test_two_workers_at_once_delete_each_row_once(db: asyncpg.Connection, database_url: str) -> None:
    expired = 400
    kept: dict[Purged, set[str]] = {}
    for kind, bound in BOUNDS.items():
        await add_rows(db, kind, NOW - bound - ONE_S, count=expired)
        kept[kind] = set(await add_rows(db, kind, NOW - bound + ONE_S, count=5))
    async with (
        worker(database_url, Clock(NOW), batch_size=25) as first,
        worker(database_url, Clock(NOW), batch_size=25) as second,
    ):
        results = await asyncio.gather(until_done(first), until_done(second))
    for kind in BOUNDS:
        by_worker = [sum(p.purged[kind] for p in passes) for passes in results]
        assert sum(by_worker) == expired, (kind, by_worker)
        assert all(p.purged[kind] <= 25 for passes in results for p in passes)
        assert await keys(db, kind) == kept[kind], kind
    totals = [sum(sum(p.purged.values()) for p in passes) for passes in results]
    assert all(total > 0 for total in totals), f"both workers purged: {totals}"


def test_bounds_cannot_be_set_below_what_the_protocol_promises() -> None:
    base = server_environment("BOOKING", "postgresql://unused/booking")
    defaults = BookingSettings.from_environment(base).retention
    assert defaults.request_retention_hours >= 24
    assert defaults.enabled
    for name, value in [
        ("BOOKING_REQUEST_RETENTION_HOURS", "23"),  # docs/design.md promises a day at least
        ("BOOKING_PREVIOUS_VERSION_RETENTION_HOURS", "168"),  # a 7-day hold outlives it
        ("BOOKING_RETENTION_BATCH_SIZE", "0"),
    ]:
        with pytest.raises(ConfigError, match=name):
            BookingSettings.from_environment({**base, name: value})
    with pytest.raises(ConfigError, match="BOOKING_OUTBOX_DEAD_RETENTION_HOURS"):
        BookingSettings.from_environment(
            {**base, "BOOKING_OUTBOX_DELIVERED_RETENTION_HOURS": "500", "BOOKING_OUTBOX_DEAD_RETENTION_HOURS": "400"}
        )


async def test_the_previous_versions_rows_are_kept_as_long_as_request_ids(database_url: str) -> None:
    settings = BookingSettings.from_environment(
        {
            **retention_environment(database_url),
            "BOOKING_REQUEST_RETENTION_HOURS": str(30 * 24),
            "BOOKING_PREVIOUS_VERSION_RETENTION_HOURS": str(10 * 24),
        }
    )
    database = Database(settings.server, SCHEMA, migrations.load("booking_service"))
    cutoffs = Retention(database, settings.retention, BookingMetrics(), clock=Clock(NOW)).cutoffs()
    assert cutoffs[Purged.PREVIOUS_ATTEMPTS] == NOW - timedelta(days=30)
    assert cutoffs[Purged.PREVIOUS_DECISIONS] == NOW - timedelta(days=30)
    assert cutoffs[Purged.REQUEST_ANSWERS] == NOW - timedelta(days=30)


async def test_a_refused_request_gets_its_answer_within_its_retention_and_afresh_after(
    postgres_server_url: str,
) -> None:
    async with own_services(postgres_server_url, "retention_e2e", credit_env={}, booking_env={}) as services:
        world = await World.create(services.booking_stub, services.credit_stub)
        client = await world.new_client(credits=0)  # no credit account yet
        request = world.booking_request(future_hour(4, 10), client_id=client)
        refused = await outcome(world.booking.CreateBooking(request))
        assert getattr(refused, "reason", None) == "ACCOUNT_NOT_FOUND"
        recorded_at = await services.booking_db.fetchval("SELECT max(created_at) FROM booking.request_answers")
        await grant(world.credit, client, 100)
        clock = Clock(recorded_at + timedelta(hours=REQUEST_HOURS) - ONE_S)
        async with worker(services.booking_database_url, clock) as retention:
            await until_done(retention)
            again = await outcome(world.booking.CreateBooking(request))
            assert getattr(again, "reason", None) == "ACCOUNT_NOT_FOUND", "within its retention: the same answer"
            clock.now += 2 * ONE_S
            await until_done(retention)
        answered_afresh = await world.booking.CreateBooking(request)
        assert answered_afresh.booking.client_id == client, "after it: answered afresh, and booked now"


AGE_INDEXES = {
    Purged.REQUEST_ANSWERS: "request_answers_by_age",
    Purged.DELIVERED_EVENTS: "outbox_delivered_by_age",
    Purged.DEAD_LETTERS: "outbox_dead_letters",
    Purged.PREVIOUS_ATTEMPTS: "booking_attempts_by_age",
    Purged.PREVIOUS_DECISIONS: "decisions_by_age",
    Purged.PREVIOUS_RESCHEDULES: "reschedules_by_age",
}
# The shape a first draft had, `key IN (subquery)`: a semi-join that reads the whole table.
SEMI_JOIN_SQL = """DELETE FROM booking.request_answers WHERE request_key IN (
                       SELECT o.request_key FROM booking.request_answers o WHERE o.created_at < $1
                        ORDER BY o.created_at LIMIT $2 FOR UPDATE OF o SKIP LOCKED)"""


async def batch_plans(connection: asyncpg.Connection, sql: str) -> list[list[dict[str, Any]]]:
    """The nodes of the batch's plans for a cutoff a year back: for its parameters (custom), and
    for any (generic, which a prepared statement may switch to after five runs)."""
    cutoff = f"'{(NOW - timedelta(days=365)).isoformat()}'"
    name = f"batch_{uuid.uuid4().hex[:8]}"
    await connection.execute(f"PREPARE {name} AS {sql}")
    plans = []
    try:
        for mode in ("force_custom_plan", "force_generic_plan"):
            async with connection.transaction():
                await connection.execute(f"SET LOCAL plan_cache_mode = {mode}")
                explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({cutoff}, 1000)")
            plans.append(list(nodes(json.loads(explained)[0]["Plan"])))
    finally:
        await connection.execute(f"DEALLOCATE {name}")
    return plans


def assert_batch_reads_by_index(plan: list[dict[str, Any]], table: str, age_index: str) -> None:
    shown = [(node["Node Type"], node.get("Relation Name"), node.get("Index Name")) for node in plan]
    scans = [node for node in plan if node.get("Relation Name") == table]
    assert scans and not any(node["Node Type"] == "Seq Scan" for node in scans), shown
    assert age_index in {node.get("Index Name") for node in scans}, shown


async def test_every_batch_reads_only_through_indexes_on_large_tables(db: asyncpg.Connection) -> None:
    """A batch costs the same whatever the table's size: the rows past their bound are found
    through the age index (migration 0008), and deleted through the key, in every plan."""
    for kind, bound in BOUNDS.items():
        await add_rows(db, kind, NOW - 2 * bound, count=2000)
        await add_rows(db, kind, NOW, count=20_000)
    await db.execute("ANALYZE")
    for kind, rows in store_retention.ROWS.items():
        for plan in await batch_plans(db, rows.batch_sql):
            assert_batch_reads_by_index(plan, rows.table.removeprefix("booking."), AGE_INDEXES[kind])
    semi_join = await batch_plans(db, SEMI_JOIN_SQL)
    # The check can fail: the semi-join's generic plan reads the whole table to match the rows.
    with pytest.raises(AssertionError):
        assert_batch_reads_by_index(semi_join[1], "request_answers", "request_answers_by_age")
