"""Versioned SQL migrations, applied under an advisory lock and recorded in a table.

Each service keeps its files in `<service>/migrations/NNNN_name.sql` and its tables in a
PostgreSQL schema of its own name, so two services on one database cannot collide. Replicas
starting together serialize on a session advisory lock; the loser finds the work done. An
applied file whose checksum changed is refused: history is never rewritten.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import structlog

from service_kit.connection import Connection

log = structlog.get_logger()

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    """The database's migration history disagrees with the code's."""


def load(package: str, folder: str = "migrations") -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(package).joinpath(folder).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1)), f"migrations of {package} must be numbered 1..n: {versions}"
    return tuple(found)


def latest_version(migrations: tuple[Migration, ...]) -> int:
    return migrations[-1].version if migrations else 0


async def applied_version(connection: Connection, schema: str) -> int:
    """The highest applied version, 0 for a database never migrated."""
    _check_schema_name(schema)
    exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    if not exists:
        return 0
    version = await connection.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.schema_migrations")
    assert isinstance(version, int)
    return version


async def migrate(connection: Connection, schema: str, migrations: tuple[Migration, ...]) -> int:
    """Applies what is missing, each file in its own transaction; returns the version reached."""
    _check_schema_name(schema)
    lock_key = f"migrations:{schema}"
    await connection.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key)
    try:
        await connection.execute(
            f"CREATE SCHEMA IF NOT EXISTS {schema};"
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
            " version integer PRIMARY KEY CHECK (version > 0),"
            " name text NOT NULL,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await connection.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{schema} migration {migration.version:04d}_{migration.name} changed after it was applied"
                    )
                continue
            async with connection.transaction(isolation="read_committed"):
                await connection.execute(migration.sql)
                await connection.execute(
                    f"INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("migration_applied", schema=schema, version=migration.version, name=migration.name)
        return await applied_version(connection, schema)
    finally:
        await connection.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key)


def _check_schema_name(schema: str) -> None:
    # Schema names are interpolated into SQL, so they come from code and match a strict pattern.
    assert _SCHEMA_NAME.match(schema), schema
