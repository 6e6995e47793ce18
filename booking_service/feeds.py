"""Calendar feeds (docs/calendars.md): an iCalendar feed per therapist and per client, served at a
URL that carries an unguessable feed token, since calendar apps cannot send bearer tokens. Its
owner (or an admin) makes or rotates the token; the old URL stops working at once. Only the
token's SHA-256 is stored. A feed holds the owner's bookings from BOOKING_CALENDAR_PAST_WEEKS
before now to BOOKING_CALENDAR_FUTURE_WEEKS after, at most MAX_FEED_EVENTS of them, cancelled
ones included (so calendar apps remove them).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from booking_service import ical
from booking_service.domain import NotFound, TherapistNotFound
from booking_service.store import calendar as calendar_store
from booking_service.store import catalogue as catalogue_store
from booking_service.store import feeds as store
from service_kit.database import Database
from service_kit.errors import DomainError

# 32 random bytes, URL-safe base64 without padding: 43 characters.
TOKEN_BYTES = 32
TOKEN_LENGTH = 43
MAX_FEED_EVENTS = 1000


class FeedOwner(enum.Enum):
    THERAPIST = "therapist"
    CLIENT = "client"


class FeedNotFound(NotFound):
    """No feed has this token (never made, or rotated since)."""

    reason = "CALENDAR_FEED_NOT_FOUND"

    def __init__(self) -> None:
        DomainError.__init__(self, "no calendar feed has this token (it may have been rotated)")


def feed_path(token: str) -> str:
    """The feed's path at the gateway."""
    return f"/v1/calendar-feeds/{token}/calendar.ics"


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Feeds:
    def __init__(
        self, database: Database, *, clock: Callable[[], datetime], past: timedelta, future: timedelta
    ) -> None:
        self._database = database
        self._clock = clock
        self._past = past
        self._future = future

    async def rotate(self, owner: FeedOwner, owner_id: uuid.UUID) -> str:
        """A new token for the owner's feed, replacing any before it; the token (shown once)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        async with self._database.pool.acquire() as connection:
            if owner is FeedOwner.THERAPIST and await catalogue_store.fetch_therapist(connection, owner_id) is None:
                raise TherapistNotFound(owner_id)
            await store.replace_token(connection, owner.value, owner_id, _hash(token))
        return token

    async def render(self, token: str) -> bytes:
        """The feed whose token this is, as iCalendar text."""
        now = self._clock()
        start, end = now - self._past, now + self._future
        async with self._database.pool.acquire() as connection:
            found = await store.owner_of(connection, _hash(token))
            if found is None:
                raise FeedNotFound
            kind, owner_id = found
            bookings = await calendar_store.list_bookings(
                connection,
                client_id=owner_id if kind == FeedOwner.CLIENT.value else None,
                therapist_id=owner_id if kind == FeedOwner.THERAPIST.value else None,
                start_after=start,
                start_before=end,
                status=None,
                after=None,
                limit=MAX_FEED_EVENTS,
            )
        name = "Therapy sessions" if kind == FeedOwner.CLIENT.value else "Therapy sessions (practice)"
        return ical.feed(name, bookings, start.date(), end.date() + timedelta(days=1))
