"""Rows as domain values: the column lists the statements select, and their decoders."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from booking_service.domain import (
    Actor,
    Booking,
    BookingStatus,
    CancelReason,
    PaymentStatus,
    SessionOutcome,
    SessionType,
    Therapist,
    VideoRoom,
    VideoRoomState,
)

THERAPIST_FIELDS = (
    "therapist_id",
    "display_name",
    "time_zone",
    "buffer_before_minutes",
    "buffer_after_minutes",
    "minimum_notice_minutes",
    "booking_horizon_days",
    "created_at",
    "updated_at",
    "languages",
    "specialties",
    "archived_at",
)
THERAPIST_COLUMNS = ", ".join(THERAPIST_FIELDS)
SESSION_TYPE_FIELDS = (
    "session_type_id",
    "therapist_id",
    "name",
    "duration_minutes",
    "credit_cost",
    "late_cancel_notice_minutes",
    "late_cancel_refund_percent",
    "no_show_refund_percent",
    "start_step_minutes",
    "retired_at",
)
SESSION_TYPE_COLUMNS = ", ".join(SESSION_TYPE_FIELDS)
BOOKING_FIELDS = (
    "booking_id",
    "request_id",
    "client_id",
    "therapist_id",
    "session_type_id",
    "starts_at",
    "ends_at",
    "time_zone",
    "credit_cost",
    "status",
    "payment_status",
    "cancelled_by",
    "cancel_reason",
    "refunded_credits",
    "cancelled_at",
    "reschedule_count",
    "created_at",
    "updated_at",
    "series_id",
    "series_index",
    "outcome",
    "outcome_by",
    "outcome_at",
)
BOOKING_COLUMNS = ", ".join(BOOKING_FIELDS)
# A booking with its video room: the reads join it in.
BOOKING_WITH_ROOM = (
    ", ".join(f"s.{column}" for column in BOOKING_FIELDS)
    + ", v.state AS video_state, v.url AS video_url, v.failure_reason AS video_failure_reason"
)
SESSIONS_WITH_ROOM = "booking.sessions s LEFT JOIN booking.video_rooms v USING (booking_id)"


def therapist(row: asyncpg.Record, prefix: str = "") -> Therapist:
    """A therapist from a row holding THERAPIST_FIELDS (each named `prefix` + field)."""
    values = {field: row[prefix + field] for field in THERAPIST_FIELDS}
    values["languages"] = tuple(values["languages"])
    values["specialties"] = tuple(values["specialties"])
    return Therapist(**values)


def session_type(row: asyncpg.Record, prefix: str = "") -> SessionType:
    """A session type from a row holding SESSION_TYPE_FIELDS (each named `prefix` + field)."""
    return SessionType(**{field: row[prefix + field] for field in SESSION_TYPE_FIELDS})


def booking(row: asyncpg.Record, room: VideoRoom | None = None) -> Booking:
    """A booking from a row holding BOOKING_FIELDS (a select, or a whole `booking.sessions` row),
    with its room from the row's video_* columns when it has them."""
    values = {field: row[field] for field in BOOKING_FIELDS}
    if "video_state" in row.keys():  # noqa: SIM118  # asyncpg's Record has keys(), not __contains__ on names
        state = row["video_state"]
        room = (
            None if state is None else VideoRoom(VideoRoomState(state), row["video_url"], row["video_failure_reason"])
        )
    values["status"] = BookingStatus(values["status"])
    values["payment_status"] = PaymentStatus(values["payment_status"])
    values["cancelled_by"] = Actor(values["cancelled_by"]) if values["cancelled_by"] else None
    values["cancel_reason"] = CancelReason(values["cancel_reason"]) if values["cancel_reason"] else None
    values["outcome"] = SessionOutcome(values["outcome"]) if values["outcome"] else None
    values["outcome_by"] = Actor(values["outcome_by"]) if values["outcome_by"] else None
    return Booking(**values, video_room=room)


def video_room(row: asyncpg.Record) -> VideoRoom:
    """A whole `booking.video_rooms` row as the booking's room."""
    return VideoRoom(VideoRoomState(row["state"]), row["url"], row["failure_reason"])


def json_object(value: str | None) -> dict[str, Any]:
    """A jsonb column as asyncpg returns it (text), as a dict; {} for NULL."""
    return {} if value is None else dict(json.loads(value))
