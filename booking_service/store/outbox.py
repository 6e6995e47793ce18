"""The outbox's SQL: events of bookings, leased, delivered, retried and dead-lettered."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from booking_service.domain import VideoRoomState
from service_kit.connection import Connection
from service_kit.ids import uuid7


async def enqueue(
    connection: Connection, kind: str, booking_id: uuid.UUID, payload: Mapping[str, object] | None = None
) -> uuid.UUID:
    """Writes an event in the caller's transaction. Its id is time-ordered (UUIDv7): it lands on
    the outbox's primary key's rightmost leaf, not on a random one (docs/performance.md, "Ids and
    WAL on large tables"); a webhook receiver may read from it when the event was made."""
    event_id = uuid7()
    await connection.execute(
        "INSERT INTO booking.outbox (event_id, kind, booking_id, payload) VALUES ($1, $2, $3, $4::jsonb)",
        event_id,
        kind,
        booking_id,
        json.dumps(payload or {}),
    )
    return event_id


@dataclass(frozen=True)
class OutboxEvent:
    event_id: uuid.UUID
    kind: str
    booking_id: uuid.UUID
    payload: dict[str, object]
    attempts: int
    age_s: float  # since the row was written, by the database's clock


async def lease_due_events(connection: Connection, limit: int, lease_s: float) -> list[OutboxEvent]:
    """Takes a lease on up to `limit` due events: their next attempt moves `lease_s` ahead, so no
    other worker takes them meanwhile, and no transaction stays open while they are delivered.
    A worker that dies mid-delivery leaves the event to be taken again when its lease runs out
    (at-least-once). SKIP LOCKED keeps concurrent workers off each other's rows."""
    found = await connection.fetch(
        """UPDATE booking.outbox o
              SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
             FROM (SELECT event_id FROM booking.outbox
                    WHERE status = 'pending' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at, created_at
                    LIMIT $1
                    FOR UPDATE SKIP LOCKED) due
            WHERE o.event_id = due.event_id
        RETURNING o.event_id, o.kind, o.booking_id, o.payload, o.attempts,
                  extract(epoch FROM now() - o.created_at)::float8 AS age_s""",
        limit,
        lease_s,
    )
    return [
        OutboxEvent(
            row["event_id"], row["kind"], row["booking_id"], json.loads(row["payload"]), row["attempts"], row["age_s"]
        )
        for row in found
    ]


@dataclass(frozen=True)
class Deferred:
    """An event whose side effects are delivered but whose booking's payment is not settled yet:
    it comes due again `defer_s` after it was written, with nothing left but that payment."""

    event_id: uuid.UUID


async def finish_events(
    connection: Connection,
    delivered: Sequence[uuid.UUID],
    deferred: Sequence[Deferred],
    rooms: Mapping[uuid.UUID, tuple[VideoRoomState, str | None]],
    *,
    defer_s: float,
) -> None:
    """Writes one outbox pass back in one statement (so atomically): the events delivered, the
    events deferred to their payment, and the video rooms' new states (a room's state never says
    more than its events' delivery does)."""
    await connection.execute(
        """WITH rooms AS (
               UPDATE booking.video_rooms v
                  SET state = r.state, url = r.url, failure_reason = NULL, updated_at = now()
                 FROM unnest($4::uuid[], $5::text[], $6::text[]) AS r(booking_id, state, url)
                WHERE v.booking_id = r.booking_id
           ), deferred AS (
               UPDATE booking.outbox
                  SET next_attempt_at = created_at + make_interval(secs => $3),
                      payload = payload || '{"pending_effects": []}', updated_at = now()
                WHERE event_id = ANY($2::uuid[])
           )
           UPDATE booking.outbox SET status = 'delivered', attempts = attempts + 1, updated_at = now()
            WHERE event_id = ANY($1::uuid[])""",
        list(delivered),
        [event.event_id for event in deferred],
        defer_s,
        list(rooms),
        [state.value for state, _ in rooms.values()],
        [url for _, url in rooms.values()],
    )


async def retry_event(
    connection: Connection,
    event_id: uuid.UUID,
    delay_s: float,
    error: str,
    *,
    dead: bool,
    pending_effects: Sequence[str] | None = None,
) -> None:
    """One failed attempt: the next one after `delay_s`, or none (`dead`). `pending_effects`:
    the side effects still to deliver (those that failed), None to leave them as they are."""
    await connection.execute(
        """UPDATE booking.outbox
              SET attempts = attempts + 1, last_error = $3, updated_at = now(),
                  next_attempt_at = now() + make_interval(secs => $2),
                  status = CASE WHEN $4 THEN 'dead' ELSE 'pending' END,
                  payload = CASE WHEN $5::text[] IS NULL THEN payload
                                 ELSE payload || jsonb_build_object('pending_effects', to_jsonb($5::text[])) END
            WHERE event_id = $1""",
        event_id,
        delay_s,
        error[:1000],
        dead,
        None if pending_effects is None else list(pending_effects),
    )


async def room_pending_again(connection: Connection, booking_id: uuid.UUID) -> None:
    """A failed room whose event is retried is pending again."""
    await connection.execute(
        """UPDATE booking.video_rooms SET state = 'pending', updated_at = now()
            WHERE booking_id = $1 AND state = 'failed'""",
        booking_id,
    )


async def outbox_pending_count(connection: Connection) -> int:
    """Outbox rows still pending, for the metrics: an index-only count over outbox_due, whose
    rows are the events not delivered yet."""
    count = await connection.fetchval("SELECT count(*) FROM booking.outbox WHERE status = 'pending'")
    return int(count)


async def outbox_dead_count(connection: Connection) -> int:
    """Dead outbox rows, for the metrics (through the outbox_dead_letters index since 0002; the
    metrics still run it rarely, *_METRICS_SCAN_INTERVAL_S)."""
    count = await connection.fetchval("SELECT count(*) FROM booking.outbox WHERE status = 'dead'")
    return int(count)


@dataclass(frozen=True)
class DeadLetter:
    event_id: uuid.UUID
    kind: str
    booking_id: uuid.UUID
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime


_DEAD_LETTER_COLUMNS = "event_id, kind, booking_id, attempts, last_error, created_at, updated_at"


async def dead_letters(
    connection: Connection, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[DeadLetter]:
    """Newest first, through the outbox_dead_letters index."""
    found = await connection.fetch(
        f"""SELECT {_DEAD_LETTER_COLUMNS} FROM booking.outbox
             WHERE status = 'dead'
               AND ($1::timestamptz IS NULL OR (updated_at, event_id) < ($1, $2::uuid))
             ORDER BY updated_at DESC, event_id DESC
             LIMIT $3""",
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [DeadLetter(**dict(row)) for row in found]


async def revive_dead_letter(connection: Connection, event_id: uuid.UUID) -> DeadLetter | None:
    """Makes a dead event due now with fresh attempts; None if no dead event has this id."""
    row = await connection.fetchrow(
        f"""UPDATE booking.outbox
               SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
             WHERE event_id = $1 AND status = 'dead'
         RETURNING {_DEAD_LETTER_COLUMNS}""",
        event_id,
    )
    return None if row is None else DeadLetter(**dict(row))
