"""The SQL of calendar feeds: a feed's token (its hash) by owner, and the owner of a token."""

from __future__ import annotations

import uuid

from service_kit.connection import Connection


async def replace_token(connection: Connection, owner_kind: str, owner_id: uuid.UUID, token_hash: bytes) -> None:
    await connection.execute(
        """INSERT INTO booking.calendar_feeds (owner_kind, owner_id, token_hash) VALUES ($1, $2, $3)
           ON CONFLICT (owner_kind, owner_id) DO UPDATE SET token_hash = excluded.token_hash, rotated_at = now()""",
        owner_kind,
        owner_id,
        token_hash,
    )


async def owner_of(connection: Connection, token_hash: bytes) -> tuple[str, uuid.UUID] | None:
    row = await connection.fetchrow(
        "SELECT owner_kind, owner_id FROM booking.calendar_feeds WHERE token_hash = $1", token_hash
    )
    return None if row is None else (row["owner_kind"], row["owner_id"])
