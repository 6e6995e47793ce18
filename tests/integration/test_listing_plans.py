"""Deep pages cost what the first page costs: the keyset cursor of every listing is an index
condition in the generic plan too.

PostgreSQL plans a prepared statement (asyncpg prepares every statement) for its parameters five
times, then may switch to one generic plan for all parameter values. A cursor written
`($2 IS NULL OR entry_id < $2)` is only a filter in that plan: each page then reads every newer row
first, and paging through a history is quadratic. Here each listing's real statement is prepared on
tables loaded with enough rows for the planner to care, the generic plan is forced
(`plan_cache_mode = force_generic_plan`), and EXPLAIN must show an index scan whose index condition
holds the cursor, and no sequential scan. The old shape of the ledger's statement is checked the
same way, to show that the check can fail.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from booking_service.store import calendar as booking_store
from booking_service.store import discovery as discovery_store
from booking_service.store import webhook_deliveries as delivery_store
from booking_service.store.discovery import TherapistFilter
from credit_service import store as credit_store
from service_kit import migrations
from tests.support.stack import fresh_database

OWNERS = 200
RESERVATIONS = 20_000
ENTRIES = 5_000
THERAPISTS = 50
SESSIONS = 10_000
# Therapists only listed (a session type each, no sessions), and one webhook endpoint's delivery log.
LISTED_THERAPISTS = 10_000
ATTEMPTS = 10_000
NIL = "00000000-0000-0000-0000-000000000000"
SOME_ID = "3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b"
# The shape main had: the cursor as `$n IS NULL OR ...`.
OLD_LEDGER_SQL = """SELECT entry_id FROM credit.ledger_entries
                     WHERE owner_id = $1 AND ($2::bigint IS NULL OR entry_id < $2)
                     ORDER BY entry_id DESC LIMIT $3"""


@pytest.fixture(scope="module")
async def credit_db(postgres_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(await fresh_database(postgres_server_url, "plans_credit"))
    await migrations.migrate(connection, "credit", migrations.load("credit_service"))
    await connection.execute(
        f"""INSERT INTO credit.accounts (owner_id)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid FROM generate_series(1, {OWNERS}) i;
            INSERT INTO credit.ledger_entries
                   (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, request_id, grant_kind)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % {OWNERS}), 12, '0'))::uuid,
                   'grant', 10, 0, 0, 10, 'plans-' || i, 'purchase'
              FROM generate_series(1, {ENTRIES}) i;
            INSERT INTO credit.reservations
                   (reservation_id, owner_id, amount, committed_amount, status, expires_at, created_at)
            SELECT gen_random_uuid(), ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % {OWNERS}), 12, '0'))::uuid,
                   1, 1, 'committed', now(), now() - make_interval(secs => i)
              FROM generate_series(1, {RESERVATIONS}) i;
            ANALYZE credit.accounts, credit.ledger_entries, credit.reservations;"""
    )
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def booking_db(postgres_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(await fresh_database(postgres_server_url, "plans_booking"))
    await migrations.migrate(connection, "booking", migrations.load("booking_service"))
    await connection.execute(
        f"""INSERT INTO booking.therapists (therapist_id, request_id, display_name, time_zone)
            SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'plans-t' || i, 'T', 'UTC'
              FROM generate_series(1, {THERAPISTS}) i;
            INSERT INTO booking.session_types
                   (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost)
            SELECT therapist_id, therapist_id, 'plans-st-' || therapist_id, 'S', 50, 1 FROM booking.therapists;
            INSERT INTO booking.sessions
                   (booking_id, request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, blocked,
                    time_zone, credit_cost)
            SELECT gen_random_uuid(), 'plans-s' || i,
                   ('00000000-0000-4000-9000-' || lpad(to_hex(1 + i % 2000), 12, '0'))::uuid,
                   t.id, t.id, s.at, s.at + interval '50 minutes', tstzrange(s.at, s.at + interval '50 minutes'),
                   'UTC', 1
              FROM generate_series(1, {SESSIONS}) i,
                   LATERAL (SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % {THERAPISTS}), 12, '0'))::uuid
                                   AS id) t,
                   LATERAL (SELECT timestamptz '2030-01-01' + make_interval(hours => i) AS at) s;
            INSERT INTO booking.therapists (therapist_id, request_id, display_name, time_zone, languages, created_at)
            SELECT gen_random_uuid(), 'plans-listed-' || i, 'L', 'UTC',
                   CASE WHEN i % 10 = 0 THEN ARRAY['pt-BR'] ELSE ARRAY['en'] END,
                   timestamptz '2030-01-01' + make_interval(secs => i)
              FROM generate_series(1, {LISTED_THERAPISTS}) i;
            INSERT INTO booking.session_types
                   (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost)
            SELECT gen_random_uuid(), therapist_id, 'plans-listed-st-' || therapist_id, 'S', 50, 5 + random() * 30
              FROM booking.therapists WHERE request_id LIKE 'plans-listed-%';
            INSERT INTO booking.webhook_endpoints (endpoint_id, request_id, url, event_types, secret)
            VALUES ('{SOME_ID}', 'plans-endpoint', 'https://example.com/hooks', ARRAY['booking.confirmed'], 'whsec_x');
            INSERT INTO booking.webhook_attempts
                   (attempt_id, endpoint_id, event_id, event_type, attempted_at, latency_ms, succeeded)
            SELECT gen_random_uuid(), '{SOME_ID}', gen_random_uuid(), 'booking.confirmed',
                   timestamptz '2030-01-01' + make_interval(secs => i), 5, true
              FROM generate_series(1, {ATTEMPTS}) i;
            ANALYZE booking.therapists, booking.session_types, booking.sessions, booking.webhook_attempts;"""
    )
    yield connection
    await connection.close()


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def generic_plan(connection: asyncpg.Connection, sql: str, arguments: list[str]) -> list[dict[str, Any]]:
    """The nodes of `sql`'s generic plan, for these arguments (SQL literals)."""
    name = f"listing_{uuid.uuid4().hex[:8]}"
    await connection.execute(f"PREPARE {name} AS {sql}")
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(arguments)})")
    finally:
        await connection.execute(f"DEALLOCATE {name}")
    return list(nodes(json.loads(explained)[0]["Plan"]))


def assert_cursor_is_an_index_condition(plan: list[dict[str, Any]], table: str, cursor_column: str) -> None:
    shown = [(node["Node Type"], node.get("Index Name"), node.get("Index Cond"), node.get("Filter")) for node in plan]
    scans = [node for node in plan if node.get("Relation Name") == table]
    assert scans, shown
    assert not any(node["Node Type"] == "Seq Scan" for node in scans), shown
    conditions = [node.get("Index Cond", "") for node in scans]
    assert any(cursor_column in condition for condition in conditions), shown


async def test_the_old_ledger_cursor_is_only_a_filter_in_the_generic_plan(credit_db: asyncpg.Connection) -> None:
    """The control: the check below catches the shape this file exists to prevent."""
    plan = await generic_plan(credit_db, OLD_LEDGER_SQL, [f"'{SOME_ID}'", "100", "51"])

    with pytest.raises(AssertionError):
        assert_cursor_is_an_index_condition(plan, "ledger_entries", "entry_id")


async def test_ledger_entries_page_by_index(credit_db: asyncpg.Connection) -> None:
    plan = await generic_plan(credit_db, credit_store.LIST_ENTRIES_SQL, [f"'{SOME_ID}'", "100", "51"])

    assert_cursor_is_an_index_condition(plan, "ledger_entries", "entry_id")


@pytest.mark.parametrize("by_owner", [True, False])
@pytest.mark.parametrize("status", ["NULL", "'committed'"])
async def test_reservations_page_by_index(credit_db: asyncpg.Connection, by_owner: bool, status: str) -> None:
    sql = credit_store.list_reservations_sql(by_owner=by_owner, pending=False)
    owner = f"'{SOME_ID}'::uuid" if by_owner else "NULL::uuid"
    arguments = ["'2030-01-01T00:00:00Z'", f"'{NIL}'", "'2031-01-01T00:00:00Z'", "51", status, owner]

    plan = await generic_plan(credit_db, sql, arguments)

    assert_cursor_is_an_index_condition(plan, "reservations", "created_at")


@pytest.mark.parametrize("by_owner", [True, False])
async def test_pending_reservations_are_found_through_their_partial_index(
    credit_db: asyncpg.Connection, by_owner: bool
) -> None:
    """The reconciler's question (pending, older than a bound): never a walk over every other hold."""
    sql = credit_store.list_reservations_sql(by_owner=by_owner, pending=True)
    owner = f"'{SOME_ID}'::uuid" if by_owner else "NULL::uuid"
    arguments = ["'2030-01-01T00:00:00Z'", f"'{NIL}'", "'2031-01-01T00:00:00Z'", "51", "'pending'", owner]

    plan = await generic_plan(credit_db, sql, arguments)

    scans = [node for node in plan if node.get("Relation Name") == "reservations"]
    assert scans and not any(node["Node Type"] == "Seq Scan" for node in scans), plan
    used = {node.get("Index Name") for node in scans}
    assert used & {"reservations_pending_expiry", "reservations_by_owner"}, used


@pytest.mark.parametrize("by_client", [True, False])
@pytest.mark.parametrize("status", ["NULL", "'confirmed'"])
async def test_bookings_page_by_index(booking_db: asyncpg.Connection, by_client: bool, status: str) -> None:
    sql = booking_store.list_bookings_sql(by_client=by_client)
    arguments = [f"'{SOME_ID}'::uuid", "'2030-06-01T00:00:00Z'", f"'{NIL}'", "'infinity'", status, "51"]

    plan = await generic_plan(booking_db, sql, arguments)

    assert_cursor_is_an_index_condition(plan, "sessions", "starts_at")


@pytest.mark.parametrize(
    "where",
    [
        TherapistFilter(),
        TherapistFilter(include_archived=True),
        TherapistFilter(languages=("en",)),
        TherapistFilter(specialties=("anxiety",), time_zones=("UTC",)),
        TherapistFilter(duration_minutes=50, max_credit_cost=20),
    ],
    ids=["none", "archived", "language", "specialty-and-zone", "session-type"],
)
async def test_therapists_page_by_index(booking_db: asyncpg.Connection, where: TherapistFilter) -> None:
    def array(values: tuple[str, ...]) -> str:
        return "'{" + ",".join(values) + "}'"

    arguments = [
        "'2030-01-01T01:00:00Z'",
        f"'{SOME_ID}'",
        str(where.include_archived).lower(),
        array(where.languages),
        array(where.specialties),
        array(where.time_zones),
        str(where.min_credit_cost),
        str(where.max_credit_cost),
        str(where.duration_minutes),
        "51",
    ]

    plan = await generic_plan(booking_db, discovery_store.list_therapists_sql(where), arguments)

    assert_cursor_is_an_index_condition(plan, "therapists", "created_at")


async def test_the_webhook_log_pages_by_index(booking_db: asyncpg.Connection) -> None:
    arguments = [f"'{SOME_ID}'", "'2030-01-01T01:00:00Z'", f"'{SOME_ID}'", "51"]

    plan = await generic_plan(booking_db, delivery_store.ATTEMPTS_SQL, arguments)

    assert_cursor_is_an_index_condition(plan, "webhook_attempts", "attempted_at")
