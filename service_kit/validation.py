"""Edge validation: collect every bad field of a request, then refuse once with all of them.

    checks = Checks()
    owner = checks.uuid("owner_id", request.owner_id)
    amount = checks.amount("amount", request.amount, maximum=1_000_000)
    checks.done()   # raises InvalidArgument naming each bad field

Values returned before `done()` are placeholders when their field is bad; use them only after.
"""

from __future__ import annotations

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
        try:
            parsed = UUID(value)
        except ValueError:
            self.fail(field, "must be a UUID, e.g. 3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b")
            return _PLACEHOLDER_UUID
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

    def text(self, field: str, value: str, *, max_length: int, required: bool = False) -> str:
        if required and not value.strip():
            self.fail(field, "is required")
        elif len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
        elif "\x00" in value:
            self.fail(field, "must not contain NUL characters")
        return value

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
        if not EARLIEST_INSTANT <= instant < LATEST_INSTANT:
            self.fail(field, f"must be between {EARLIEST_INSTANT:%Y} and {LATEST_INSTANT:%Y}")
        return instant

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
