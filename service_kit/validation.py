"""Edge validation: collect every bad field of a request, then refuse once with all of them.

    checks = Checks()
    owner = checks.uuid("owner_id", request.owner_id)
    amount = checks.amount("amount", request.amount, maximum=1_000_000)
    checks.done()   # raises InvalidArgument naming each bad field

Values returned before `done()` are placeholders when their field is bad; use them only after.

The accepted forms (docs/http-api.md, "Accepted forms"): a UUID only as 36 lowercase hex
characters with dashes (`str(uuid.UUID(...))`, what the API itself returns), so that one id has one
spelling everywhere (idempotency keys, logs, ownership); text NFC-normalised, without control
characters, and single-line unless the field is a note; instants within 2000..2099.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar, cast
from uuid import UUID

from google.protobuf import timestamp_pb2

from service_kit.errors import FieldViolation, InvalidArgument

MAX_REQUEST_ID_LENGTH = 128
# A refusal names at most this many bad fields. Each one is in the status twice (the message and
# the BadRequest), and a gRPC client drops a status whose trailers pass its metadata limit (8 KiB
# soft, 16 KiB hard) as a bare RESOURCE_EXHAUSTED without reason: 50 bad weekly windows did that.
MAX_VIOLATIONS = 10
# Timestamps outside this window are refused: they are typos, not appointments or history.
EARLIEST_INSTANT = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(2100, 1, 1, tzinfo=UTC)
_PLACEHOLDER_UUID = UUID(int=0)
# The one accepted spelling of a UUID: str(UUID(...)). `fullmatch`, so no trailing newline either.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Unicode categories no text field may hold: controls (C0, C1, DEL), surrogates, and line or
# paragraph separators. (Unassigned code points pass: this Python's Unicode tables are older than
# the newest emoji.)
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
# Format characters that reorder or hide text (bidirectional embeddings, overrides and isolates;
# a name that displays as another). Zero-width joiners stay: emoji sequences need them.
_REFUSED_FORMAT_CHARACTERS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# What a multi-line text (a note) may hold beyond a single line's characters.
_MULTILINE_CONTROLS = frozenset("\n\t")
# Generated enums type their numbers as NewTypes of int.
EnumNumber = TypeVar("EnumNumber", bound=int)


class Checks:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(FieldViolation(field, description))

    def uuid(self, field: str, value: str) -> UUID:
        if not value:
            self.fail(field, "is required (a UUID)")
            return _PLACEHOLDER_UUID
        if not _CANONICAL_UUID.fullmatch(value):
            self.fail(field, "must be a UUID in lowercase with dashes, e.g. 3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b")
            return _PLACEHOLDER_UUID
        parsed = UUID(value)
        if parsed.int == 0:
            self.fail(field, "must not be the nil UUID")
        return parsed

    def optional_uuid(self, field: str, value: str) -> UUID | None:
        return self.uuid(field, value) if value else None

    def request_id(self, field: str, value: str) -> str:
        if not value:
            self.fail(field, "is required: a unique key per logical request, e.g. a UUID")
        elif len(value) > MAX_REQUEST_ID_LENGTH:
            self.fail(field, f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
        elif not value.isprintable() or value != value.strip():
            self.fail(field, "must be printable characters without leading or trailing spaces")
        return value

    def integer(self, field: str, value: int, *, minimum: int, maximum: int) -> int:
        if not minimum <= value <= maximum:
            self.fail(field, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def text(self, field: str, value: str, *, max_length: int, required: bool = False, multiline: bool = False) -> str:
        """`value` NFC-normalised and stripped of surrounding white space, which is what is stored
        and returned; refused with control or hidden-reordering characters (a note, `multiline`,
        may hold line breaks and tabs) or over `max_length` characters once normalised."""
        text = unicodedata.normalize("NFC", value).strip()
        if required and not text:
            self.fail(field, "is required")
        elif len(text) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
        elif not _clean_text(text, multiline=multiline):
            self.fail(
                field,
                "must not contain control characters, line breaks or bidirectional formatting characters"
                if not multiline
                else "must not contain control characters (but line breaks and tabs) or bidirectional formatting",
            )
        return text

    def enum(
        self, field: str, value: EnumNumber, names: Callable[[EnumNumber], str], *, allow_unspecified: bool = False
    ) -> EnumNumber:
        """`names` is the generated enum's Name(): it raises ValueError for unknown numbers."""
        try:
            name = names(value)
        except ValueError:
            self.fail(field, f"unknown value {value}")
            return cast(EnumNumber, 0)
        if value == 0 and not allow_unspecified:
            self.fail(field, f"is required (not {name})")
        return value

    def within_instant_window(self, field: str, instant: datetime) -> datetime:
        """`instant` (aware), refused outside the window every instant of the API lies in."""
        if not EARLIEST_INSTANT <= instant < LATEST_INSTANT:
            self.fail(field, f"must be between {EARLIEST_INSTANT:%Y} and {LATEST_INSTANT:%Y}")
            return EARLIEST_INSTANT
        return instant

    def instant(self, field: str, value: timestamp_pb2.Timestamp, *, required: bool = True) -> datetime:
        if value.seconds == 0 and value.nanos == 0:
            if required:
                self.fail(field, "is required (an RFC 3339 instant, e.g. 2026-03-29T09:00:00Z)")
            return EARLIEST_INSTANT
        if not 0 <= value.nanos < 1_000_000_000:
            self.fail(field, "has invalid nanoseconds")
            return EARLIEST_INSTANT
        try:
            instant = value.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            self.fail(field, "is out of range")
            return EARLIEST_INSTANT
        return self.within_instant_window(field, instant)

    def page_size(self, field: str, value: int, *, default: int, maximum: int) -> int:
        if value < 0:
            self.fail(field, "must not be negative")
            return default
        if value == 0:
            return default
        return min(value, maximum)

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def _clean_text(text: str, *, multiline: bool) -> bool:
    for character in text:
        if character in _REFUSED_FORMAT_CHARACTERS:
            return False
        if unicodedata.category(character) in _REFUSED_CATEGORIES and not (
            multiline and character in _MULTILINE_CONTROLS
        ):
            return False
    return True
