"""The calendar's SQL: sessions, the answers of requests, and the protocol's two statements
(booking.look_up and booking.decide, migration 0005)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
from asyncpg import Range

from booking_service.decisions import (
    Answer,
    Answered,
    Busy,
    Changed,
    Decision,
    Move,
    Moved,
    Place,
    Placed,
    PlaceSeries,
    Proposal,
    Refusal,
    Refuse,
    SeriesDecided,
    Stale,
    Unanswered,
)
from booking_service.domain import (
    Actor,
    Booking,
    BookingStatus,
    CalendarBusy,
    CancelReason,
    PaymentStatus,
    SessionsOverlap,
    VideoRoomState,
)
from booking_service.store import rows
from service_kit.connection import Connection

# The exclusion constraint that is the last line against double booking (migration 0001).
NO_OVERLAP_CONSTRAINT = "sessions_no_overlap"


async def look_up(
    connection: Connection, items: Sequence[tuple[uuid.UUID, uuid.UUID, tuple[datetime, datetime] | None]]
) -> list[Answer | Unanswered]:
    """For each (request key, therapist, blocked range or None): the request's answer, or whether
    the slot is taken and the therapist's schedule version. One read-only statement."""
    found = await connection.fetch(
        """SELECT * FROM booking.look_up($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[])
            ORDER BY item_position""",
        [key for key, _, _ in items],
        [therapist_id for _, therapist_id, _ in items],
        [blocked[0] if blocked else None for _, _, blocked in items],
        [blocked[1] if blocked else None for _, _, blocked in items],
    )
    assert len(found) == len(items), (len(found), len(items))
    return [_answer(row) if row["answered"] else Unanswered(row["conflict"], row["schedule_version"]) for row in found]


def _answer(row: asyncpg.Record) -> Answer:
    metadata = rows.json_object(row["refusal_metadata"])
    if row["refusal_reason"] is not None:
        refusal = Refusal(row["refusal_reason"], row["refusal_message"], metadata)
        return Answer(row["fingerprint"], _session(row), refusal)
    return Answer(row["fingerprint"], _session(row), None, metadata)


def _session(row: asyncpg.Record) -> Booking | None:
    """The `session` and `room` composites of booking.look_up and booking.decide, as a booking."""
    session, room = row["session"], row["room"]
    if session is None:
        return None
    return rows.booking(session, None if room is None else rows.video_room(room))


_PROPOSAL_KINDS = {Place: "place", Move: "move", Refuse: "refuse"}
# Where an occurrence of a series is named in its refusal's metadata, with its index.
OCCURRENCE_KEY_PREFIX = "occurrence_"


def _composites(proposal: Proposal) -> list[tuple[object, ...]]:
    """A proposal as booking.proposal composites: one, or a series' one per occurrence."""
    if not isinstance(proposal, PlaceSeries):
        return [_proposal(proposal)]
    kind = "series_partial" if proposal.skip_unavailable else "series"
    found: list[tuple[object, ...]] = []
    for occurrence in proposal.occurrences:
        booking, refusal, blocked = occurrence.booking, occurrence.refusal, occurrence.blocked
        found.append(
            (
                *(kind, proposal.request_key, proposal.fingerprint, proposal.therapist_id, proposal.schedule_version),
                *(booking.booking_id, occurrence.index, None, booking.request_id, booking.client_id),
                *(booking.session_type_id, booking.starts_at, booking.ends_at),
                None if blocked is None else Range(blocked.start, blocked.end),
                *(booking.time_zone, booking.credit_cost, occurrence.video_room_name, json.dumps(occurrence.event)),
                *(refusal.reason, refusal.message, json.dumps(dict(refusal.metadata))),
            )
        )
    return found


def _proposal(proposal: Place | Move | Refuse) -> tuple[object, ...]:
    """A proposal as a booking.proposal composite, in the type's field order."""
    if isinstance(proposal, Refuse):
        refusal = proposal.refusal
        return (
            *("refuse", proposal.request_key, proposal.fingerprint, proposal.therapist_id, None),
            *(proposal.booking_id, None, None, None, None, None, None, None, None, None, None, None, None),
            *(refusal.reason, refusal.message, json.dumps(dict(refusal.metadata))),
        )
    booking = proposal.booking
    if isinstance(proposal, Place):
        starts_at, ends_at, version, now, room = (
            booking.starts_at,
            booking.ends_at,
            None,
            None,
            proposal.video_room_name,
        )
    else:
        starts_at, ends_at, version, now, room = (
            *(proposal.starts_at, proposal.ends_at, booking.reschedule_count, proposal.now, None),
        )
    taken = proposal.if_taken
    return (
        *(_PROPOSAL_KINDS[type(proposal)], proposal.request_key, proposal.fingerprint, booking.therapist_id),
        *(proposal.schedule_version, booking.booking_id, version, now, booking.request_id, booking.client_id),
        *(booking.session_type_id, starts_at, ends_at, Range(proposal.blocked.start, proposal.blocked.end)),
        *(booking.time_zone, booking.credit_cost, room, json.dumps(proposal.event)),
        *(taken.reason, taken.message, json.dumps(dict(taken.metadata))),
    )


async def decide(
    connection: Connection, proposals: Sequence[Proposal], *, wait: bool, lock_timeout_ms: int
) -> list[Decision]:
    """The locked step for each proposal, in one statement and one transaction (booking.decide).
    Raises CalendarBusy when waiting for a lock takes longer than `lock_timeout_ms`, and
    SessionsOverlap when the exclusion constraint refuses a session the check let through (the
    whole statement is then undone: the caller decides each proposal alone)."""
    composites = [_composites(proposal) for proposal in proposals]
    try:
        found = await connection.fetch(
            "SELECT * FROM booking.decide($1::booking.proposal[], $2, $3) ORDER BY item_position",
            [row for rows_of_one in composites for row in rows_of_one],
            wait,
            lock_timeout_ms,
        )
    except asyncpg.LockNotAvailableError:
        raise CalendarBusy("the therapist's calendar is busy; retry with the same request_id") from None
    except asyncpg.ExclusionViolationError as error:
        if error.constraint_name != NO_OVERLAP_CONSTRAINT:
            raise
        raise SessionsOverlap("the exclusion constraint refused an overlapping session") from None
    assert len(found) == sum(len(rows_of_one) for rows_of_one in composites), (len(found), len(proposals))
    decisions: list[Decision] = []
    position = 0
    for proposal, rows_of_one in zip(proposals, composites, strict=True):
        mine = found[position : position + len(rows_of_one)]
        position += len(rows_of_one)
        decisions.append(_series_decision(mine) if isinstance(proposal, PlaceSeries) else _decision(mine[0]))
    return decisions


def _series_decision(found: Sequence[asyncpg.Record]) -> Decision:
    """The rows of one series' occurrences (booking.decide_series) as one decision."""
    outcomes = {row["outcome"] for row in found}
    if outcomes == {"busy"}:
        return Busy()
    if outcomes == {"stale"}:
        return Stale()
    first = found[0]
    bookings = tuple(sorted((b for b in map(_session, found) if b is not None), key=lambda b: b.series_index or 0))
    if outcomes <= {"placed", "skipped"}:
        skipped = {index: reason for row in found if row["outcome"] == "skipped" for index, reason in _named(row)}
        return SeriesDecided(True, Answer(first["fingerprint"], None, None), bookings, skipped)
    assert len(outcomes) == 1 and outcomes <= {"answered", "refused"}, outcomes
    answer = _answer(first)
    return SeriesDecided(False, replace(answer, booking=None), bookings, dict(_named(first)))


def _named(row: asyncpg.Record) -> list[tuple[int, str]]:
    """The occurrences a refusal's metadata names, with their reasons."""
    metadata = rows.json_object(row["refusal_metadata"])
    return [
        (int(key.removeprefix(OCCURRENCE_KEY_PREFIX)), str(reason))
        for key, reason in metadata.items()
        if key.startswith(OCCURRENCE_KEY_PREFIX) and key.removeprefix(OCCURRENCE_KEY_PREFIX).isdigit()
    ]


def _decision(row: asyncpg.Record) -> Decision:
    outcome = row["outcome"]
    booking = _session(row)
    if outcome == "placed":
        assert booking is not None, row
        return Placed(booking)
    if outcome == "moved":
        assert booking is not None, row
        return Moved(booking)
    if outcome in ("answered", "refused"):
        return Answered(_answer(row))
    nothing_written: dict[str, Decision] = {"stale": Stale(), "changed": Changed(), "busy": Busy()}
    return nothing_written[outcome]


async def mark_paid(connection: Connection, booking_ids: Sequence[uuid.UUID]) -> None:
    """Bookings whose holds were committed become PAID, if still COMMITTING, in one statement.
    update_time stays: a booking's answer says PAID as soon as its hold is committed, and a repeat
    of the request must give the same answer (the mark is bookkeeping behind it)."""
    await connection.execute(
        """UPDATE booking.sessions SET payment_status = 'paid'
            WHERE booking_id = ANY($1::uuid[]) AND payment_status = 'committing'""",
        list(booking_ids),
    )


async def fetch_booking(connection: Connection, booking_id: uuid.UUID, *, for_update: bool = False) -> Booking | None:
    lock = " FOR UPDATE OF s" if for_update else ""  # not the room: the nullable side of the join
    row = await connection.fetchrow(
        f"SELECT {rows.BOOKING_WITH_ROOM} FROM {rows.SESSIONS_WITH_ROOM} WHERE s.booking_id = $1{lock}", booking_id
    )
    return None if row is None else rows.booking(row)


async def fetch_bookings(connection: Connection, booking_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Booking]:
    found = await connection.fetch(
        f"SELECT {rows.BOOKING_WITH_ROOM} FROM {rows.SESSIONS_WITH_ROOM} WHERE s.booking_id = ANY($1::uuid[])",
        list(booking_ids),
    )
    bookings = [rows.booking(row) for row in found]
    return {booking.booking_id: booking for booking in bookings}


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
                   payment_status = $5, cancelled_at = coalesce(cancelled_at, now()), updated_at = now()
             WHERE booking_id = $1
         RETURNING {rows.BOOKING_COLUMNS}""",
        booking_id,
        actor.value,
        reason.value,
        refunded_credits,
        payment_status.value,
    )
    assert row is not None
    return rows.booking(row)


# Open ends of the listing's keyset cursor: the statement always compares with a bound (never
# `$n IS NULL OR ...`), so that in a generic plan the cursor and the time range stay index
# conditions of sessions_by_client / sessions_by_therapist and a deep page reads only its rows.
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_NIL_ID = uuid.UUID(int=0)


def list_bookings_sql(*, by_client: bool) -> str:
    """The listing's statement, by client or by therapist (the API asks for exactly one)."""
    owner = "s.client_id" if by_client else "s.therapist_id"
    return f"""SELECT {rows.BOOKING_WITH_ROOM} FROM {rows.SESSIONS_WITH_ROOM}
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
    found = await connection.fetch(
        list_bookings_sql(by_client=client_id is not None),
        client_id or therapist_id,
        cursor[0],
        cursor[1],
        start_before or _LATEST,
        status.value if status else None,
        limit,
    )
    return [rows.booking(row) for row in found]


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


async def record_legacy_abort(connection: Connection, reservation_id: uuid.UUID) -> str:
    """For a hold of the previous version: records `abort` in booking.decisions unless a decision
    exists, and returns the decision that stands ('commit' or 'abort'). Goes with that version."""
    row = await connection.fetchrow(
        """WITH inserted AS (
               INSERT INTO booking.decisions (reservation_id, decision) VALUES ($1, 'abort')
               ON CONFLICT (reservation_id) DO NOTHING RETURNING decision)
           SELECT decision FROM inserted
           UNION ALL
           SELECT decision FROM booking.decisions WHERE reservation_id = $1
           LIMIT 1""",
        reservation_id,
    )
    if row is None:  # the conflicting row committed after this statement's snapshot: read it now
        row = await connection.fetchrow(
            "SELECT decision FROM booking.decisions WHERE reservation_id = $1", reservation_id
        )
    assert row is not None
    return str(row["decision"])
