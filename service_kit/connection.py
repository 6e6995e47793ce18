"""The type store functions take: a connection of our own, or one borrowed from a pool."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
import asyncpg.pool

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
