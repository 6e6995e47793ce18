"""Webhook endpoints' SQL: the endpoints with their secrets (migration 0007), as operators
manage them and as the delivery worker signs for them. Their deliveries and the log of attempts
are in `webhook_deliveries`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from booking_service.config import Secret
from service_kit.connection import Connection

# The one key under which endpoints are created, so that their count stays within its bound.
_CREATE_LOCK = "webhook_endpoints"


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: uuid.UUID
    url: str
    event_types: tuple[str, ...]
    description: str
    enabled: bool
    partner_id: str
    created_at: datetime
    updated_at: datetime
    # While a rotated-out secret still signs.
    previous_secret_expires_at: datetime | None


_ENDPOINT_COLUMNS = (
    "endpoint_id, url, event_types, description, enabled, partner_id, created_at, updated_at, "
    "CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END AS previous_secret_expires_at"
)


def _endpoint(row: asyncpg.Record) -> Endpoint:
    values = {field: row[field] for field in Endpoint.__dataclass_fields__}
    values["event_types"] = tuple(values["event_types"])
    return Endpoint(**values)


@dataclass(frozen=True)
class SigningEndpoint:
    """An enabled endpoint as the worker sends to it: its secrets (the current one first, then
    the previous one while its overlap lasts), and whether deliveries to it wait already (then a
    new event waits behind them instead of being tried at once)."""

    endpoint_id: uuid.UUID
    url: str
    event_types: frozenset[str]
    secrets: tuple[Secret, ...]
    backed_up: bool


# --- endpoints (admin) ---


async def lock_creation(connection: Connection) -> None:
    """Serializes creates until the transaction ends: the check of the request id, the count and
    the insert then see every create before, so concurrent ones neither exceed the bound nor
    collide on the request id."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _CREATE_LOCK)


async def insert_endpoint(
    connection: Connection,
    request_id: str,
    endpoint: Endpoint,
    secret: str,
    *,
    max_endpoints: int,
) -> Endpoint | None:
    """The new endpoint; None when there are `max_endpoints` already (under lock_creation)."""
    count = await connection.fetchval("SELECT count(*) FROM booking.webhook_endpoints")
    if count >= max_endpoints:
        return None
    row = await connection.fetchrow(
        f"""INSERT INTO booking.webhook_endpoints
               (endpoint_id, request_id, url, description, event_types, partner_id, secret)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING {_ENDPOINT_COLUMNS}""",
        endpoint.endpoint_id,
        request_id,
        endpoint.url,
        endpoint.description,
        list(endpoint.event_types),
        endpoint.partner_id,
        secret,
    )
    assert row is not None
    return _endpoint(row)


async def insert_bootstrap_endpoint(
    connection: Connection, endpoint_id: uuid.UUID, request_id: str, url: str, event_types: Sequence[str], secret: str
) -> bool:
    """The endpoint of BOOKING_WEBHOOK_URL, unless it exists (under any secret); True when made."""
    created = await connection.fetchval(
        """INSERT INTO booking.webhook_endpoints (endpoint_id, request_id, url, description, event_types, secret)
           VALUES ($1, $2, $3, 'BOOKING_WEBHOOK_URL', $4, $5)
           ON CONFLICT DO NOTHING
           RETURNING true""",
        endpoint_id,
        request_id,
        url,
        list(event_types),
        secret,
    )
    return bool(created)


async def endpoint_by_request(connection: Connection, request_id: str) -> tuple[Endpoint, Secret] | None:
    row = await connection.fetchrow(
        f"SELECT {_ENDPOINT_COLUMNS}, secret FROM booking.webhook_endpoints WHERE request_id = $1", request_id
    )
    return None if row is None else (_endpoint(row), Secret(row["secret"]))


async def fetch_endpoint(connection: Connection, endpoint_id: uuid.UUID) -> Endpoint | None:
    row = await connection.fetchrow(
        f"SELECT {_ENDPOINT_COLUMNS} FROM booking.webhook_endpoints WHERE endpoint_id = $1", endpoint_id
    )
    return None if row is None else _endpoint(row)


async def list_endpoints(connection: Connection, after: tuple[datetime, uuid.UUID], limit: int) -> list[Endpoint]:
    found = await connection.fetch(
        f"""SELECT {_ENDPOINT_COLUMNS} FROM booking.webhook_endpoints
             WHERE (created_at, endpoint_id) > ($1, $2::uuid)
             ORDER BY created_at, endpoint_id
             LIMIT $3""",
        after[0],
        after[1],
        limit,
    )
    return [_endpoint(row) for row in found]


async def update_endpoint(connection: Connection, endpoint: Endpoint) -> Endpoint | None:
    row = await connection.fetchrow(
        f"""UPDATE booking.webhook_endpoints
               SET url = $2, event_types = $3, description = $4, partner_id = $5, updated_at = now()
             WHERE endpoint_id = $1
         RETURNING {_ENDPOINT_COLUMNS}""",
        endpoint.endpoint_id,
        endpoint.url,
        list(endpoint.event_types),
        endpoint.description,
        endpoint.partner_id,
    )
    return None if row is None else _endpoint(row)


async def rotate_secret(
    connection: Connection, endpoint_id: uuid.UUID, new_secret: str, overlap_s: float
) -> Endpoint | None:
    """The new secret signs from now on; the current one keeps signing beside it for `overlap_s`
    (none when 0). A secret rotated out before is dropped."""
    row = await connection.fetchrow(
        f"""UPDATE booking.webhook_endpoints
               SET previous_secret = CASE WHEN $3 > 0 THEN secret END,
                   previous_secret_expires_at = CASE WHEN $3 > 0 THEN now() + make_interval(secs => $3) END,
                   secret = $2, updated_at = now()
             WHERE endpoint_id = $1
         RETURNING {_ENDPOINT_COLUMNS}""",
        endpoint_id,
        new_secret,
        overlap_s,
    )
    return None if row is None else _endpoint(row)


async def set_enabled(connection: Connection, endpoint_id: uuid.UUID, *, enabled: bool) -> Endpoint | None:
    row = await connection.fetchrow(
        f"""UPDATE booking.webhook_endpoints
               SET enabled = $2, updated_at = CASE WHEN enabled = $2 THEN updated_at ELSE now() END
             WHERE endpoint_id = $1
         RETURNING {_ENDPOINT_COLUMNS}""",
        endpoint_id,
        enabled,
    )
    return None if row is None else _endpoint(row)


async def delete_endpoint(connection: Connection, endpoint_id: uuid.UUID) -> bool:
    """Deletes the endpoint with its deliveries and attempts (ON DELETE CASCADE)."""
    result = await connection.execute("DELETE FROM booking.webhook_endpoints WHERE endpoint_id = $1", endpoint_id)
    return bool(result != "DELETE 0")


# --- what the delivery worker reads ---


async def signing_endpoints(connection: Connection) -> list[SigningEndpoint]:
    """Every enabled endpoint, with its secrets and whether deliveries to it wait."""
    found = await connection.fetch(
        """SELECT e.endpoint_id, e.url, e.event_types, e.secret,
                  CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret,
                  EXISTS (SELECT 1 FROM booking.webhook_deliveries d
                           WHERE d.endpoint_id = e.endpoint_id AND d.status = 'pending') AS backed_up
             FROM booking.webhook_endpoints e
            WHERE e.enabled
            ORDER BY e.created_at, e.endpoint_id"""
    )
    return [
        SigningEndpoint(
            row["endpoint_id"],
            row["url"],
            frozenset(row["event_types"]),
            tuple(Secret(secret) for secret in (row["secret"], row["previous_secret"]) if secret),
            row["backed_up"],
        )
        for row in found
    ]
