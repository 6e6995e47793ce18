"""Opaque page tokens (AIP-158): a keyset cursor plus a fingerprint of the request's filters.

A token is only a cursor into data the caller may read anyway, so it is encoded, not signed; a
tampered or foreign token is refused with INVALID_ARGUMENT naming page_token, never a crash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from service_kit.errors import InvalidArgument
from service_kit.validation import EARLIEST_INSTANT, LATEST_INSTANT

MAX_TOKEN_LENGTH = 1024
Cursor = list[str | int]
T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a keyset listing: the store is asked for one row more than the page holds,
    and that extra row only says whether another page follows."""

    items: list[T]
    has_more: bool

    @classmethod
    def from_rows(cls, rows: list[T], page_size: int) -> Page[T]:
        return cls(rows[:page_size], len(rows) > page_size)


def fingerprint(filters: Sequence[object]) -> str:
    return hashlib.sha256(repr(tuple(filters)).encode()).hexdigest()[:16]


def encode(cursor: Cursor, filters: Sequence[object]) -> str:
    payload = json.dumps({"c": cursor, "f": fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(token: str, filters: Sequence[object], *, field: str = "page_token", arity: int) -> Cursor | None:
    """The cursor in `token`, or None for the first page."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument.of(field, "is too long to be a page token")
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidArgument.of(field, "is not a page token from this API") from None
    cursor = payload.get("c") if isinstance(payload, dict) else None
    if (
        not isinstance(cursor, list)
        or len(cursor) != arity
        or not all(isinstance(part, str | int) and not isinstance(part, bool) for part in cursor)
    ):
        raise InvalidArgument.of(field, "is not a page token from this API")
    if payload.get("f") != fingerprint(filters):
        raise InvalidArgument.of(field, "belongs to a request with other filters")
    return cursor


def encode_instant_and_id(instant: datetime, identifier: UUID, filters: Sequence[object]) -> str:
    """The token after a row of a listing ordered by (instant, id)."""
    return encode([instant.isoformat(), str(identifier)], filters)


def decode_instant_and_id(
    token: str, filters: Sequence[object], *, field: str = "page_token"
) -> tuple[datetime, UUID] | None:
    """The (instant, id) cursor in `token`, or None for the first page. A forged instant outside
    what the database can hold would fail deep in the driver (INTERNAL); a real cursor is a row's
    own instant, always inside the accepted window, so anything else is refused here."""
    cursor = decode(token, filters, field=field, arity=2)
    if cursor is None:
        return None
    try:
        instant = datetime.fromisoformat(str(cursor[0]))
        identifier = UUID(str(cursor[1]))
    except ValueError:
        raise InvalidArgument.of(field, "is not a page token from this API") from None
    if instant.tzinfo is None or not EARLIEST_INSTANT <= instant < LATEST_INSTANT:
        raise InvalidArgument.of(field, "is not a page token from this API")
    return instant, identifier
