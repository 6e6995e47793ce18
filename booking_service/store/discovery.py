"""Discovery's SQL: therapists filtered and paged in creation order, and what the availability
search reads of a page of them in one round trip."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

from booking_service.domain import DateOverride, SessionType, Therapist, WeeklyWindowMinutes
from booking_service.store import rows
from booking_service.store.catalogue import schedule_rows
from service_kit.connection import Connection


@dataclass(frozen=True)
class TherapistFilter:
    """What ListTherapists and SearchAvailability filter on; every condition must hold. The price
    bounds and the duration hold for one and the same bookable (not retired) session type."""

    languages: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()
    time_zones: tuple[str, ...] = ()
    min_credit_cost: int = 0
    max_credit_cost: int = 0  # 0: no bound
    duration_minutes: int = 0  # 0: any
    include_archived: bool = False

    @property
    def needs_session_type(self) -> bool:
        return bool(self.min_credit_cost or self.max_credit_cost or self.duration_minutes)


def list_therapists_sql(where: TherapistFilter) -> str:
    """The listing's statement for one shape of filter: only the conditions the filter has, the
    others a one-time check of their parameter. The keyset cursor (created_at, therapist_id) >
    ($1, $2) is an index condition on therapists_by_creation in the generic plan of every shape
    (tests/integration/test_listing_plans.py); the conditions filter the rows that index walks."""
    languages = "t.languages @> $4::text[]" if where.languages else "cardinality($4::text[]) = 0"
    specialties = "t.specialties @> $5::text[]" if where.specialties else "cardinality($5::text[]) = 0"
    zones = "t.time_zone = ANY($6::text[])" if where.time_zones else "cardinality($6::text[]) = 0"
    session_type = (
        """EXISTS (SELECT 1 FROM booking.session_types st
                    WHERE st.therapist_id = t.therapist_id AND st.retired_at IS NULL
                      AND st.credit_cost >= $7 AND ($8::bigint = 0 OR st.credit_cost <= $8)
                      AND ($9::integer = 0 OR st.duration_minutes = $9))"""
        if where.needs_session_type
        else "$7::bigint = 0 AND $8::bigint = 0 AND $9::integer = 0"
    )
    archived = "$3::boolean" if where.include_archived else "NOT $3::boolean AND t.archived_at IS NULL"
    return f"""SELECT {rows.THERAPIST_COLUMNS} FROM booking.therapists t
                WHERE (t.created_at, t.therapist_id) > ($1, $2::uuid)
                  AND {archived} AND {languages} AND {specialties} AND {zones} AND {session_type}
                ORDER BY t.created_at, t.therapist_id
                LIMIT $10"""


async def list_therapists(
    connection: Connection, where: TherapistFilter, after: tuple[datetime, uuid.UUID], limit: int
) -> list[Therapist]:
    """Therapists matching `where` after the cursor `after` ((created_at, therapist_id) of the
    previous page's last row; the nil cursor for the first page), in that order."""
    found = await connection.fetch(
        list_therapists_sql(where),
        after[0],
        after[1],
        where.include_archived,
        list(where.languages),
        list(where.specialties),
        list(where.time_zones),
        where.min_credit_cost,
        where.max_credit_cost,
        where.duration_minutes,
        limit,
    )
    return [rows.therapist(row) for row in found]


@dataclass(frozen=True)
class Candidate:
    """What the availability search needs of one therapist: the schedule's parts (overrides of
    the searched dates only) and the session types that fit the search."""

    therapist: Therapist
    weekly: list[WeeklyWindowMinutes]
    overrides: list[DateOverride]
    session_types: list[SessionType]


async def candidates(
    connection: Connection,
    therapists: list[Therapist],
    where: TherapistFilter,
    first_date: date,
    last_date: date,
) -> list[Candidate]:
    """The schedules and fitting session types of `therapists`, in one statement, in their order.
    Overrides are read for local dates first_date..last_date (the caller pads the range: any
    date a zone can put the searched instants on)."""
    found = await connection.fetch(
        f"""SELECT t.therapist_id,
                   ARRAY(SELECT ROW(w.weekday, w.start_minute, w.end_minute) FROM booking.weekly_windows w
                          WHERE w.therapist_id = t.therapist_id ORDER BY w.weekday, w.start_minute) AS weekly,
                   ARRAY(SELECT o.local_date FROM booking.date_overrides o
                          WHERE o.therapist_id = t.therapist_id AND o.local_date BETWEEN $2 AND $3
                          ORDER BY o.local_date) AS override_dates,
                   ARRAY(SELECT ROW(o.local_date, lower(w.window_range), upper(w.window_range))
                           FROM booking.date_overrides o, unnest(o.windows) WITH ORDINALITY AS w(window_range, position)
                          WHERE o.therapist_id = t.therapist_id AND o.local_date BETWEEN $2 AND $3
                          ORDER BY o.local_date, w.position) AS override_windows,
                   ARRAY(SELECT ROW({", ".join(f"st.{column}" for column in rows.SESSION_TYPE_FIELDS)})
                           FROM booking.session_types st
                          WHERE st.therapist_id = t.therapist_id AND st.retired_at IS NULL
                            AND st.credit_cost >= $4 AND ($5::bigint = 0 OR st.credit_cost <= $5)
                            AND ($6::integer = 0 OR st.duration_minutes = $6)
                          ORDER BY st.credit_cost, st.created_at, st.session_type_id) AS session_types
              FROM unnest($1::uuid[]) AS t(therapist_id)""",
        [therapist.therapist_id for therapist in therapists],
        first_date,
        last_date,
        where.min_credit_cost,
        where.max_credit_cost,
        where.duration_minutes,
    )
    by_id = {row["therapist_id"]: row for row in found}
    result = []
    for therapist in therapists:
        row = by_id[therapist.therapist_id]
        weekly, overrides = schedule_rows(row)
        session_types = [
            SessionType(**dict(zip(rows.SESSION_TYPE_FIELDS, values, strict=True))) for values in row["session_types"]
        ]
        result.append(Candidate(therapist, weekly, overrides, session_types))
    return result
