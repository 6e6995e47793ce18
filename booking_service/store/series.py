"""The SQL of weekly series: an occurrence and the ones after it."""

from __future__ import annotations

import uuid

from booking_service.domain import Booking
from booking_service.store import rows
from service_kit.connection import Connection


async def occurrences_from(connection: Connection, series_id: uuid.UUID, from_index: int) -> list[Booking]:
    """The series' occurrences from `from_index` on, by index, their rows locked (in index order,
    so two cancellations of one series lock in one order)."""
    found = await connection.fetch(
        f"""SELECT {rows.BOOKING_WITH_ROOM} FROM {rows.SESSIONS_WITH_ROOM}
             WHERE s.series_id = $1 AND s.series_index >= $2
             ORDER BY s.series_index
               FOR UPDATE OF s""",
        series_id,
        from_index,
    )
    return [rows.booking(row) for row in found]
