"""The SQL of reminders: the ones whose moment has come, recorded as sent."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from service_kit.connection import Connection


@dataclass(frozen=True)
class DueReminder:
    booking_id: uuid.UUID
    offset_s: int
    version: int


async def claim_due(connection: Connection, now: datetime, offsets_s: Sequence[int], limit: int) -> list[DueReminder]:
    """Records up to `limit` reminders due at `now` as sent, and returns them: for each offset, the
    confirmed sessions without an outcome that start within the offset from `now`, whose reminder
    moment (start minus offset) came after they got their start (`updated_at`: a confirmed session
    without an outcome changes only by its booking or a move), and that were not reminded at this
    offset for their current start (version: reschedule_count). A reminder recorded by another
    worker first is not returned (ON CONFLICT), so each is sent once."""
    found = await connection.fetch(
        """INSERT INTO booking.reminders_sent (booking_id, offset_s, version, sent_at)
           SELECT s.booking_id, o.offset_s, s.reschedule_count, $1
             FROM unnest($2::integer[]) AS o(offset_s)
             JOIN booking.sessions s
               ON s.status = 'confirmed' AND s.outcome IS NULL
              AND s.starts_at > $1 AND s.starts_at <= $1 + make_interval(secs => o.offset_s)
              AND s.starts_at - make_interval(secs => o.offset_s) >= s.updated_at
            WHERE NOT EXISTS (SELECT 1 FROM booking.reminders_sent r
                               WHERE r.booking_id = s.booking_id AND r.offset_s = o.offset_s
                                 AND r.version = s.reschedule_count)
            ORDER BY s.starts_at
            LIMIT $3
           ON CONFLICT DO NOTHING
           RETURNING booking_id, offset_s, version""",
        now,
        list(offsets_s),
        limit,
    )
    return [DueReminder(row["booking_id"], row["offset_s"], row["version"]) for row in found]
