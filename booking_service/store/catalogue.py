"""The catalogue's SQL: therapists, their schedules and session types, and what a booking's
rules read of them in one round trip."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from asyncpg import Range

from booking_service.domain import DateOverride, SessionType, Therapist, WeeklyWindowMinutes
from booking_service.store import rows
from service_kit.connection import Connection


async def insert_therapist(connection: Connection, request_id: str, therapist: Therapist) -> Therapist | None:
    """The new therapist, or None when request_id was used before."""
    row = await connection.fetchrow(
        f"""INSERT INTO booking.therapists
               (therapist_id, request_id, display_name, time_zone, buffer_before_minutes,
                buffer_after_minutes, minimum_notice_minutes, booking_horizon_days, languages, specialties)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING {rows.THERAPIST_COLUMNS}""",
        therapist.therapist_id,
        request_id,
        therapist.display_name,
        therapist.time_zone,
        therapist.buffer_before_minutes,
        therapist.buffer_after_minutes,
        therapist.minimum_notice_minutes,
        therapist.booking_horizon_days,
        list(therapist.languages),
        list(therapist.specialties),
    )
    return None if row is None else rows.therapist(row)


async def therapist_by_request(connection: Connection, request_id: str) -> Therapist | None:
    row = await connection.fetchrow(
        f"SELECT {rows.THERAPIST_COLUMNS} FROM booking.therapists WHERE request_id = $1", request_id
    )
    return None if row is None else rows.therapist(row)


async def fetch_therapist(
    connection: Connection, therapist_id: uuid.UUID, *, for_update: bool = False
) -> Therapist | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await connection.fetchrow(
        f"SELECT {rows.THERAPIST_COLUMNS} FROM booking.therapists WHERE therapist_id = $1{lock}", therapist_id
    )
    return None if row is None else rows.therapist(row)


async def update_therapist(connection: Connection, therapist: Therapist) -> Therapist:
    row = await connection.fetchrow(
        f"""UPDATE booking.therapists
               SET display_name = $2, time_zone = $3, buffer_before_minutes = $4, buffer_after_minutes = $5,
                   minimum_notice_minutes = $6, booking_horizon_days = $7, languages = $8, specialties = $9,
                   updated_at = now()
             WHERE therapist_id = $1
         RETURNING {rows.THERAPIST_COLUMNS}""",
        therapist.therapist_id,
        therapist.display_name,
        therapist.time_zone,
        therapist.buffer_before_minutes,
        therapist.buffer_after_minutes,
        therapist.minimum_notice_minutes,
        therapist.booking_horizon_days,
        list(therapist.languages),
        list(therapist.specialties),
    )
    assert row is not None
    return rows.therapist(row)


async def set_archived(connection: Connection, therapist_id: uuid.UUID, *, archived: bool) -> Therapist | None:
    """Archives or restores the therapist; None when there is no such therapist. A therapist
    already in the asked state is returned untouched (no update, so no new schedule_version)."""
    row = await connection.fetchrow(
        f"""WITH changed AS (
                UPDATE booking.therapists
                   SET archived_at = CASE WHEN $2 THEN now() END, updated_at = now()
                 WHERE therapist_id = $1 AND (archived_at IS NOT NULL) <> $2
             RETURNING {rows.THERAPIST_COLUMNS})
            SELECT {rows.THERAPIST_COLUMNS} FROM changed
             UNION ALL
            SELECT {rows.THERAPIST_COLUMNS} FROM booking.therapists
             WHERE therapist_id = $1 AND NOT EXISTS (SELECT 1 FROM changed)""",
        therapist_id,
        archived,
    )
    return None if row is None else rows.therapist(row)


async def replace_weekly_windows(
    connection: Connection, therapist_id: uuid.UUID, windows: list[WeeklyWindowMinutes]
) -> None:
    await connection.execute("DELETE FROM booking.weekly_windows WHERE therapist_id = $1", therapist_id)
    await connection.executemany(
        "INSERT INTO booking.weekly_windows (therapist_id, weekday, start_minute, end_minute) VALUES ($1, $2, $3, $4)",
        [(therapist_id, w.weekday, w.start_minute, w.end_minute) for w in windows],
    )


async def weekly_windows(connection: Connection, therapist_id: uuid.UUID) -> list[WeeklyWindowMinutes]:
    found = await connection.fetch(
        """SELECT weekday, start_minute, end_minute FROM booking.weekly_windows
            WHERE therapist_id = $1 ORDER BY weekday, start_minute""",
        therapist_id,
    )
    return [WeeklyWindowMinutes(**dict(row)) for row in found]


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
    found = await connection.fetch(
        """SELECT local_date, windows FROM booking.date_overrides
            WHERE therapist_id = $1 AND ($2::date IS NULL OR local_date >= $2)
            ORDER BY local_date""",
        therapist_id,
        date.fromisoformat(from_date) if from_date else None,
    )
    return [
        DateOverride(row["local_date"].isoformat(), tuple((r.lower, r.upper) for r in row["windows"])) for row in found
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
        f"""SELECT {", ".join(f"t.{column}" for column in rows.THERAPIST_FIELDS)}, t.schedule_version,
                   {", ".join(f"st.{column} AS st_{column}" for column in rows.SESSION_TYPE_FIELDS)},
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
    therapist = rows.therapist(row)
    session_type = None if row["st_session_type_id"] is None else rows.session_type(row, "st_")
    weekly, overrides = schedule_rows(row)
    return BookingContext(therapist, session_type, weekly, overrides, row["schedule_version"])


def schedule_rows(row: Any) -> tuple[list[WeeklyWindowMinutes], list[DateOverride]]:
    """The weekly windows and date overrides of a row with the arrays `weekly`, `override_dates`
    and `override_windows` (windows flattened as (date, start, end) in array order)."""
    weekly = [WeeklyWindowMinutes(weekday, start, end) for weekday, start, end in row["weekly"]]
    windows: dict[date, list[tuple[int, int]]] = {local_date: [] for local_date in row["override_dates"]}
    for local_date, start, end in row["override_windows"]:
        windows[local_date].append((start, end))
    overrides = [DateOverride(local_date.isoformat(), tuple(spans)) for local_date, spans in windows.items()]
    return weekly, overrides


async def insert_session_type(connection: Connection, request_id: str, session_type: SessionType) -> SessionType | None:
    row = await connection.fetchrow(
        f"""INSERT INTO booking.session_types
               (session_type_id, therapist_id, request_id, name, duration_minutes, credit_cost,
                late_cancel_notice_minutes, late_cancel_refund_percent, no_show_refund_percent, start_step_minutes)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING {rows.SESSION_TYPE_COLUMNS}""",
        session_type.session_type_id,
        session_type.therapist_id,
        request_id,
        session_type.name,
        session_type.duration_minutes,
        session_type.credit_cost,
        session_type.late_cancel_notice_minutes,
        session_type.late_cancel_refund_percent,
        session_type.no_show_refund_percent,
        session_type.start_step_minutes,
    )
    return None if row is None else rows.session_type(row)


async def session_type_by_request(connection: Connection, request_id: str) -> SessionType | None:
    row = await connection.fetchrow(
        f"SELECT {rows.SESSION_TYPE_COLUMNS} FROM booking.session_types WHERE request_id = $1", request_id
    )
    return None if row is None else rows.session_type(row)


async def session_types(
    connection: Connection, therapist_id: uuid.UUID, *, include_retired: bool = True
) -> list[SessionType]:
    found = await connection.fetch(
        f"""SELECT {rows.SESSION_TYPE_COLUMNS} FROM booking.session_types
             WHERE therapist_id = $1 AND ($2 OR retired_at IS NULL)
             ORDER BY created_at, session_type_id""",
        therapist_id,
        include_retired,
    )
    return [rows.session_type(row) for row in found]


async def fetch_session_type(
    connection: Connection, therapist_id: uuid.UUID, session_type_id: uuid.UUID
) -> SessionType | None:
    """The session type if it is this therapist's (another therapist's is as good as missing)."""
    row = await connection.fetchrow(
        f"""SELECT {rows.SESSION_TYPE_COLUMNS} FROM booking.session_types
             WHERE session_type_id = $1 AND therapist_id = $2""",
        session_type_id,
        therapist_id,
    )
    return None if row is None else rows.session_type(row)


async def update_session_type(connection: Connection, session_type: SessionType) -> SessionType:
    """Writes the name, the price and the refund policy (the trigger of migration 0006 moves the
    therapist's schedule_version on, so no replica books with the old price from memory)."""
    row = await connection.fetchrow(
        f"""UPDATE booking.session_types
               SET name = $2, credit_cost = $3, late_cancel_notice_minutes = $4,
                   late_cancel_refund_percent = $5, no_show_refund_percent = $6, updated_at = now()
             WHERE session_type_id = $1
         RETURNING {rows.SESSION_TYPE_COLUMNS}""",
        session_type.session_type_id,
        session_type.name,
        session_type.credit_cost,
        session_type.late_cancel_notice_minutes,
        session_type.late_cancel_refund_percent,
        session_type.no_show_refund_percent,
    )
    assert row is not None
    return rows.session_type(row)


async def retire_session_type(connection: Connection, session_type_id: uuid.UUID) -> SessionType:
    """Retires it now, or leaves a retired one as it is (so its retire time stays the first)."""
    row = await connection.fetchrow(
        f"""UPDATE booking.session_types SET retired_at = coalesce(retired_at, now()), updated_at = now()
             WHERE session_type_id = $1
         RETURNING {rows.SESSION_TYPE_COLUMNS}""",
        session_type_id,
    )
    assert row is not None
    return rows.session_type(row)


async def busy_ranges(
    connection: Connection, windows: Sequence[tuple[uuid.UUID, datetime, datetime]]
) -> dict[uuid.UUID, list[tuple[datetime, datetime]]]:
    """The blocked ranges of confirmed sessions touching each (therapist, start, end) window, by
    therapist, in order: one statement for one therapist (ListAvailableSlots) or many
    (SearchAvailability), so both see the calendar the same way."""
    found = await connection.fetch(
        """SELECT s.therapist_id, lower(s.blocked) AS start, upper(s.blocked) AS end
             FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(therapist_id, low, high)
             JOIN booking.sessions s ON s.therapist_id = w.therapist_id
            WHERE s.status = 'confirmed' AND s.blocked && tstzrange(w.low, w.high, '[)')
            ORDER BY s.therapist_id, lower(s.blocked)""",
        [therapist_id for therapist_id, _, _ in windows],
        [start for _, start, _ in windows],
        [end for _, _, end in windows],
    )
    busy: dict[uuid.UUID, list[tuple[datetime, datetime]]] = {therapist_id: [] for therapist_id, _, _ in windows}
    for row in found:
        busy[row["therapist_id"]].append((row["start"], row["end"]))
    return busy
