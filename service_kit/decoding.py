"""Reading a request's bytes: a message protobuf cannot parse is the caller's mistake, answered
INVALID_ARGUMENT with a reason and, where one can be named, the field at fault.

grpcio runs a method's request deserializer before any interceptor or handler code sees the call;
when it raises, grpc.aio answers UNKNOWN with the exception's class in the message
(`Unexpected <class 'google.protobuf.message.DecodeError'>: ...`) and logs a traceback at ERROR
(grpc/_cython/_cygrpc/aio/server.pyx.pxi, `_handle_exceptions`). There is no hook for that error,
so the interceptor registers each method with no deserializer (the handler gets the raw bytes)
and decodes them here, inside the call, where a failure is a `MalformedRequest` like any other
refusal.

The happy path is the generated `FromString` and nothing else. Only after it fails does
`explain` walk the wire format (in Python, bounded by `MAX_WALKED_FIELDS`) to say which field
broke: a string field that is not UTF-8 (reason INVALID_UTF8, every such field named), or bytes
that are not a message at all (MALFORMED_REQUEST: a truncated value, a tag with field number 0 or
wire type 6 or 7, an unmatched group; the field named when the break is inside a known one). The
walk also yields the readable part of the request (each bad string blanked to "?"s, the rest
kept), so that authorization judges a malformed request by the fields it can read, as it would
a well-formed one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import DecodeError, Message

from service_kit.errors import DomainError, FieldViolation

FieldDescriptor = descriptor.FieldDescriptor
# A message's descriptor, as protobuf's Python and upb implementations type it.
Descriptor = Any
# The walk after a failed parse is Python, one step per field: bounded, so that a 4 MiB message of
# two-byte fields costs milliseconds, not seconds. Past the bound the refusal names no field.
MAX_WALKED_FIELDS = 10_000
# protobuf's own default nesting limit.
MAX_DEPTH = 100
# As service_kit.validation: a refusal names at most this many fields.
MAX_NAMED_FIELDS = 10

_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: _FIXED64,
    FieldDescriptor.TYPE_FIXED64: _FIXED64,
    FieldDescriptor.TYPE_SFIXED64: _FIXED64,
    FieldDescriptor.TYPE_FLOAT: _FIXED32,
    FieldDescriptor.TYPE_FIXED32: _FIXED32,
    FieldDescriptor.TYPE_SFIXED32: _FIXED32,
    FieldDescriptor.TYPE_STRING: _LENGTH_DELIMITED,
    FieldDescriptor.TYPE_BYTES: _LENGTH_DELIMITED,
    FieldDescriptor.TYPE_MESSAGE: _LENGTH_DELIMITED,
    FieldDescriptor.TYPE_GROUP: _START_GROUP,
}


class MalformedRequest(DomainError):
    """The request's bytes are not a valid message of the method's type."""

    reason = "MALFORMED_REQUEST"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...], readable: Message | None) -> None:
        metadata = {"field": violations[0].field} if violations else None
        super().__init__(message, metadata=metadata)
        self.violations = violations
        # What authorization reads in place of the request: its readable fields (None: nothing).
        self.readable = readable


class InvalidUtf8(MalformedRequest):
    """A string field holds bytes that are not UTF-8 (every proto3 string must be)."""

    reason = "INVALID_UTF8"


class RequestDecoder:
    """Decodes one method's requests, of one generated message type."""

    def __init__(self, message_type: type[Message]) -> None:
        self._message_type = message_type
        self._from_string = message_type.FromString

    @classmethod
    def of(cls, deserializer: Callable[[bytes], Any]) -> RequestDecoder | None:
        """The decoder for a generated deserializer (`SomeRequest.FromString`); None for any other
        deserializer, which then stays grpc's to run."""
        owner = getattr(deserializer, "__self__", None)
        if isinstance(owner, type) and issubclass(owner, Message) and deserializer == owner.FromString:
            return cls(owner)
        return None

    def decode(self, raw: bytes) -> Message:
        """The request; raises MalformedRequest when the bytes are not one."""
        try:
            return self._from_string(raw)
        except DecodeError:
            raise explain(self._message_type, raw) from None

    def readable(self, malformed: MalformedRequest) -> Message:
        """What authorization reads of a malformed request: its readable part, else nothing."""
        return malformed.readable if malformed.readable is not None else self._message_type()


def explain(message_type: type[Message], raw: bytes) -> MalformedRequest:
    """Why `raw`, which protobuf refused, is not a `message_type`."""
    walk = _Walk(raw)
    try:
        walk.message(message_type.DESCRIPTOR, 0, len(raw), "", 0)
    except _Broken as broken:
        path = broken.path
        violations: tuple[FieldViolation, ...] = (FieldViolation(path, broken.description),) if path else ()
        shown = f"{path}: {broken.description}" if path else broken.description
        return MalformedRequest(f"the request is not a valid message ({shown})", violations, None)
    except _GaveUp:
        return MalformedRequest("the request is not a valid message", (), None)
    if not walk.bad_strings:
        # protobuf refused what this walk accepts (a limit of its own): say so without a field.
        return MalformedRequest("the request is not a valid message", (), None)
    violations = tuple(FieldViolation(path, "is not valid UTF-8") for path, _, _ in walk.bad_strings)
    return InvalidUtf8(
        "; ".join(f"{violation.field}: {violation.description}" for violation in violations),
        violations,
        _readable(message_type, raw, walk.bad_strings),
    )


def _readable(message_type: type[Message], raw: bytes, bad: list[tuple[str, int, int]]) -> Message | None:
    """`raw` with each bad string's bytes replaced by as many "?" (lengths, so every enclosing
    length prefix, stay as they were), parsed."""
    cleaned = bytearray(raw)
    for _, start, end in bad:
        cleaned[start:end] = b"?" * (end - start)
    try:
        return message_type.FromString(bytes(cleaned))
    except DecodeError:
        return None


class _Broken(Exception):  # control flow of the walk, never raised out of this module
    def __init__(self, path: str, description: str) -> None:
        self.path = path
        self.description = description


class _GaveUp(Exception):  # the walk's bound was reached
    pass


@dataclass
class _Walk:
    raw: bytes
    fields_walked: int = 0
    # (path, start, end) of each string field whose bytes are not UTF-8, at most MAX_NAMED_FIELDS.
    bad_strings: list[tuple[str, int, int]] = field(default_factory=list)

    def varint(self, position: int, end: int, path: str, what: str) -> tuple[int, int]:
        value = shift = 0
        while True:
            if position >= end or shift > 63:
                raise _Broken(path, f"has a truncated or overlong {what}")
            byte = self.raw[position]
            position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, position
            shift += 7

    def message(self, message_type: Descriptor | None, start: int, end: int, path: str, depth: int) -> int:
        """Walks the fields of one message, from `start` to `end`."""
        return self._fields(message_type, start, end, path, depth, group_number=None)

    def _fields(
        self,
        message_type: Descriptor | None,
        position: int,
        end: int,
        path: str,
        depth: int,
        group_number: int | None,
    ) -> int:
        if depth > MAX_DEPTH:
            raise _GaveUp
        counts: dict[int, int] = {}
        while position < end:
            self.fields_walked += 1
            if self.fields_walked > MAX_WALKED_FIELDS:
                raise _GaveUp
            tag, position = self.varint(position, end, path, "field tag")
            number, wire_type = tag >> 3, tag & 7
            if wire_type == _END_GROUP:
                if number != group_number:
                    raise _Broken(path, "has an end-group tag without its start")
                return position
            known = message_type.fields_by_number.get(number) if message_type is not None else None
            if number == 0 or wire_type > _FIXED32:
                raise _Broken(path, "has an invalid field tag")
            index = counts.get(number, 0)
            counts[number] = index + 1
            field_path = path
            if known is not None:
                name = f"{path}.{known.name}" if path else known.name
                field_path = f"{name}[{index}]" if known.is_repeated else name
            position = self._value(known, wire_type, number, position, end, field_path, depth)
        if position > end:
            raise _Broken(path, "is truncated")
        if group_number is not None:
            raise _Broken(path, "has a group without its end-group tag")
        return position

    def _value(
        self,
        known: FieldDescriptor | None,
        wire_type: int,
        number: int,
        position: int,
        end: int,
        path: str,
        depth: int,
    ) -> int:
        # A known field with another wire type than its own (a packed repeated number aside, which
        # this walk skips alike) is kept by protobuf as an unknown field, never decoded.
        if known is not None and _WIRE_TYPES.get(known.type, _VARINT) != wire_type:
            known = None
        if wire_type == _VARINT:
            return self.varint(position, end, path, "number")[1]
        if wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            if position + size > end:
                raise _Broken(path, "is truncated")
            return position + size
        if wire_type == _START_GROUP:
            nested = known.message_type if known is not None else None
            return self._fields(nested, position, end, path, depth + 1, group_number=number)
        length, position = self.varint(position, end, path, "length")
        value_end = position + length
        if value_end > end:
            raise _Broken(path, "is truncated")
        if known is not None and known.type == FieldDescriptor.TYPE_STRING:
            try:
                self.raw[position:value_end].decode("utf-8")
            except UnicodeDecodeError:
                if len(self.bad_strings) < MAX_NAMED_FIELDS:
                    self.bad_strings.append((path, position, value_end))
        elif known is not None and known.type == FieldDescriptor.TYPE_MESSAGE:
            self.message(known.message_type, position, value_end, path, depth + 1)
        return value_end
