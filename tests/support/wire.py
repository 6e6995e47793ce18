"""Requests as bytes: the protobuf wire format built by hand, so a test can send what no protobuf
library would serialize: strings that are not UTF-8, tags with impossible wire types, values cut
short, numbers past their type. Each corruption is a valid request's bytes with something appended
or cut, so the rest of the request stays what a real caller sends (its own ids included, which
authorization reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from google.protobuf import descriptor

FieldDescriptor = descriptor.FieldDescriptor
VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = range(6)
# How deep string fields are looked for (request -> therapist -> display_name is two).
MAX_DEPTH = 3
# Byte strings that are not UTF-8: a lone continuation byte, an overlong "/", an encoded UTF-16
# surrogate, a truncated sequence after valid text, bytes no UTF-8 has.
INVALID_UTF8 = (b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"caf\xc3", b"\xff\xfe")
_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_BOOL,
    }
)


class Kind(Enum):
    """What a corruption is; the first three are never a message, the last may be one."""

    INVALID_UTF8 = "invalid UTF-8"
    INVALID_WIRE_TYPE = "invalid wire type"
    TRUNCATED = "truncated"
    OUT_OF_RANGE = "out-of-range value"

    @property
    def always_malformed(self) -> bool:
        return self is not Kind.OUT_OF_RANGE


@dataclass(frozen=True)
class Corruption:
    kind: Kind
    label: str
    raw: bytes
    # For INVALID_UTF8: the dotted path of the string field (without indexes), e.g. "therapist.display_name".
    field_path: str = ""


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LENGTH_DELIMITED) + varint(len(payload)) + payload


def nested(path: tuple[FieldDescriptor, ...], innermost: bytes) -> bytes:
    """`innermost` (the bytes of the last field of `path`) wrapped in each enclosing message field."""
    raw = innermost
    for outer in reversed(path[:-1]):
        raw = length_delimited(outer.number, raw)
    return raw


def field_paths(message_type: descriptor.Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field reachable from `message_type`, as paths of descriptors, to MAX_DEPTH."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for field in message_type.fields:
        paths.append((field,))
        if field.message_type is not None and depth + 1 < MAX_DEPTH:
            paths.extend((field, *rest) for rest in field_paths(field.message_type, depth + 1))
    return paths


def dotted(path: tuple[FieldDescriptor, ...]) -> str:
    return ".".join(field.name for field in path)


def corruptions(message_type: descriptor.Descriptor, valid: bytes) -> list[Corruption]:
    """The corruptions of `valid` (a serialized `message_type`, possibly empty), by kind."""
    found: list[Corruption] = []
    paths = field_paths(message_type)
    strings = [path for path in paths if path[-1].type == FieldDescriptor.TYPE_STRING]
    for index, path in enumerate(strings):
        bad = INVALID_UTF8[index % len(INVALID_UTF8)]
        raw = valid + nested(path, length_delimited(path[-1].number, bad))
        found.append(Corruption(Kind.INVALID_UTF8, f"{dotted(path)} = {bad!r}", raw, dotted(path)))
    first = message_type.fields[0].number if message_type.fields else 1
    found += [
        Corruption(Kind.INVALID_WIRE_TYPE, "wire type 6", valid + tag(first, 6) + b"\x01"),
        Corruption(Kind.INVALID_WIRE_TYPE, "wire type 7", valid + tag(first, 7) + b"\x01"),
        Corruption(Kind.INVALID_WIRE_TYPE, "field number 0", valid + b"\x00\x01"),
        Corruption(Kind.INVALID_WIRE_TYPE, "end group without start", valid + tag(first, END_GROUP)),
        Corruption(Kind.INVALID_WIRE_TYPE, "group never ended", valid + tag(first, START_GROUP)),
        Corruption(Kind.TRUNCATED, "length past the end", valid + tag(first, LENGTH_DELIMITED) + varint(1000) + b"ab"),
        Corruption(Kind.TRUNCATED, "varint cut short", valid + tag(first, VARINT) + b"\xff\xff"),
        Corruption(Kind.TRUNCATED, "overlong varint", valid + tag(first, VARINT) + b"\xff" * 10 + b"\x01"),
        Corruption(Kind.TRUNCATED, "fixed64 cut short", valid + tag(first, FIXED64) + b"\x00" * 3),
    ]
    nested_message = next((path for path in paths if path[-1].type == FieldDescriptor.TYPE_MESSAGE), None)
    if nested_message is not None:
        # A nested message whose own length says more than it holds.
        inner = tag(1, LENGTH_DELIMITED) + varint(50) + b"x"
        found.append(
            Corruption(
                Kind.TRUNCATED,
                f"{dotted(nested_message)} inner length past its end",
                valid + nested(nested_message, length_delimited(nested_message[-1].number, inner)),
            )
        )
    for path in paths:
        if path[-1].type in _INTEGER_TYPES and not path[-1].is_repeated:
            for value in (2**64 - 1, 2**63, 2**32 + 5):
                raw = valid + nested(path, tag(path[-1].number, VARINT) + varint(value))
                found.append(Corruption(Kind.OUT_OF_RANGE, f"{dotted(path)} = {value}", raw))
    return found
