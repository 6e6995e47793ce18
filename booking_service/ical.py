"""A calendar feed as iCalendar (RFC 5545) text, made with the `icalendar` library. No I/O.

One VEVENT per booking, with a stable UID (the booking id), SEQUENCE = how many times it was moved
(calendar apps replace an event by a higher sequence), STATUS CONFIRMED or CANCELLED, its start
and end in the therapist's zone (TZID, with the zone's VTIMEZONE), and the video room's link once
the room is ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date
from zoneinfo import ZoneInfo

import icalendar

from booking_service.domain import Booking, BookingStatus, VideoRoomState

PRODUCT_ID = "-//Therapy Booking//Calendar feed//EN"
UID_DOMAIN = "therapy-booking"


def feed(name: str, bookings: Sequence[Booking], first_day: date, last_day: date) -> bytes:
    """The feed named `name` with `bookings`; the time zones are described for first_day..last_day."""
    calendar = icalendar.Calendar()
    calendar.add("prodid", PRODUCT_ID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", "PUBLISH")
    calendar.add("x-wr-calname", name)
    for booking in bookings:
        calendar.add_component(_event(booking))
    calendar.add_missing_timezones(first_date=first_day, last_date=last_day)
    return bytes(calendar.to_ical())


def _event(booking: Booking) -> icalendar.Event:
    zone = ZoneInfo(booking.time_zone)
    event = icalendar.Event()
    event.add("uid", f"{booking.booking_id}@{UID_DOMAIN}")
    event.add("sequence", booking.reschedule_count)
    event.add("dtstamp", booking.updated_at.astimezone(UTC))
    event.add("created", booking.created_at.astimezone(UTC))
    event.add("last-modified", booking.updated_at.astimezone(UTC))
    event.add("dtstart", booking.starts_at.astimezone(zone))
    event.add("dtend", booking.ends_at.astimezone(zone))
    cancelled = booking.status is BookingStatus.CANCELLED
    event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
    event.add("summary", "Therapy session (cancelled)" if cancelled else "Therapy session")
    lines = [f"Booking {booking.booking_id}"]
    room = booking.video_room
    if not cancelled and room is not None and room.state is VideoRoomState.READY and room.url:
        event.add("url", room.url)
        event.add("location", room.url)
        lines.append(f"Video room: {room.url}")
    event.add("description", "\n".join(lines))
    return event
