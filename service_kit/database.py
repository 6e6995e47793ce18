"""The database of one service: readiness (reachable, migrated), the pool, transaction retries."""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import asyncpg
import structlog

from service_kit import migrations as schema_migrations
from service_kit.config import ServerSettings
from service_kit.connection import Connection
from service_kit.errors import Unavailable
from service_kit.interceptor import DATABASE_UNAVAILABLE_ERRORS
from service_kit.metrics import PoolUsage

log = structlog.get_logger()
T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
MIGRATION_TIMEOUT_S = 120.0
# Serialization failures and deadlocks are retried as whole transactions, a bounded number of
# times (docs/conventions.md); every other error is the caller's to handle.
RETRYABLE_ERRORS = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)
TRANSACTION_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.01
_CHECK_FAILURES: tuple[type[BaseException], ...] = (*DATABASE_UNAVAILABLE_ERRORS, TimeoutError, asyncpg.PostgresError)
Isolation = Literal["read_committed", "repeatable_read", "serializable"]


class DatabaseState(enum.Enum):
    STARTING = "starting"
    UNREACHABLE = "unreachable"
    SCHEMA_BEHIND = "schema_behind"
    MIGRATION_FAILED = "migration_failed"
    READY = "ready"


class Database:
    def __init__(self, settings: ServerSettings, schema: str, migrations: tuple[schema_migrations.Migration, ...]):
        self._settings = settings
        self.schema = schema
        self._migrations = migrations
        self.expected_version = schema_migrations.latest_version(migrations)
        self._pool: asyncpg.Pool | None = None
        self._migrated = False
        self.state = DatabaseState.STARTING
        self.detail = "not checked yet"

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("the database is not ready yet; retry later", reason="DATABASE_UNAVAILABLE")
        return self._pool

    def pool_usage(self) -> PoolUsage:
        """The pool's connections now, for the metrics (all zero before the pool exists)."""
        pool = self._pool
        if pool is None:
            return PoolUsage(in_use=0, idle=0, max_size=self._settings.database_pool_max_size)
        size, idle = pool.get_size(), pool.get_idle_size()
        return PoolUsage(in_use=size - idle, idle=idle, max_size=pool.get_max_size())

    async def check(self) -> DatabaseState:
        """One readiness step: connect, migrate once if allowed, compare the schema version."""
        try:
            state, detail = await self._check_once()
        except _CHECK_FAILURES as error:
            state, detail = DatabaseState.UNREACHABLE, repr(error)
        except schema_migrations.MigrationError as error:
            state, detail = DatabaseState.MIGRATION_FAILED, str(error)
        if state is not self.state:
            level = log.info if state is DatabaseState.READY else log.warning
            level("database_state_changed", schema=self.schema, state=state.value, detail=detail)
        self.state, self.detail = state, detail
        return state

    async def _check_once(self) -> tuple[DatabaseState, str]:
        if self._pool is None:
            connection = await asyncpg.connect(self._settings.database_url, timeout=CONNECT_TIMEOUT_S)
            try:
                if self._settings.migrate_on_start and not self._migrated:
                    await asyncio.wait_for(
                        schema_migrations.migrate(connection, self.schema, self._migrations),
                        MIGRATION_TIMEOUT_S,
                    )
                    self._migrated = True
                version = await schema_migrations.applied_version(connection, self.schema)
            finally:
                await connection.close(timeout=CONNECT_TIMEOUT_S)
            if version < self.expected_version:
                return self._behind(version)
            self._pool = await self._create_pool()
            return DatabaseState.READY, f"schema version {version}"
        async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as pooled:
            version = await schema_migrations.applied_version(pooled, self.schema)
        if version < self.expected_version:
            return self._behind(version)
        return DatabaseState.READY, f"schema version {version}"

    def _behind(self, version: int) -> tuple[DatabaseState, str]:
        return (
            DatabaseState.SCHEMA_BEHIND,
            f"schema {self.schema} is at version {version}, this build needs {self.expected_version}; "
            "apply the migrations (they run at start unless MIGRATE_ON_START is false)",
        )

    async def _create_pool(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self._settings.database_url,
            min_size=self._settings.database_pool_min_size,
            max_size=self._settings.database_pool_max_size,
            command_timeout=self._settings.database_command_timeout_s,
            timeout=CONNECT_TIMEOUT_S,
            max_inactive_connection_lifetime=300.0,
            # A statement outside an explicit transaction (`autocommit`) is a transaction of its
            # own: name its isolation level here rather than trust the server's default. Generic
            # plans: a statement is planned once per connection instead of on every call while
            # PostgreSQL weighs custom plans (the booking's look-up: 0.2 to 0.3 ms a call against
            # 0.8 to 0.9 ms; python -m bench.plan_drift [--plan-cache-mode auto]). A generic plan
            # is made without the parameters' values and kept until its tables are analysed, so a
            # statement must find its rows by key whatever the statistics said (booking migration
            # 0015; tests/integration/test_plans_age_well.py).
            server_settings={
                "default_transaction_isolation": "read committed",
                "plan_cache_mode": "force_generic_plan",
            },
            reset=_keep_session,
        )
        assert pool is not None
        return pool

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), timeout_s)
        except TimeoutError:
            pool.terminate()


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset between two borrowers, without asyncpg's default reset query
    (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`), which costs a round trip per
    borrow. Nothing here changes session state: settings are `SET LOCAL` or `set_config(..., true)`,
    advisory locks are transaction-scoped (docs/conventions.md), there are no cursors or LISTENs
    outside a transaction. asyncpg still rolls back a transaction left open before calling this."""
    del connection


async def autocommit(
    pool: asyncpg.Pool, work: Callable[[Connection], Awaitable[T]], *, attempts: int = TRANSACTION_ATTEMPTS
) -> T:
    """Runs `work` on a pooled connection outside any explicit transaction: each statement it
    sends is a READ COMMITTED transaction of its own (see `_create_pool`), so each must keep every
    invariant on its own (one statement, one database function, or a compare-and-set). Saves the
    BEGIN and COMMIT round trips of `in_transaction`; retries the same way on serialization
    failure or deadlock, so `work` must be safe to run again."""

    async def once() -> T:
        async with pool.acquire() as connection:
            return await work(connection)

    return await _retrying(once, attempts, "statement_retried")


async def in_transaction(
    pool: asyncpg.Pool,
    work: Callable[[Connection], Awaitable[T]],
    *,
    isolation: Isolation = "read_committed",
    attempts: int = TRANSACTION_ATTEMPTS,
) -> T:
    """Runs `work` in one transaction, retrying the whole of it on serialization failure or deadlock."""

    async def once() -> T:
        async with pool.acquire() as connection, connection.transaction(isolation=isolation):
            return await work(connection)

    return await _retrying(once, attempts, "transaction_retried")


async def _retrying(once: Callable[[], Awaitable[T]], attempts: int, event: str) -> T:
    """Runs `once` again, a bounded number of times with jittered backoff, on serialization
    failure or deadlock (40001, 40P01); every other error is the caller's to handle."""
    assert attempts >= 1
    for attempt in range(1, attempts + 1):
        try:
            return await once()
        except RETRYABLE_ERRORS as error:
            if attempt == attempts:
                raise
            delay_s = RETRY_BASE_DELAY_S * 2**attempt * random.uniform(0.5, 1.5)  # jitter, not crypto
            log.info(event, attempt=attempt, error=type(error).__name__, delay_s=round(delay_s, 3))
            await asyncio.sleep(delay_s)
    raise AssertionError("unreachable")
