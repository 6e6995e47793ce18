"""SQL of the booking service, one function per statement. Tables live in the `booking` schema."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
from asyncpg import Range

from booking_service.domain import (
    Actor,
    Booking,
    BookingStatus,
    CancelReason,
    DateOverride,
    PaymentStatus,
    SessionType,
    Therapist,
    VideoRoom,
    VideoRoomState,
    WeeklyWindowMinutes,
)
from service_kit.connection import Connection

SCHEMA = "booking"

_THERAPIST_COLUMNS = (
    "therapist_id, display_name, time_zone, buffer_before_minutes, buffer_after_minutes,"
    " minimum_notice_minutes, booking_horizon_days, created_at, updated_at"
)
_SESSION_TYPE_COLUMNS = "session_type_id, therapist_id, name, duration_minutes, credit_cost"
_BOOKING_COLUMNS = (
    "booking_id, request_id, client_id, therapist_id, session_type_id, starts_at, ends_at, time_zone,"
    " credit_cost, status, payment_status, cancelled_by, cancel_reason, refunded_credits, cancelled_at,"
    " reschedule_count, created_at, updated_at"
)


_THERAPIST_FIELDS = tuple(column.strip() for column in _THERAPIST_COLUMNS.split(","))
_SESSION_TYPE_FIELDS = tuple(column.strip() for column in _SESSION_TYPE_COLUMNS.split(","))


def _therapist(row: asyncpg.Record) -> Therapist:
    return Therapist(**dict(row))


def _session_type(row: asyncpg.Record) -> SessionType:
    return SessionType(**dict(row))


# A booking with its video room: fetch_booking and list_bookings join it in.
_BOOKING_WITH_ROOM = (
    ", ".join(f"s.{column.strip()}" for column in _BOOKING_COLUMNS.split(","))
    + ", v.state AS video_state, v.url AS video_url, v.failure_reason AS video_failure_reason"
)
_SESSIONS_WITH_ROOM = "booking.sessions s LEFT JOIN booking.video_rooms v USING (booking_id)"


def _booking(row: asyncpg.Record) -> Booking:
    return _booking_from(dict(row))


def _booking_from(values: dict[str, Any]) -> Booking:
    if "video_state" in values:
        state = values.pop("video_state")
        url = values.pop("video_url")
        reason = values.pop("video_failure_reason")
        values["video_room"] = None if state is None else VideoRoom(VideoRoomState(state), url, reason)
    values["status"] = BookingStatus(values["status"])
    values["payment_status"] = PaymentStatus(values["payment_status"])
    values["cancelled_by"] = Actor(values["cancelled_by"]) if values["cancelled_by"] else None
    values["cancel_reason"] = CancelReason(values["cancel_reason"]) if values["cancel_reason"] else None
    return Booking(**values)


# --- therapists and schedules ---


async def insert_therapist(connection: Connection, request_id: str, therapist: Therapist) -> Therapist | None:
    """The new therapist, or None when request_id was used before."""
    row = await connection.fetchrow(
        f"""INSERT INTO booking.therapists
               (therapist_id, request_id, display_name, time_zone, buffer_before_minutes,
                buffer_after_minutes, minimum_notice_minutes, booking_horizon_days)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING {_THERAPIST_COLUMNS}""",
        therapist.therapist_id,
        request_id,
        therapist.display_name,
        therapist.time_zone,
        therapist.buffer_before_minutes,
        therapist.buffer_after_minutes,
        therapist.minimum_notice_minutes,
        therapist.booking_horizon_days,
    )
    return None if row is None else _therapist(row)


async def therapist_by_request(connection: Connection, request_id: str) -> Therapist | None:
    row = await connection.fetchrow(
        f"SELECT {_THERAPIST_COLUMNS} FROM booking.therapists WHERE request_id = $1", request_id
    )
    return None if row is None else _therapist(row)


async def fetch_therapist(
    connection: Connection, therapist_id: uuid.UUID, *, for_update: bool = False
) -> Therapist | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await connection.fetchrow(
        f"SELECT {_THERAPIST_COLUMNS} FROM booking.therapists WHERE therapist_id = $1{lock}", therapist_id
    )
    return None if row is None else _therapist(row)


async def update_therapist(connection: Connection, therapist: Therapist) -> Therapist:
    row = await connection.fetchrow(
        f"""UPDATE booking.therapists
               SET display_name = $2, time_zone = $3, buffer_before_minutes = $4, buffer_after_minutes = $5,
                   minimum_notice_minutes = $6, booking_horizon_days = $7, updated_at = now()
             WHERE therapist_id = $1
         RETURNING {_THERAPIST_COLUMNS}""",
        therapist.therapist_id,
        therapist.display_name,
        therapist.time_zone,
        therapist.buffer_before_minutes,
        therapist.buffer_after_minutes,
        therapist.minimum_notice_minutes,
        therapist.booking_horizon_days,
    )
    assert row is not None
    return _therapist(row)


async def replace_weekly_windows(
    connection: Connection, therapist_id: uuid.UUID, windows: list[WeeklyWindowMinutes]
) -> None:
    await connection.execute("DELETE FROM booking.weekly_windows WHERE therapist_id = $1", therapist_id)
    await connection.executemany(
        "INSERT INTO booking.weekly_windows (therapist_id, weekday, start_minute, end_minute) VALUES ($1, $2, $3, $4)",
        [(therapist_id, w.weekday, w.start_minute, w.end_minute) for w in windows],
    )


async def weekly_windows(connection: Connection, therapist_id: uuid.UUID) -> list[WeeklyWindowMinutes]:
    rows = await connection.fetch(
        """SELECT weekday, start_minute, end_minute FROM booking.weekly_windows
            WHERE therapist_id = $1 ORDER BY weekday, start_minute""",
        therapist_id,
    )
    return [WeeklyWindowMinutes(**dict(row)) for row in rows]


async def upsert_override(connection: Connection, therapist_id: uuid.UUID, override: DateOverride) -> None:
    await connection.execute(
        """INSERT INTO booking.date_overrides (therapist_id, local_date, windows) VALUES ($1, $2, $3)
           ON CONFLICT (therapist_id, local_date) DO UPDATE SET windows = excluded.windows""",
        therapist_id,
        date.fromisoformat(override.local_date),
        [Range(start, end) for start, end in override.windows],
    )


async def delete_override(connection: Connection, therapist_id: uuid.UUID, local_date: str) -> bool:
    result = await connection.execute(
        "DELETE FROM booking.date_overrides WHERE therapist_id = $1 AND local_date = $2",
        therapist_id,
        date.fromisoformat(local_date),
    )
    return bool(result != "DELETE 0")


async def overrides(
    connection: Connection, therapist_id: uuid.UUID, *, from_date: str | None = None
) -> list[DateOverride]:
    rows = await connection.fetch(
        """SELECT local_date, windows FROM booking.date_overrides
            WHERE therapist_id = $1 AND ($2::date IS NULL OR local_date >= $2)
            ORDER BY local_date""",
        therapist_id,
        date.fromisoformat(from_date) if from_date else None,
    )
    return [
        DateOverride(row["local_date"].isoformat(), tuple((r.lower, r.upper) for r in row["windows"])) for row in rows
    ]


@dataclass(frozen=True)
class BookingContext:
    """What a booking's rules read, as of `schedule_version` (migration 0004)."""

    therapist: Therapist
    session_type: SessionType | None  # whoever's it is: the caller checks
    weekly: list[WeeklyWindowMinutes]
    overrides: list[DateOverride]
    schedule_version: int


async def booking_context(
    connection: Connection, therapist_id: uuid.UUID, session_type_id: uuid.UUID
) -> BookingContext | None:
    """Everything a booking's rules need, in one round trip: the therapist (None: not found), the
    session type if it exists, the weekly windows and every date override, and the version of
    them all. Windows of overrides come flattened, as (date, start, end) in array order."""
    row = await connection.fetchrow(
        f"""SELECT {", ".join(f"t.{column}" for column in _THERAPIST_FIELDS)}, t.schedule_version,
                   st.session_type_id AS st_session_type_id, st.therapist_id AS st_therapist_id,
                   st.name AS st_name, st.duration_minutes AS st_duration_minutes, st.credit_cost AS st_credit_cost,
                   ARRAY(SELECT ROW(w.weekday, w.start_minute, w.end_minute) FROM booking.weekly_windows w
                          WHERE w.therapist_id = t.therapist_id ORDER BY w.weekday, w.start_minute) AS weekly,
                   ARRAY(SELECT o.local_date FROM booking.date_overrides o
                          WHERE o.therapist_id = t.therapist_id ORDER BY o.local_date) AS override_dates,
                   ARRAY(SELECT ROW(o.local_date, lower(w.window_range), upper(w.window_range))
                           FROM booking.date_overrides o, unnest(o.windows) WITH ORDINALITY AS w(window_range, position)
                          WHERE o.therapist_id = t.therapist_id ORDER BY o.local_date, w.position) AS override_windows
              FROM booking.therapists t
              LEFT JOIN booking.session_types st ON st.session_type_id = $2
             WHERE t.therapist_id = $1""",
        therapist_id,
        session_type_id,
    )
    if row is None:
        return None
    therapist = Therapist(**{column: row[column] for column in _THERAPIST_FIELDS})
    session_type = None
    if row["st_session_type_id"] is not None:
        session_type = SessionType(**{column: row[f"st_{column}"] for column in _SESSION_TYPE_FIELDS})
    weekly = [WeeklyWindowMinutes(weekday, start, end) for weekday, start, end in row["weekly"]]
    windows: dict[date, list[tuple[int, int]]] = {local_date: [] for local_date in row["override_dates"]}
    for local_date, start, end in row["override_windows"]:
        windows[local_date].append((start, end))
    overrides = [DateOverride(local_date.isoformat(), tuple(spans)) for local_date, spans in windows.items()]
    return BookingContext(therapist, session_type, weekly, overrides, row["schedule_version"])


# --- session types ---


async def insert_session_type(connection: Connection, request_id: str, session_type: SessionType) -> SessionType | None:
    row = await connection.fetchrow(
        f"""INSERT INTO booking.session_types
               (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING {_SESSION_TYPE_COLUMNS}""",
        session_type.session_type_id,
        session_type.therapist_id,
        request_id,
        session_type.name,
        session_type.duration_minutes,
        session_type.credit_cost,
    )
    return None if row is None else _session_type(row)


async def session_type_by_request(connection: Connection, request_id: str) -> SessionType | None:
    row = await connection.fetchrow(
        f"SELECT {_SESSION_TYPE_COLUMNS} FROM booking.session_types WHERE request_id = $1", request_id
    )
    return None if row is None else _session_type(row)


async def session_types(connection: Connection, therapist_id: uuid.UUID) -> list[SessionType]:
    rows = await connection.fetch(
        f"""SELECT {_SESSION_TYPE_COLUMNS} FROM booking.session_types
             WHERE therapist_id = $1 ORDER BY created_at, session_type_id""",
        therapist_id,
    )
    return [_session_type(row) for row in rows]


# --- bookings ---


async def busy_ranges(
    connection: Connection, therapist_id: uuid.UUID, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    rows = await connection.fetch(
        """SELECT lower(blocked) AS start, upper(blocked) AS end FROM booking.sessions
            WHERE therapist_id = $1 AND status = 'confirmed' AND blocked && tstzrange($2, $3, '[)')
            ORDER BY lower(blocked)""",
        therapist_id,
        start,
        end,
    )
    return [(row["start"], row["end"]) for row in rows]


async def slot_conflicts(
    connection: Connection,
    therapist_id: uuid.UUID,
    blocked: tuple[datetime, datetime],
    ignore_booking_id: uuid.UUID | None,
) -> bool:
    """The one conflict predicate (booking.slot_conflicts), for the pre-check and the locked check."""
    conflict = await connection.fetchval(
        "SELECT booking.slot_conflicts($1, tstzrange($2, $3, '[)'), $4)",
        therapist_id,
        blocked[0],
        blocked[1],
        ignore_booking_id,
    )
    return bool(conflict)


async def lock_therapist_calendar(connection: Connection, therapist_id: uuid.UUID) -> None:
    """A 64-bit, namespaced, transaction-scoped advisory lock per therapist (CONVENTIONS.md)."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('therapist:' || $1::uuid::text, 0))", therapist_id
    )


async def set_lock_timeout(connection: Connection, lock_timeout_ms: int) -> None:
    await connection.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")


@dataclass(frozen=True)
class Claim:
    """What booking.claim_attempt_and_precheck found (migration 0003)."""

    booking_id: uuid.UUID
    fingerprint: str
    aborted: bool  # the bound booking id was aborted: start over with a new one
    finished: bool  # its session exists: a repeat of a request that made its booking
    conflict: bool  # another session takes the slot (the attempt was forgotten)


@dataclass(frozen=True)
class ClaimRequest:
    """One booking's claim (booking.claim_attempts, migration 0004): bind `request_id` to
    `booking_id` unless it is bound already, and pre-check `blocked` (None: the range could not
    be computed) if `bookable`, all as of the therapist's `schedule_version`."""

    request_id: str
    booking_id: uuid.UUID
    fingerprint: str
    therapist_id: uuid.UUID
    blocked: tuple[datetime, datetime] | None
    bookable: bool
    schedule_version: int


async def claim_attempts(connection: Connection, claims: Sequence[ClaimRequest]) -> list[Claim | None]:
    """Claims for many bookings in one call and one transaction, in order; None for a claim made
    against a schedule version that is no longer current (nothing happened for it)."""
    rows = await connection.fetch(
        """SELECT item_position, stale, booking_id, fingerprint, aborted, finished, conflict
             FROM booking.claim_attempts($1::text[], $2::uuid[], $3::text[], $4::uuid[], $5::timestamptz[],
                                         $6::timestamptz[], $7::boolean[], $8::bigint[])""",
        [claim.request_id for claim in claims],
        [claim.booking_id for claim in claims],
        [claim.fingerprint for claim in claims],
        [claim.therapist_id for claim in claims],
        [claim.blocked[0] if claim.blocked else None for claim in claims],
        [claim.blocked[1] if claim.blocked else None for claim in claims],
        [claim.bookable for claim in claims],
        [claim.schedule_version for claim in claims],
    )
    assert len(rows) == len(claims), (len(rows), len(claims))
    found: list[Claim | None] = [None] * len(claims)
    for row in rows:
        if not row["stale"]:
            found[row["item_position"] - 1] = Claim(
                row["booking_id"], row["fingerprint"], row["aborted"], row["finished"], row["conflict"]
            )
    return found


@dataclass(frozen=True)
class Decision:
    """One booking's locked step (booking.decide_bookings, migration 0004)."""

    draft: Booking
    blocked: tuple[datetime, datetime]
    notification: dict[str, object]
    video_room_name: str | None


async def decide_bookings(
    connection: Connection,
    lock_timeout_ms: int,
    commit_retry_after_s: float,
    decisions: Sequence[Decision],
    *,
    wait: bool,
) -> list[tuple[str, Booking | None]]:
    """The locked step of many bookings in one call and one transaction, in order: ('inserted',
    the new session), ('existing', None: a concurrent repeat of this request got there first),
    ('conflict', None: the slot is taken; `abort` is recorded), ('aborted', None), or, when not
    `wait`ing, ('busy', None: another transaction holds the therapist's lock; nothing happened).
    A lock timeout (when waiting) or an exclusion violation refuses the whole batch."""
    drafts = [decision.draft for decision in decisions]
    rows = await connection.fetch(
        f"""SELECT item_position, outcome, {_BOOKING_COLUMNS}
              FROM booking.decide_bookings($1, $2, $3, $4::uuid[], $5::text[], $6::uuid[], $7::uuid[], $8::uuid[],
                                           $9::timestamptz[], $10::timestamptz[], $11::timestamptz[],
                                           $12::timestamptz[], $13::text[], $14::bigint[], $15::text[], $16::text[])""",
        lock_timeout_ms,
        commit_retry_after_s,
        wait,
        [draft.booking_id for draft in drafts],
        [draft.request_id for draft in drafts],
        [draft.client_id for draft in drafts],
        [draft.therapist_id for draft in drafts],
        [draft.session_type_id for draft in drafts],
        [draft.starts_at for draft in drafts],
        [draft.ends_at for draft in drafts],
        [decision.blocked[0] for decision in decisions],
        [decision.blocked[1] for decision in decisions],
        [draft.time_zone for draft in drafts],
        [draft.credit_cost for draft in drafts],
        [json.dumps(decision.notification) for decision in decisions],
        [decision.video_room_name for decision in decisions],
    )
    assert len(rows) == len(decisions), (len(rows), len(decisions))
    outcomes: list[tuple[str, Booking | None]] = [("", None)] * len(decisions)
    for row in rows:
        values = dict(row)
        position = values.pop("item_position")
        outcome = str(values.pop("outcome"))
        outcomes[position - 1] = (outcome, _booking_from(values) if outcome == "inserted" else None)
    assert all(outcome for outcome, _ in outcomes)
    return outcomes


@dataclass(frozen=True)
class PaidMark:
    """A booking just marked PAID: when, and its video room as it is now."""

    updated_at: datetime
    video_room: VideoRoom | None


async def mark_paid(connection: Connection, booking_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, PaidMark]:
    """In one statement for many bookings whose holds were just committed: each that is still
    COMMITTING becomes PAID, and their pending commit_reservation outbox rows are marked delivered
    (the work was done inline). Returns when each marked booking was updated; a booking not in
    the result was no longer COMMITTING (the outbox worker marked it first, or it was cancelled):
    read it again in a statement of its own, because this statement's snapshot may predate the
    change that made its UPDATE skip the row, and must not be returned as the booking's state."""
    rows = await connection.fetch(
        """WITH marked AS (
               UPDATE booking.sessions SET payment_status = 'paid', updated_at = now()
                WHERE booking_id = ANY($1::uuid[]) AND payment_status = 'committing'
            RETURNING booking_id, updated_at
           ), delivered AS (
               UPDATE booking.outbox SET status = 'delivered', updated_at = now()
                WHERE booking_id = ANY($1::uuid[]) AND kind = 'commit_reservation' AND status = 'pending'
           )
           SELECT m.booking_id, m.updated_at, v.state, v.url, v.failure_reason
             FROM marked m LEFT JOIN booking.video_rooms v USING (booking_id)""",
        list(booking_ids),
    )
    return {
        row["booking_id"]: PaidMark(
            row["updated_at"],
            None
            if row["state"] is None
            else VideoRoom(VideoRoomState(row["state"]), row["url"], row["failure_reason"]),
        )
        for row in rows
    }


async def fetch_bookings(connection: Connection, booking_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Booking]:
    rows = await connection.fetch(
        f"SELECT {_BOOKING_WITH_ROOM} FROM {_SESSIONS_WITH_ROOM} WHERE s.booking_id = ANY($1::uuid[])",
        list(booking_ids),
    )
    bookings = [_booking(row) for row in rows]
    return {booking.booking_id: booking for booking in bookings}


async def replace_attempt(connection: Connection, request_id: str, old: uuid.UUID, new: uuid.UUID) -> bool:
    result = await connection.execute(
        """UPDATE booking.booking_attempts SET booking_id = $3, created_at = now()
            WHERE request_id = $1 AND booking_id = $2""",
        request_id,
        old,
        new,
    )
    return bool(result == "UPDATE 1")


async def forget_attempt(connection: Connection, request_id: str, booking_id: uuid.UUID) -> None:
    await connection.execute(
        "DELETE FROM booking.booking_attempts WHERE request_id = $1 AND booking_id = $2",
        request_id,
        booking_id,
    )


async def record_decision(connection: Connection, reservation_id: uuid.UUID, decision: str) -> str:
    """Records `decision` unless one exists; returns the decision that stands."""
    row = await connection.fetchrow(
        """WITH inserted AS (
               INSERT INTO booking.decisions (reservation_id, decision) VALUES ($1, $2)
               ON CONFLICT (reservation_id) DO NOTHING RETURNING decision)
           SELECT decision FROM inserted
           UNION ALL
           SELECT decision FROM booking.decisions WHERE reservation_id = $1
           LIMIT 1""",
        reservation_id,
        decision,
    )
    if row is None:
        row = await connection.fetchrow(
            "SELECT decision FROM booking.decisions WHERE reservation_id = $1", reservation_id
        )
    assert row is not None
    value: str = row["decision"]
    return value


async def fetch_booking(connection: Connection, booking_id: uuid.UUID, *, for_update: bool = False) -> Booking | None:
    lock = " FOR UPDATE OF s" if for_update else ""  # not the room: the nullable side of the join
    row = await connection.fetchrow(
        f"SELECT {_BOOKING_WITH_ROOM} FROM {_SESSIONS_WITH_ROOM} WHERE s.booking_id = $1{lock}", booking_id
    )
    return None if row is None else _booking(row)


async def mark_payment(
    connection: Connection, booking_id: uuid.UUID, *, expected: PaymentStatus, new: PaymentStatus
) -> bool:
    result = await connection.execute(
        """UPDATE booking.sessions SET payment_status = $3, updated_at = now()
            WHERE booking_id = $1 AND payment_status = $2""",
        booking_id,
        expected.value,
        new.value,
    )
    return bool(result == "UPDATE 1")


async def cancel_booking(
    connection: Connection,
    booking_id: uuid.UUID,
    *,
    actor: Actor,
    reason: CancelReason,
    refunded_credits: int,
    payment_status: PaymentStatus,
) -> Booking:
    row = await connection.fetchrow(
        f"""UPDATE booking.sessions
               SET status = 'cancelled', cancelled_by = $2, cancel_reason = $3, refunded_credits = $4,
                   payment_status = $5, cancelled_at = now(), updated_at = now()
             WHERE booking_id = $1
         RETURNING {_BOOKING_COLUMNS}""",
        booking_id,
        actor.value,
        reason.value,
        refunded_credits,
        payment_status.value,
    )
    assert row is not None
    return _booking(row)


async def move_booking(
    connection: Connection,
    booking_id: uuid.UUID,
    starts_at: datetime,
    ends_at: datetime,
    blocked: tuple[datetime, datetime],
) -> Booking:
    row = await connection.fetchrow(
        f"""UPDATE booking.sessions
               SET starts_at = $2, ends_at = $3, blocked = tstzrange($4, $5, '[)'),
                   reschedule_count = reschedule_count + 1, updated_at = now()
             WHERE booking_id = $1
         RETURNING {_BOOKING_COLUMNS}""",
        booking_id,
        starts_at,
        ends_at,
        blocked[0],
        blocked[1],
    )
    assert row is not None
    return _booking(row)


async def claim_reschedule(
    connection: Connection, request_id: str, booking_id: uuid.UUID, fingerprint: str
) -> str | None:
    """None if this reschedule request is new (and now recorded), else the recorded fingerprint."""
    row = await connection.fetchrow(
        """INSERT INTO booking.reschedules (request_id, booking_id, fingerprint) VALUES ($1, $2, $3)
           ON CONFLICT (request_id) DO NOTHING RETURNING request_id""",
        request_id,
        booking_id,
        fingerprint,
    )
    if row is not None:
        return None
    value = await connection.fetchval("SELECT fingerprint FROM booking.reschedules WHERE request_id = $1", request_id)
    return str(value)


# Open ends of the listing's keyset cursor: the statement always compares with a bound (never
# `$n IS NULL OR ...`), so that in a generic plan the cursor and the time range stay index
# conditions of sessions_by_client / sessions_by_therapist and a deep page reads only its rows.
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_NIL_ID = uuid.UUID(int=0)


def list_bookings_sql(*, by_client: bool) -> str:
    """The listing's statement, by client or by therapist (the API asks for exactly one)."""
    owner = "s.client_id" if by_client else "s.therapist_id"
    return f"""SELECT {_BOOKING_WITH_ROOM} FROM {_SESSIONS_WITH_ROOM}
             WHERE {owner} = $1
               AND (s.starts_at, s.booking_id) > ($2, $3::uuid)
               AND s.starts_at < $4
               AND ($5::text IS NULL OR s.status = $5)
             ORDER BY s.starts_at, s.booking_id
             LIMIT $6"""


async def list_bookings(
    connection: Connection,
    *,
    client_id: uuid.UUID | None,
    therapist_id: uuid.UUID | None,
    start_after: datetime | None,
    start_before: datetime | None,
    status: BookingStatus | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Booking]:
    """By start time; `after` is the (starts_at, booking_id) of the previous page's last row.
    Exactly one of `client_id` and `therapist_id` (the servicer checks)."""
    assert (client_id is None) != (therapist_id is None), "exactly one of client_id and therapist_id"
    # (starts_at, id) > (start_after, nil) is starts_at >= start_after: every id is above the nil UUID.
    cursor = after or (start_after or _EARLIEST, _NIL_ID)
    rows = await connection.fetch(
        list_bookings_sql(by_client=client_id is not None),
        client_id or therapist_id,
        cursor[0],
        cursor[1],
        start_before or _LATEST,
        status.value if status else None,
        limit,
    )
    return [_booking(row) for row in rows]


# --- outbox ---


async def enqueue(
    connection: Connection, kind: str, booking_id: uuid.UUID, payload: dict[str, object] | None = None
) -> uuid.UUID:
    event_id = uuid.uuid4()
    await connection.execute(
        "INSERT INTO booking.outbox (event_id, kind, booking_id, payload) VALUES ($1, $2, $3, $4::jsonb)",
        event_id,
        kind,
        booking_id,
        json.dumps(payload or {}),
    )
    return event_id


async def outbox_delivered(connection: Connection, booking_id: uuid.UUID, kind: str) -> None:
    """Marks pending rows of a kind delivered, when the work was done inline."""
    await connection.execute(
        """UPDATE booking.outbox SET status = 'delivered', updated_at = now()
            WHERE booking_id = $1 AND kind = $2 AND status = 'pending'""",
        booking_id,
        kind,
    )


@dataclass(frozen=True)
class OutboxEvent:
    event_id: uuid.UUID
    kind: str
    booking_id: uuid.UUID
    payload: dict[str, object]
    attempts: int


async def lease_due_events(connection: Connection, limit: int, lease_s: float) -> list[OutboxEvent]:
    """Takes a lease on up to `limit` due events: their next attempt moves `lease_s` ahead, so no
    other worker takes them meanwhile, and no transaction stays open while they are delivered.
    A worker that dies mid-delivery leaves the event to be taken again when its lease runs out
    (at-least-once). SKIP LOCKED keeps concurrent workers off each other's rows."""
    rows = await connection.fetch(
        """UPDATE booking.outbox o
              SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
             FROM (SELECT event_id FROM booking.outbox
                    WHERE status = 'pending' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at, created_at
                    LIMIT $1
                    FOR UPDATE SKIP LOCKED) due
            WHERE o.event_id = due.event_id
        RETURNING o.event_id, o.kind, o.booking_id, o.payload, o.attempts""",
        limit,
        lease_s,
    )
    return [
        OutboxEvent(row["event_id"], row["kind"], row["booking_id"], json.loads(row["payload"]), row["attempts"])
        for row in rows
    ]


async def finish_events(
    connection: Connection,
    event_ids: Sequence[uuid.UUID],
    rooms: dict[uuid.UUID, tuple[VideoRoomState, str | None]],
) -> None:
    """Marks many events delivered and sets the video rooms' new states, in one statement (so
    atomically): a room's state never says more than its events' delivery does."""
    await connection.execute(
        """WITH rooms AS (
               UPDATE booking.video_rooms v
                  SET state = r.state, url = r.url, failure_reason = NULL, updated_at = now()
                 FROM unnest($2::uuid[], $3::text[], $4::text[]) AS r(booking_id, state, url)
                WHERE v.booking_id = r.booking_id
           )
           UPDATE booking.outbox SET status = 'delivered', attempts = attempts + 1, updated_at = now()
            WHERE event_id = ANY($1::uuid[])""",
        list(event_ids),
        list(rooms),
        [state.value for state, _ in rooms.values()],
        [url for _, url in rooms.values()],
    )


async def retry_event(connection: Connection, event_id: uuid.UUID, delay_s: float, error: str, *, dead: bool) -> None:
    await connection.execute(
        """UPDATE booking.outbox
              SET attempts = attempts + 1, last_error = $3, updated_at = now(),
                  next_attempt_at = now() + make_interval(secs => $2),
                  status = CASE WHEN $4 THEN 'dead' ELSE 'pending' END
            WHERE event_id = $1""",
        event_id,
        delay_s,
        error[:1000],
        dead,
    )


async def outbox_pending_count(connection: Connection) -> int:
    """Outbox rows still pending, for the metrics: an index-only count over outbox_due, whose
    rows are the few commits and refunds in flight."""
    count = await connection.fetchval("SELECT count(*) FROM booking.outbox WHERE status = 'pending'")
    return int(count)


async def outbox_dead_count(connection: Connection) -> int:
    """Dead outbox rows, for the metrics (through the outbox_dead_letters index since 0002; the
    metrics still run it rarely, *_METRICS_SCAN_INTERVAL_S)."""
    count = await connection.fetchval("SELECT count(*) FROM booking.outbox WHERE status = 'dead'")
    return int(count)


async def retry_event_at(connection: Connection, event_id: uuid.UUID, delay_s: float, error: str) -> None:
    """A receiver asked for a later attempt (429 Retry-After): the attempt counts, no backoff."""
    await retry_event(connection, event_id, delay_s, error, dead=False)


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
    rows = await connection.fetch(
        f"""SELECT {_DEAD_LETTER_COLUMNS} FROM booking.outbox
             WHERE status = 'dead'
               AND ($1::timestamptz IS NULL OR (updated_at, event_id) < ($1, $2::uuid))
             ORDER BY updated_at DESC, event_id DESC
             LIMIT $3""",
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [DeadLetter(**dict(row)) for row in rows]


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


# --- video rooms ---


async def set_video_room(
    connection: Connection,
    booking_id: uuid.UUID,
    state: VideoRoomState,
    *,
    url: str | None = None,
    failure_reason: str | None = None,
) -> None:
    await connection.execute(
        """UPDATE booking.video_rooms SET state = $2, url = $3, failure_reason = $4, updated_at = now()
            WHERE booking_id = $1""",
        booking_id,
        state.value,
        url,
        None if failure_reason is None else failure_reason[:1000],
    )
