"""service_kit.ids: UUIDv7 as RFC 9562 lays it out, sorting by time."""

from __future__ import annotations

import time
import uuid

from service_kit.ids import uuid7


def test_a_uuid7_carries_its_version_variant_and_millisecond() -> None:
    before_ms = time.time_ns() // 1_000_000
    made = uuid7()
    after_ms = time.time_ns() // 1_000_000

    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before_ms <= made.int >> 80 <= after_ms
    assert str(made) == str(uuid.UUID(str(made))), "canonical like every id of the API"


def test_ids_of_later_milliseconds_sort_later_and_ids_do_not_repeat() -> None:
    ids = [uuid7(now_ms=1_700_000_000_000 + step) for step in range(100)]
    same_millisecond = {uuid7(now_ms=1_700_000_000_000) for _ in range(1000)}

    assert ids == sorted(ids)
    assert len(same_millisecond) == 1000
