"""Time-ordered ids (UUIDv7, RFC 9562 section 5.7) for rows the services create.

A UUIDv7 starts with the Unix time in milliseconds, so ids made one after another sort one after
another: a new row's key lands on the rightmost leaf of its index, which stays in memory and is
written to the WAL in full once per checkpoint, instead of on a random leaf (docs/performance.md,
"Ids and WAL on large tables"). The other 74 bits are random, so ids stay unguessable enough for
keys, though their time of creation can be read from them: use them where that is no secret.
(Python 3.14 has uuid.uuid7; this project supports 3.11.)
"""

from __future__ import annotations

import secrets
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC_4122 = 0b10 << 62
_RANDOM_A_BITS = 12
_RANDOM_B_BITS = 62


def uuid7(now_ms: int | None = None) -> uuid.UUID:
    """A new UUIDv7 for the time `now_ms` (milliseconds since the epoch; now by default)."""
    unix_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    assert 0 <= unix_ms < 1 << 48, unix_ms
    random_a = secrets.randbits(_RANDOM_A_BITS)
    random_b = secrets.randbits(_RANDOM_B_BITS)
    return uuid.UUID(int=unix_ms << 80 | _VERSION_7 | random_a << 64 | _VARIANT_RFC_4122 | random_b)
