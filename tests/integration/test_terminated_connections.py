"""A database connection that the server terminates (pg_terminate_backend, a restart) is a
database outage to the services, never an INTERNAL error.

Found by the chaos harness: a backend terminated while its pooled connection was checked out
makes asyncpg read the server's FATAL before it sees the closed socket, and the pool's reset on
release then fails with `InternalClientError` ("cannot switch to state 15; another operation (2)
is in progress"), which the services answered as INTERNAL, even for work that had committed.
"""

from __future__ import annotations

from collections import Counter

import asyncpg

from service_kit.interceptor import DATABASE_UNAVAILABLE_ERRORS
from tests.support.stack import fresh_database

ATTEMPTS = 60


async def test_a_connection_terminated_while_checked_out_fails_as_a_database_outage(postgres_server_url: str) -> None:
    url = await fresh_database(postgres_server_url, "terminated")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    admin = await asyncpg.connect(url)
    assert pool is not None
    failures: Counter[str] = Counter()
    unclassified: list[str] = []
    try:
        for _ in range(ATTEMPTS):
            try:
                async with pool.acquire() as connection:
                    pid = await connection.fetchval("SELECT pg_backend_pid()")
                    await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            except Exception as error:  # noqa: BLE001  # each is classified below
                failures[type(error).__name__] += 1
                if not isinstance(error, DATABASE_UNAVAILABLE_ERRORS):
                    unclassified.append(repr(error))
            # Whatever happened, the pool hands out a working connection next.
            async with pool.acquire() as connection:
                assert await connection.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await pool.close()
    # Usually both: ConnectionDoesNotExistError, and the state race (InternalClientError).
    assert failures, "no terminated connection was noticed at all"
    assert unclassified == [], f"answered as INTERNAL: {unclassified[:3]} ({dict(failures)})"


def test_the_state_race_error_is_classified_as_a_database_outage() -> None:
    error = asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    assert isinstance(error, DATABASE_UNAVAILABLE_ERRORS)
