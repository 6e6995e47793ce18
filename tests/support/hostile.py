"""Hostile requests for any RPC, built from its protobuf descriptor, so a new RPC or field is
covered without writing a strategy for it.

Every field gets values picked by its type: strings that are empty, blank, huge, NUL-laden,
oddly encoded, SQL-ish, UUID-shaped in every lenient and broken spelling, or page tokens that
were tampered with; integers at the edges of their type and of our documented limits; enum
numbers nobody defined; timestamps at the ends of what protobuf allows and beyond, with
nanoseconds out of range; nested messages (to a bounded depth); repeated fields from empty to
over the documented maximum; oneofs with any one member or none.

`Material` mixes in what only the running system knows (real ids, real page tokens), and
`mutated` spoils one or two fields of a valid request, so the hostile value reaches the code
behind the first check rather than only the first check.
"""

from __future__ import annotations

import base64
import json
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from hypothesis import reject
from hypothesis import strategies as st

FieldDescriptor = descriptor.FieldDescriptor
# Bounds that keep one request small and quick to build, yet past every limit we document.
MAX_DEPTH = 4
MAX_ITEMS = 4
# Over the documented maxima (10 date-override windows, 50 weekly windows, 500 page size).
OVERSIZED_COUNTS = (11, 51, 501)
HUGE_LENGTH = 10_000
# The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
TIMESTAMP_MIN_S = -62_135_596_800
TIMESTAMP_MAX_S = 253_402_300_799
TIMESTAMP = "google.protobuf.Timestamp"
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Edges of the integer types and of the limits the protos document (minutes, days, credits, pages).
EDGE_INTEGERS = (
    0, 1, -1, 4, 5, 50, 240, 241, 480, 481, 500, 501, 730, 731, 10_000, 10_001, 43_200, 43_201,
    1_000_000, 1_000_001, 2**31 - 1, -(2**31), 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63),
)  # fmt: skip
UNKNOWN_ENUM_NUMBERS = (-1, 8, 99, 2**31 - 1, -(2**31))
NIL_UUID = "00000000-0000-0000-0000-000000000000"
EDGE_STRINGS = (
    "",
    " ",
    "\t\n\r ",
    "x" * HUGE_LENGTH,
    "é" * HUGE_LENGTH,
    "\x00",
    "a\x00b",
    "\x7f\x1b[31m",
    "\u202eevil\u202c",
    "\ufeff",
    "\u200b",
    "e\u0301\u0301\u0301",
    "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 \U0001f9d8\u200d\u2640\ufe0f",  # fraktur, a ZWJ emoji
    "\U0001f9d8" * 300,
    "' OR 1=1 --",
    "'; DROP TABLE booking.sessions; --",
    "\\",
    '"',
    "%s%n%x",
    "{0}{1}",
    "${jndi:ldap://example.invalid/a}",
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
    "null",
    "-1",
    "1e309",
    "NaN",
    "Infinity",
    NIL_UUID,
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "not-a-uuid",
    "+" + "1" * 31,
    "-" + "1" * 31,
    "٣" * 32,  # Arabic-Indic digits: int() reads them, so UUID() does too
    "1_2" + "3" * 29,
    "UTC",
    "Europe/London",
    "America/New_York",
    "Mars/Olympus_Mons",
    "Etc/GMT+14",  # no such zone (Etc/GMT-14 is UTC+14)
    "Etc/GMT-14",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "../zoneinfo/UTC",
    "/etc/localtime",
    "zone.tab",
    "posixrules",
    "00:00",
    "09:00",
    "23:59",
    "24:00",
    "24:01",
    "25:61",
    "9:00",
    "-01:00",
    "2026-03-29",
    "2026-02-30",
    "0001-01-01",
    "9999-12-31",
    "1999-12-31",
    "2100-01-01",
    "+2026-03-29",
    "20260329",
    "2026-W13-7",
    "2026-03-29T02:30",
    "2026-10-25T01:30",
    "0001-01-01T00:00",
    "9999-12-31T23:59:59",
    "2026-03-29T09:00:00+01:00",
    "2026-03-29T09:00:00.123456789",
    "2026-03-29T24:00",
)
_WEIRD_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # no lone surrogates: not UTF-8


@dataclass(frozen=True)
class Material:
    """Values from the running system: real ids (so a hostile request can hit real rows) and real
    page tokens (to tamper with)."""

    known_ids: tuple[str, ...] = ()
    page_tokens: tuple[str, ...] = ()


def uuid_spellings(value: str) -> tuple[str, ...]:
    """A UUID as it is, and in spellings that are lenient, padded, truncated or broken."""
    return (
        value,
        value.upper(),
        "{" + value + "}",
        "urn:uuid:" + value,
        value.replace("-", ""),
        f" {value} ",
        value + "\n",
        value[:-1],
        value + "0",
        value + "\x00",
        value.replace("-", "_"),
        value[:8],
    )


def encode_token(payload: object) -> str:
    """A token the way service_kit.pagination encodes one, around any JSON payload."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _payload(token: str) -> dict[str, Any]:
    decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert isinstance(decoded, dict), token
    return decoded


# Instants as a cursor spells them (isoformat): past the ends of what datetime holds once moved
# to UTC, at the ends of what it holds, outside our 2000..2100 window, naive, with offsets no
# zone has, impossible, or not an instant at all.
EDGE_INSTANT_TEXTS = (
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59.999999-00:01",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00.000001+00:01",
    "9999-12-31T23:59:59.999999+00:00",
    "0001-01-01T00:00:00+00:00",
    "1970-01-01T00:00:00+00:00",
    "1999-12-31T23:59:59.999999+00:00",
    "2100-01-01T00:00:00+00:00",
    "2026-03-29T09:00:00",
    "2026-03-29T09:00:00+23:59",
    "2026-03-29T09:00:00Z",
    "2026-02-30T09:00:00+00:00",
    "2026-03-29",
    "20260329T090000+0000",
)
# Parts a forged cursor may carry in any position: every JSON kind, at its edges.
EDGE_CURSOR_PARTS: tuple[object, ...] = (
    *EDGE_INSTANT_TEXTS,
    NIL_UUID,
    "not-a-uuid",
    "",
    0,
    -1,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    10**40,
    1.5,
    None,
    True,
    [],
    {},
)
_CURSOR_INSTANTS = st.one_of(
    st.sampled_from(EDGE_INSTANT_TEXTS),
    st.datetimes(
        timezones=st.sampled_from(
            (UTC, timezone(timedelta(hours=23, minutes=59)), timezone(-timedelta(hours=23, minutes=59)))
        )
    ).map(datetime.isoformat),
)
_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from((0, -1, 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**40, 2**31)),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    _CURSOR_INSTANTS,
    st.sampled_from(("", NIL_UUID, "not-a-uuid")),
    st.uuids().map(str),
    _WEIRD_TEXT,
)
# Anything JSON can say where a cursor belongs.
_CURSORS = st.one_of(
    st.lists(_JSON_SCALARS, max_size=3),
    st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    st.dictionaries(st.text(max_size=3), _JSON_SCALARS, max_size=2),
)


def _replaced(cursor: list[Any], index: int, part: object) -> list[Any]:
    return [*cursor[:index], part, *cursor[index + 1 :]]


def forged_cursors(cursor: list[Any]) -> list[list[Any]]:
    """`cursor` (a real one) with one part replaced by each edge part in turn, so the rest stays
    valid and the forged part reaches the code that uses it; and with a part too many or few."""
    spoiled = [_replaced(cursor, index, part) for index in range(len(cursor)) for part in EDGE_CURSOR_PARTS]
    return [*spoiled, cursor[:-1], [*cursor, cursor[-1]], [cursor]]


def forged_tokens(token: str) -> list[str]:
    """`token` with each of its forged cursors, under its real fingerprint."""
    payload = _payload(token)
    return [encode_token({**payload, "c": cursor}) for cursor in forged_cursors(payload["c"])]


def tampered_tokens(token: str) -> st.SearchStrategy[str]:
    """`token` re-encoded with a forged cursor (keeping the real fingerprint, so it passes the
    filter check and reaches the code that reads the cursor), broken byte-wise (flipped, cut,
    padded, re-alphabeted), or re-encoded with a forged fingerprint or payload."""
    payload = _payload(token)

    def flip(position: int, character: str) -> str:
        index = position % len(token)
        return token[:index] + character + token[index + 1 :]

    forged_cursor = st.one_of(
        st.sampled_from(forged_tokens(token)),
        st.tuples(st.integers(0, len(payload["c"]) - 1), _JSON_SCALARS).map(
            lambda spoil: encode_token({**payload, "c": _replaced(payload["c"], *spoil)})
        ),
        _CURSORS.map(lambda cursor: encode_token({**payload, "c": cursor})),
    )
    damaged = st.one_of(
        st.builds(flip, st.integers(0, len(token) - 1), st.sampled_from(string.printable + "é\x00")),
        st.integers(0, len(token) - 1).map(lambda cut: token[:cut]),
        st.sampled_from(("=", "==", "===", "!", "\x00", token)).map(lambda tail: token + tail),
        st.just(token.replace("-", "+").replace("_", "/")),
        st.just(token[::-1]),
        st.just(json.dumps(payload)),
    )
    forged = st.one_of(
        _JSON_SCALARS.map(lambda fingerprint: encode_token({**payload, "f": fingerprint})),
        st.just(encode_token({"c": payload.get("c")})),
        _JSON_SCALARS.map(encode_token),
    )
    return st.one_of(forged_cursor, damaged, forged)


def page_token_fields(message: Message) -> list[str]:
    """The names of `message`'s page token fields that hold a token."""
    return [f.name for f in message.DESCRIPTOR.fields if f.name.endswith("page_token") and getattr(message, f.name)]


def with_field(message: Message, name: str, value: object) -> Message:
    """A copy of `message` with one scalar field set."""
    changed = type(message)()
    changed.CopyFrom(message)
    setattr(changed, name, value)
    return changed


def retokened(base: Message) -> st.SearchStrategy[Message] | None:
    """`base` (a list request whose page_token is real) with that token tampered with and the
    filters untouched; None when `base` carries no page token."""
    names = page_token_fields(base)
    if not names:
        return None

    def tampered(name: str) -> st.SearchStrategy[Message]:
        return tampered_tokens(getattr(base, name)).map(lambda token: with_field(base, name, token))

    return st.one_of([tampered(name) for name in names])


def page_tokens(material: Material) -> st.SearchStrategy[str]:
    garbage = st.one_of(
        st.binary(max_size=96).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
        st.sampled_from(
            (
                "A" * 1024,
                "A" * 1025,
                encode_token("[" * 760),
                base64.urlsafe_b64encode(b"[" * 760).decode(),
                base64.urlsafe_b64encode(b'{"c":' + b"[" * 750).decode(),
                base64.urlsafe_b64encode(b"\xff\xfe\x00{").decode(),
                "eyJjIjpbXX0",  # {"c":[]}
            )
        ),
    )
    if not material.page_tokens:
        return garbage
    tokens = st.sampled_from(material.page_tokens)
    return st.one_of(tokens, tokens.flatmap(tampered_tokens), garbage)


def strings(material: Material, field_names: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Any string field: edge strings, UUIDs in many spellings (random and real), page tokens,
    the request's own field names (for FieldMask paths) and arbitrary text."""
    uuids = st.uuids().map(str).flatmap(lambda value: st.sampled_from(uuid_spellings(value)))
    parts: list[st.SearchStrategy[str]] = [st.sampled_from(EDGE_STRINGS), uuids, page_tokens(material), _WEIRD_TEXT]
    if material.known_ids:
        known = [spelling for value in material.known_ids for spelling in uuid_spellings(value)]
        parts.append(st.sampled_from(known))
    if field_names:
        parts.append(st.sampled_from(field_names))
    return st.one_of(parts)


def integers(field_type: int) -> st.SearchStrategy[int]:
    """Edge values that fit the type (protobuf refuses the rest when the message is built)."""
    low, high = _INTEGER_RANGES[field_type]
    return st.one_of(st.sampled_from([n for n in EDGE_INTEGERS if low <= n <= high]), st.integers(low, high))


def enums(enum_type: descriptor.EnumDescriptor) -> st.SearchStrategy[int]:
    defined = [value.number for value in enum_type.values]
    return st.sampled_from(sorted(set(defined) | set(UNKNOWN_ENUM_NUMBERS)))


def timestamp_values() -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos): the protobuf bounds and just past them, the epoch, our 2000..2100
    window's edges, the far past and future of int64, and nanoseconds out of range."""
    seconds = st.one_of(
        st.sampled_from(
            (
                TIMESTAMP_MIN_S,
                TIMESTAMP_MIN_S - 1,
                TIMESTAMP_MAX_S,
                TIMESTAMP_MAX_S + 1,
                0,
                -1,
                1,
                946_684_799,  # 1999-12-31T23:59:59Z
                946_684_800,  # 2000-01-01T00:00:00Z
                4_102_444_799,  # 2099-12-31T23:59:59Z
                4_102_444_800,  # 2100-01-01T00:00:00Z
                1_900_000_000,  # 2030, inside every window
                2**63 - 1,
                -(2**63),
            )
        ),
        st.integers(TIMESTAMP_MIN_S, TIMESTAMP_MAX_S),
        st.integers(*INT64),
    )
    nanos = st.one_of(
        st.just(0), st.sampled_from((999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31))), st.integers(*INT32)
    )
    return st.tuples(seconds, nanos)


def _field_names(message_type: descriptor.Descriptor, depth: int = 0) -> set[str]:
    names = {field.name for field in message_type.fields}
    if depth < MAX_DEPTH:
        for field in message_type.fields:
            if field.message_type is not None:
                names |= _field_names(field.message_type, depth + 1)
    return names


@dataclass(frozen=True)
class _Builder:
    material: Material
    field_names: tuple[str, ...]

    def message(self, message_type: descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message]:
        message_class = message_factory.GetMessageClass(message_type)
        if message_type.full_name == TIMESTAMP:
            return timestamp_values().map(lambda pair: message_class(seconds=pair[0], nanos=pair[1]))
        plain = [field for field in message_type.fields if field.containing_oneof is None]
        oneofs = list(message_type.oneofs)
        values = {field.name: self.value(field, depth) for field in message_type.fields}

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = message_class()
            chosen = [draw(st.sampled_from([None, *oneof.fields])) for oneof in oneofs]
            for field in plain + [field for field in chosen if field is not None]:
                assign(message, field, draw(values[field.name]))
            return message

        return build()

    def value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if not field.is_repeated:
            return self.single(field, depth)
        item = self.single(field, depth) if field.message_type is None else self.present(field.message_type, depth)
        oversized = st.tuples(item, st.sampled_from(OVERSIZED_COUNTS)).map(lambda pair: [pair[0]] * pair[1])
        return st.one_of(st.lists(item, max_size=MAX_ITEMS), oversized)

    def single(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            return self.nested(field.message_type, depth)
        if field.enum_type is not None:
            return enums(field.enum_type)
        if field.type in _INTEGER_RANGES:
            return integers(field.type)
        if field.type == FieldDescriptor.TYPE_STRING:
            return strings(self.material, self.field_names)
        return _OTHER_SCALARS[field.type]

    def nested(self, message_type: descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message | None]:
        """Unset, or a hostile message."""
        return st.one_of(st.none(), self.present(message_type, depth))

    def present(self, message_type: descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message]:
        """A hostile message one level down: deferred, so a recursive type does not recurse here;
        at the depth bound, an empty one."""
        if depth >= MAX_DEPTH:
            return st.just(message_factory.GetMessageClass(message_type)())
        return st.deferred(lambda: self.message(message_type, depth + 1))


_OTHER_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
}


def assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Sets `field` to `value` (None leaves a message field unset); a value protobuf itself
    refuses is no request anyone can send, so the example is dropped."""
    try:
        if value is None:
            message.ClearField(field.name)
        elif field.is_repeated:
            message.ClearField(field.name)
            container = getattr(message, field.name)
            if field.message_type is not None:
                for item in value:
                    container.add().CopyFrom(item)
            else:
                container.extend(value)
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(value)
        else:
            setattr(message, field.name, value)
    except (ValueError, TypeError):
        reject()


def requests(message_type: descriptor.Descriptor, material: Material) -> st.SearchStrategy[Message]:
    """Hostile messages of `message_type`: every field drawn by its type."""
    builder = _Builder(material, tuple(sorted(_field_names(message_type))))
    return builder.message(message_type, 0)


def mutated(base: Message, material: Material, depth: int = 0) -> st.SearchStrategy[Message]:
    """`base` (a valid request) with one or two fields spoiled: a scalar (or a timestamp) gets a
    hostile value; a message, or one item of a repeated message, is mostly mutated in turn, so
    the rest of it stays valid, and sometimes replaced by a hostile one."""
    message_type = cast(descriptor.Descriptor, base.DESCRIPTOR)
    builder = _Builder(material, tuple(sorted(_field_names(message_type))))
    fields = list(message_type.fields)

    @st.composite
    def mutate(draw: st.DrawFn) -> Message:
        message = type(base)()
        message.CopyFrom(base)
        count = draw(st.integers(1, min(2, len(fields))))
        for field in draw(st.permutations(fields))[:count]:
            target = _nested_target(draw, message, field) if depth < MAX_DEPTH else None
            if target is not None and draw(st.integers(0, 3)) > 0:
                target.CopyFrom(draw(mutated(target, material, depth + 1)))
            else:
                assign(message, field, draw(builder.value(field, depth)))
        return message

    return mutate()


def _nested_target(draw: st.DrawFn, message: Message, field: FieldDescriptor) -> Message | None:
    """The present message (or one item of a repeated message) in `field` to mutate in turn."""
    if field.message_type is None or field.message_type.full_name == TIMESTAMP:
        return None
    value = getattr(message, field.name)
    if field.is_repeated:
        return value[draw(st.integers(0, len(value) - 1))] if len(value) else None
    return value if message.HasField(field.name) else None
