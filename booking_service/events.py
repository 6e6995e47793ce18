"""What a booking's events say, and the side effects they carry. No I/O.

A change to a booking writes one outbox row, kind `booking_event`, in its own transaction
(docs/notifications.md). Its payload is the notification as receivers get it; the worker delivers
the notification and brings the video room to the booking's state, and, if the booking's payment
did not settle inline, settles it from the same row.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from booking_service.domain import Booking, BookingStatus

BOOKING_EVENT = "booking_event"
# The side effects of a booking event; the payload's `pending_effects` lists those still to deliver
# after a failed attempt (absent: all of them).
NOTIFICATION = "notification"
VIDEO_ROOM = "video_room"
EFFECTS = (NOTIFICATION, VIDEO_ROOM)
PENDING_EFFECTS = "pending_effects"
# Payment retries, and the kinds of the previous version's rows, which this version still delivers
# (docs/operations.md, "Rolling upgrades").
COMMIT_RESERVATION = "commit_reservation"
REFUND_RESERVATION = "refund_reservation"
LEGACY_VIDEO_ROOM_KINDS = ("create_video_room", "move_video_room", "delete_video_room")

CONFIRMED = "booking.confirmed"
CANCELLED = "booking.cancelled"
RESCHEDULED = "booking.rescheduled"
COMPLETED = "booking.completed"
NO_SHOW = "booking.no_show"
REMINDER = "booking.reminder"
WAITLIST_OFFERED = "waitlist.offered"
# What a webhook endpoint may subscribe to.
EVENT_TYPES = (CONFIRMED, CANCELLED, RESCHEDULED, COMPLETED, NO_SHOW, REMINDER, WAITLIST_OFFERED)


def booking_event(event_type: str, booking: Booking, occurred_at: datetime, **extra: object) -> dict[str, object]:
    """The payload of a booking event (docs/notifications.md), fixed when the change commits."""
    data: dict[str, object] = {
        "booking_id": str(booking.booking_id),
        "client_id": str(booking.client_id),
        "therapist_id": str(booking.therapist_id),
        "session_type_id": str(booking.session_type_id),
        "start_time": booking.starts_at.isoformat(),
        "end_time": booking.ends_at.isoformat(),
        "time_zone": booking.time_zone,
        "status": booking.status.value,
        "credit_cost": booking.credit_cost,
    }
    if booking.series_id is not None:
        data["series_id"] = str(booking.series_id)
        data["series_index"] = booking.series_index
    if booking.outcome is not None:
        data["outcome"] = booking.outcome.value
        data["outcome_by"] = booking.outcome_by.value if booking.outcome_by else None
    if booking.status is BookingStatus.CANCELLED:
        data["cancelled_by"] = booking.cancelled_by.value if booking.cancelled_by else None
        data["cancel_reason"] = booking.cancel_reason.value if booking.cancel_reason else None
        data["refunded_credits"] = booking.refunded_credits
    data.update(extra)
    return {"type": event_type, "occurred_at": occurred_at.isoformat(), "data": data}


def notification_only(payload: dict[str, object]) -> dict[str, object]:
    """An event with nothing to do but its notification (an outcome, a reminder): no room to sync."""
    return {**payload, PENDING_EFFECTS: [NOTIFICATION]}


def pending_effects(payload: dict[str, object]) -> tuple[str, ...]:
    """The side effects of a booking event still to deliver."""
    pending = payload.get(PENDING_EFFECTS)
    return EFFECTS if pending is None else tuple(str(effect) for effect in pending)  # type: ignore[attr-defined]


def notification_body(event_id: uuid.UUID, payload: dict[str, object]) -> dict[str, object]:
    """What a receiver gets: the event's id and its payload, without the worker's bookkeeping."""
    return {"id": str(event_id), **{key: value for key, value in payload.items() if key != PENDING_EFFECTS}}


def video_room_name(booking_id: uuid.UUID) -> str:
    """Deterministic, so a repeated create finds the room it made (idempotent)."""
    return f"booking-{booking_id.hex}"


def video_room_window(booking: Booking, opens_before_s: int, expires_after_s: int) -> tuple[datetime, datetime]:
    return (
        booking.starts_at - timedelta(seconds=opens_before_s),
        booking.ends_at + timedelta(seconds=expires_after_s),
    )


def reminder_event(booking: Booking, offset_s: int, occurred_at: datetime) -> dict[str, object]:
    """A reminder `offset_s` before the booking's start, for its current start (reschedule_count)."""
    event = booking_event(REMINDER, booking, occurred_at, reminder_offset_s=offset_s)
    event["data"]["reschedule_count"] = booking.reschedule_count  # type: ignore[index]
    return notification_only(event)


def reminder_still_due(payload: dict[str, object], booking: Booking | None) -> bool:
    """Whether a reminder still concerns its booking as it stands: not cancelled, not marked, not
    moved since (a moved booking gets reminders for its new start)."""
    data = payload.get("data")
    if booking is None or not isinstance(data, dict):
        return False
    return (
        booking.status is BookingStatus.CONFIRMED
        and booking.outcome is None
        and data.get("reschedule_count") == booking.reschedule_count
    )
