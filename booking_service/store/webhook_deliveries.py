"""Webhook deliveries' SQL: the deliveries that retry one event for one endpoint, and the log
of attempts (migration 0007); what the delivery worker writes, what an endpoint's partner reads.
The endpoints themselves are in `webhook_endpoints`."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from booking_service.config import Secret
from booking_service.store.webhook_endpoints import SigningEndpoint
from service_kit.connection import Connection

# The cursor before the newest row of a newest-first listing.
_NEWEST = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))


class DeliveryStatus(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True)
class Delivery:
    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime


_DELIVERY_COLUMNS = (
    "delivery_id, endpoint_id, event_id, event_type, status, attempts, last_error, next_attempt_at, created_at, "
    "updated_at"
)


def _delivery(row: asyncpg.Record) -> Delivery:
    values = {field: row[field] for field in Delivery.__dataclass_fields__}
    values["status"] = DeliveryStatus(values["status"])
    return Delivery(**values)


@dataclass(frozen=True)
class Attempt:
    attempt_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    delivery_id: uuid.UUID | None
    attempted_at: datetime
    http_status: int | None
    latency_ms: int
    succeeded: bool
    error: str | None


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to write: an event's first attempt failed (`attempts` 1, due after its backoff,
    or dead), or it was queued behind earlier failures (`attempts` 0, due now)."""

    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    body: str
    attempts: int
    delay_s: float
    dead: bool
    last_error: str | None


# --- what the delivery worker reads and writes ---


async def record(connection: Connection, deliveries: Sequence[NewDelivery], attempts: Sequence[Attempt]) -> None:
    """Writes what a pass's first attempts left: new deliveries (an event redelivered after a
    crash finds its delivery there and leaves it alone) and the attempts. Skips endpoints deleted
    meanwhile."""
    if deliveries:
        await connection.execute(
            """INSERT INTO booking.webhook_deliveries
                   (delivery_id, endpoint_id, event_id, event_type, body, attempts, next_attempt_at, status, last_error)
               SELECT d.delivery_id, d.endpoint_id, d.event_id, d.event_type, d.body, d.attempts,
                      now() + make_interval(secs => d.delay_s), CASE WHEN d.dead THEN 'dead' ELSE 'pending' END,
                      d.last_error
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::integer[],
                             $7::float8[], $8::boolean[], $9::text[])
                      AS d(delivery_id, endpoint_id, event_id, event_type, body, attempts, delay_s, dead, last_error)
                WHERE EXISTS (SELECT 1 FROM booking.webhook_endpoints e WHERE e.endpoint_id = d.endpoint_id)
               ON CONFLICT (endpoint_id, event_id) DO NOTHING""",
            [d.delivery_id for d in deliveries],
            [d.endpoint_id for d in deliveries],
            [d.event_id for d in deliveries],
            [d.event_type for d in deliveries],
            [d.body for d in deliveries],
            [d.attempts for d in deliveries],
            [d.delay_s for d in deliveries],
            [d.dead for d in deliveries],
            [None if d.last_error is None else d.last_error[:1000] for d in deliveries],
        )
    if attempts:
        await connection.execute(
            """INSERT INTO booking.webhook_attempts
                   (attempt_id, endpoint_id, event_id, event_type, delivery_id, attempted_at, http_status, latency_ms,
                    succeeded, error)
               SELECT a.* FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::uuid[], $6::timestamptz[],
                                      $7::integer[], $8::integer[], $9::boolean[], $10::text[])
                      AS a(attempt_id, endpoint_id, event_id, event_type, delivery_id, attempted_at, http_status,
                           latency_ms, succeeded, error)
                WHERE EXISTS (SELECT 1 FROM booking.webhook_endpoints e WHERE e.endpoint_id = a.endpoint_id)""",
            [a.attempt_id for a in attempts],
            [a.endpoint_id for a in attempts],
            [a.event_id for a in attempts],
            [a.event_type for a in attempts],
            [a.delivery_id for a in attempts],
            [a.attempted_at for a in attempts],
            [a.http_status for a in attempts],
            [a.latency_ms for a in attempts],
            [a.succeeded for a in attempts],
            [None if a.error is None else a.error[:1000] for a in attempts],
        )


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: uuid.UUID
    endpoint: SigningEndpoint
    event_id: uuid.UUID
    event_type: str
    body: str
    attempts: int


async def lease_due_deliveries(connection: Connection, limit: int, lease_s: float) -> list[DueDelivery]:
    """Takes a lease on up to `limit` due deliveries of enabled endpoints, as the outbox leases
    its events (their next attempt moves `lease_s` ahead; SKIP LOCKED keeps workers apart)."""
    found = await connection.fetch(
        """WITH due AS (
               SELECT d.delivery_id FROM booking.webhook_deliveries d
                 JOIN booking.webhook_endpoints e ON e.endpoint_id = d.endpoint_id AND e.enabled
                WHERE d.status = 'pending' AND d.next_attempt_at <= now()
                ORDER BY d.next_attempt_at, d.created_at
                LIMIT $1
                  FOR UPDATE OF d SKIP LOCKED)
           UPDATE booking.webhook_deliveries d
              SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
             FROM due, booking.webhook_endpoints e
            WHERE d.delivery_id = due.delivery_id AND e.endpoint_id = d.endpoint_id
        RETURNING d.delivery_id, d.event_id, d.event_type, d.body, d.attempts, e.endpoint_id, e.url, e.event_types,
                  e.secret,
                  CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret""",
        limit,
        lease_s,
    )
    return [
        DueDelivery(
            row["delivery_id"],
            SigningEndpoint(
                row["endpoint_id"],
                row["url"],
                frozenset(row["event_types"]),
                tuple(Secret(secret) for secret in (row["secret"], row["previous_secret"]) if secret),
                True,
            ),
            row["event_id"],
            row["event_type"],
            row["body"],
            row["attempts"],
        )
        for row in found
    ]


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery_id: uuid.UUID
    status: DeliveryStatus
    delay_s: float
    error: str | None


async def finish_deliveries(
    connection: Connection, outcomes: Sequence[DeliveryOutcome], attempts: Sequence[Attempt]
) -> None:
    """Writes one pass of retries back: each delivery delivered, due again, or dead; and the log."""
    await connection.execute(
        """UPDATE booking.webhook_deliveries d
              SET status = o.status, attempts = d.attempts + 1, last_error = coalesce(o.error, d.last_error),
                  next_attempt_at = now() + make_interval(secs => o.delay_s), updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::float8[], $4::text[]) AS o(delivery_id, status, delay_s, error)
            WHERE d.delivery_id = o.delivery_id""",
        [o.delivery_id for o in outcomes],
        [o.status.value for o in outcomes],
        [o.delay_s for o in outcomes],
        [None if o.error is None else o.error[:1000] for o in outcomes],
    )
    await record(connection, (), attempts)


async def purge(connection: Connection, older_than_s: float, limit: int) -> int:
    """Deletes up to `limit` attempts and up to `limit` delivered deliveries older than
    `older_than_s`; how many rows went."""
    attempts = await connection.fetchval(
        """WITH old AS (SELECT attempt_id FROM booking.webhook_attempts
                         WHERE attempted_at < now() - make_interval(secs => $1) LIMIT $2),
                gone AS (DELETE FROM booking.webhook_attempts a USING old WHERE a.attempt_id = old.attempt_id
                         RETURNING 1)
           SELECT count(*) FROM gone""",
        older_than_s,
        limit,
    )
    deliveries = await connection.fetchval(
        """WITH old AS (SELECT delivery_id FROM booking.webhook_deliveries
                         WHERE status = 'delivered' AND updated_at < now() - make_interval(secs => $1) LIMIT $2),
                gone AS (DELETE FROM booking.webhook_deliveries d USING old WHERE d.delivery_id = old.delivery_id
                         RETURNING 1)
           SELECT count(*) FROM gone""",
        older_than_s,
        limit,
    )
    return int(attempts) + int(deliveries)


async def waiting_count(connection: Connection) -> int:
    """Deliveries still to retry, for the metrics: through webhook_deliveries_due."""
    return int(await connection.fetchval("SELECT count(*) FROM booking.webhook_deliveries WHERE status = 'pending'"))


async def dead_count(connection: Connection) -> int:
    """Dead deliveries, for the metrics (a scan: the metrics run it rarely)."""
    return int(await connection.fetchval("SELECT count(*) FROM booking.webhook_deliveries WHERE status = 'dead'"))


# --- the log and the deliveries (admin, or the endpoint's partner) ---


# Newest first; the keyset cursor is an index condition on webhook_attempts_by_endpoint
# (tests/integration/test_listing_plans.py).
ATTEMPTS_SQL = """SELECT attempt_id, endpoint_id, event_id, event_type, delivery_id, attempted_at, http_status,
                         latency_ms, succeeded, error
                    FROM booking.webhook_attempts
                   WHERE endpoint_id = $1 AND (attempted_at, attempt_id) < ($2, $3::uuid)
                   ORDER BY attempted_at DESC, attempt_id DESC
                   LIMIT $4"""


async def attempts(
    connection: Connection, endpoint_id: uuid.UUID, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Attempt]:
    """Newest first, through webhook_attempts_by_endpoint."""
    cursor = after or _NEWEST
    found = await connection.fetch(
        ATTEMPTS_SQL,
        endpoint_id,
        cursor[0],
        cursor[1],
        limit,
    )
    return [Attempt(**dict(row)) for row in found]


async def deliveries(
    connection: Connection,
    endpoint_id: uuid.UUID,
    status: DeliveryStatus | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Delivery]:
    """Newest change first, through webhook_deliveries_by_endpoint."""
    found = await connection.fetch(
        f"""SELECT {_DELIVERY_COLUMNS} FROM booking.webhook_deliveries
             WHERE endpoint_id = $1 AND (updated_at, delivery_id) < ($2, $3::uuid)
               AND ($4::text IS NULL OR status = $4)
             ORDER BY updated_at DESC, delivery_id DESC
             LIMIT $5""",
        endpoint_id,
        (after or _NEWEST)[0],
        (after or _NEWEST)[1],
        status.value if status else None,
        limit,
    )
    return [_delivery(row) for row in found]


async def revive_delivery(connection: Connection, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> Delivery | None:
    """Makes a dead delivery due now with fresh attempts; None when it is not a dead delivery of
    this endpoint (the caller tells which)."""
    row = await connection.fetchrow(
        f"""UPDATE booking.webhook_deliveries
               SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
             WHERE delivery_id = $1 AND endpoint_id = $2 AND status = 'dead'
         RETURNING {_DELIVERY_COLUMNS}""",
        delivery_id,
        endpoint_id,
    )
    return None if row is None else _delivery(row)


async def fetch_delivery(connection: Connection, endpoint_id: uuid.UUID, delivery_id: uuid.UUID) -> Delivery | None:
    row = await connection.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM booking.webhook_deliveries WHERE delivery_id = $1 AND endpoint_id = $2",
        delivery_id,
        endpoint_id,
    )
    return None if row is None else _delivery(row)
