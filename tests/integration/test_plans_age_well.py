"""A plan made on empty tables still finds rows by their keys once the tables have grown.

The services' connections use generic plans (service_kit/database.py): a statement is planned once
per connection, without its parameters' values, and the plan is kept. A plan made while a table
looked empty (a fresh database, the statistics not yet gathered) may read the whole table, and
keeps doing so as the table grows: the booking's look-up written as a join (booking migration
0005) read every session on each call, 1.1 ms after 1,000 bookings on one connection and 5.0 ms
after 6,000 (docs/performance.md, "A plan that aged"). Migration 0015 finds each row by its key.

Here the look-up's plan is made on empty tables, sessions are then booked through the real locked
step, and auto_explain shows the plan the connection really uses: no table is read whole, and the
look-up touches a handful of pages. The same check on migration 0005's look-up (installed under
another name) fails, which shows that the check can fail.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from bench.plan_drift import LOOK_UP_SQL, joined_look_up, new_therapist, place_at
from booking_service.store import calendar as calendar_store
from service_kit import migrations
from tests.support.stack import fresh_database

SESSIONS = 1000
# A look-up by key reads a few index and heap pages per table it probes.
MAX_PAGES = 20  # 8 here; the join read 43 at 1,000 sessions


@pytest.fixture
async def booking_db(postgres_server_url: str) -> str:
    url = await fresh_database(postgres_server_url, f"plans_age_{uuid.uuid4().hex[:8]}")
    connection = await asyncpg.connect(url)
    try:
        await migrations.migrate(connection, "booking", migrations.load("booking_service"))
        await connection.execute(joined_look_up())
    finally:
        await connection.close()
    return url


async def plan_of(connection: asyncpg.Connection, sql: str, *args: object) -> str:
    """The plan the connection's cached statement runs with, as auto_explain logs it."""
    notices: list[str] = []

    def listen(_: object, message: asyncpg.PostgresLogMessage) -> None:
        notices.append(message.message)

    connection.add_log_listener(listen)
    try:
        await connection.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_analyze = on", "log_buffers = on", "log_level = notice"):
            await connection.execute(f"SET auto_explain.{setting}")
        await connection.fetch(sql, *args)
        await connection.execute("SET auto_explain.log_min_duration = -1")
    finally:
        connection.remove_log_listener(listen)
    (plan,) = [notice for notice in notices if sql.split("(", maxsplit=1)[0] in notice]
    return plan


def pages_read(plan: str) -> int:
    """Pages the statement touched (its top node's buffers: hit plus read)."""
    first = re.search(r"Buffers: shared((?: \w+=\d+)+)", plan)
    assert first is not None, plan
    return sum(int(count) for count in re.findall(r"=(\d+)", first.group(1)))


async def test_a_look_up_planned_on_empty_tables_still_probes_by_key(booking_db: str) -> None:
    connection = await asyncpg.connect(booking_db, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        therapist_id, type_id, version = await new_therapist(connection)
        start = datetime(2031, 1, 1, tzinfo=UTC)

        def arguments(at: datetime) -> tuple[object, ...]:
            return [uuid.uuid4()], [therapist_id], [at], [at + timedelta(minutes=10)]

        # Both look-ups are planned now, on empty tables, and keep those plans.
        for function in ("booking.look_up", "booking.look_up_joined"):
            await connection.fetch(LOOK_UP_SQL.format(function=function), *arguments(start))
        for index in range(SESSIONS):
            place = place_at(therapist_id, type_id, version, start + timedelta(minutes=10 * index))
            await calendar_store.decide(connection, [place], wait=True, lock_timeout_ms=1000)
        later = start + timedelta(days=365)

        keyed = await plan_of(connection, LOOK_UP_SQL.format(function="booking.look_up"), *arguments(later))
        joined = await plan_of(connection, LOOK_UP_SQL.format(function="booking.look_up_joined"), *arguments(later))
    finally:
        await connection.close()

    assert "Seq Scan" not in keyed, keyed
    assert pages_read(keyed) <= MAX_PAGES, keyed
    # The control: the join planned on empty tables reads every session.
    assert "Seq Scan on sessions" in joined, joined
    assert pages_read(joined) > MAX_PAGES, joined
