"""service_kit.decoding: why bytes protobuf refused are not a request, and what of them is readable."""

from __future__ import annotations

import logging

import pytest
from google.protobuf.message import Message

from booking.v1 import booking_pb2
from credit.v1 import credit_pb2
from service_kit.decoding import MAX_WALKED_FIELDS, InvalidUtf8, MalformedRequest, RequestDecoder
from service_kit.logs import GRPC_CYTHON_LOGGER, InvalidMetadataEncoding
from tests.support.wire import END_GROUP, length_delimited, tag, varint

OWNER = "3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b"


def decoder(message_type: type[Message]) -> RequestDecoder:
    found = RequestDecoder.of(message_type.FromString)
    assert found is not None
    return found


def refusal(message_type: type[Message], raw: bytes) -> MalformedRequest:
    with pytest.raises(MalformedRequest) as raised:
        decoder(message_type).decode(raw)
    return raised.value


def test_a_valid_request_decodes_as_protobuf_would() -> None:
    request = credit_pb2.ReserveCreditsRequest(reservation_id=OWNER, owner_id=OWNER, amount=3, reference="r")

    assert decoder(credit_pb2.ReserveCreditsRequest).decode(request.SerializeToString()) == request


def test_only_generated_deserializers_get_a_decoder() -> None:
    assert RequestDecoder.of(lambda raw: raw) is None
    assert RequestDecoder.of(credit_pb2.GetBalanceRequest.FromString) is not None


def test_invalid_utf8_names_every_bad_field_and_keeps_the_rest_readable() -> None:
    valid = credit_pb2.ReserveCreditsRequest(owner_id=OWNER, amount=3).SerializeToString()
    raw = valid + length_delimited(1, b"\xff\xfe") + length_delimited(4, b"caf\xc3")

    error = refusal(credit_pb2.ReserveCreditsRequest, raw)

    assert isinstance(error, InvalidUtf8) and error.reason == "INVALID_UTF8"
    assert [v.field for v in error.violations] == ["reservation_id", "reference"]
    readable = error.readable
    assert isinstance(readable, credit_pb2.ReserveCreditsRequest)
    assert readable.owner_id == OWNER and readable.amount == 3  # what authorization reads
    assert readable.reservation_id == "??"


def test_invalid_utf8_deep_in_a_repeated_message_is_named_with_its_index() -> None:
    item = credit_pb2.ReserveCreditsRequest(owner_id=OWNER).SerializeToString()
    raw = length_delimited(1, item) + length_delimited(1, item + length_delimited(2, b"\x80"))

    error = refusal(credit_pb2.BatchReserveCreditsRequest, raw)

    assert [v.field for v in error.violations] == ["requests[1].owner_id"]


def test_a_field_mask_path_is_a_string_too() -> None:
    raw = length_delimited(2, length_delimited(1, b"display_name\xff"))

    error = refusal(booking_pb2.UpdateTherapistRequest, raw)

    assert [v.field for v in error.violations] == ["update_mask.paths[0]"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (tag(2, 2) + varint(40) + b"short", "owner_id"),
        (tag(3, 0) + b"\xff\xff", "amount"),
        (tag(3, 0) + b"\xff" * 10 + b"\x01", "amount"),
        (tag(1, 6), ""),
        (tag(1, 7), ""),
        (b"\x00\x01", ""),
        (tag(9, END_GROUP), ""),
    ],
)
def test_bytes_that_are_no_message_name_the_field_where_the_break_is_inside_one(raw: bytes, field: str) -> None:
    error = refusal(credit_pb2.ReserveCreditsRequest, raw)

    assert error.reason == "MALFORMED_REQUEST"
    assert [v.field for v in error.violations] == ([field] if field else [])
    assert error.readable is None
    assert "DecodeError" not in error.message and "<class" not in error.message


def test_the_walk_is_bounded() -> None:
    # Many small unknown fields, then a broken one: the walk stops at its bound and names nothing.
    raw = (tag(15, 0) + b"\x01") * (MAX_WALKED_FIELDS + 1) + tag(1, 7)

    error = refusal(credit_pb2.ReserveCreditsRequest, raw)

    assert error.reason == "MALFORMED_REQUEST" and error.violations == ()


def test_grpc_metadata_encoding_errors_become_warnings_without_traceback() -> None:
    try:
        b"\xff".decode("utf8")
    except UnicodeDecodeError:
        record = logging.getLogger(GRPC_CYTHON_LOGGER).makeRecord(
            GRPC_CYTHON_LOGGER, logging.ERROR, __file__, 1, "Invalid encoding on %s", (b"Bearer \xff",), None
        )
    record.exc_info = (UnicodeDecodeError, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), None)

    assert InvalidMetadataEncoding().filter(record)

    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "Bearer" not in record.getMessage(), "the value (maybe a token) is not logged"
