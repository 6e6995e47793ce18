"""The W3C traceparent reader and maker (service_kit/tracecontext.py), against the spec's rules."""

from __future__ import annotations

import re

import pytest

from service_kit.tracecontext import SpanContext, TraceParent, new_span_id, new_trace_id, parse_traceparent, server_span

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
HEX = re.compile(r"^[0-9a-f]+$")


def test_a_valid_traceparent_is_read_field_by_field() -> None:
    assert parse_traceparent(VALID) == TraceParent(trace_id=TRACE_ID, parent_id=PARENT_ID, flags=1)
    assert parse_traceparent(VALID).sampled  # type: ignore[union-attr]
    unsampled = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00")
    assert unsampled is not None and not unsampled.sampled


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_traceparent(f"  {VALID}\t") == parse_traceparent(VALID)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param(f"ff-{TRACE_ID}-{PARENT_ID}-01", id="version ff"),
        pytest.param(f"00-{'0' * 32}-{PARENT_ID}-01", id="all-zero trace id"),
        pytest.param(f"00-{TRACE_ID}-{'0' * 16}-01", id="all-zero parent id"),
        pytest.param(VALID.upper(), id="uppercase"),
        pytest.param(f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", id="uppercase trace id"),
        pytest.param(f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", id="short trace id"),
        pytest.param(f"00-{TRACE_ID}0-{PARENT_ID}-01", id="long trace id"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01", id="short parent id"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}-1", id="short flags"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}-0g", id="flags not hex"),
        pytest.param(f"0-{TRACE_ID}-{PARENT_ID}-01", id="short version"),
        pytest.param(f"00-{TRACE_ID.replace('4', 'x')}-{PARENT_ID}-01", id="trace id not hex"),
        pytest.param(f"00_{TRACE_ID}_{PARENT_ID}_01", id="wrong separators"),
        pytest.param(f"{VALID}-extra", id="version 00 with more fields"),
        pytest.param(f"{VALID}x", id="version 00 with trailing characters"),
        pytest.param(f"01-{TRACE_ID}-{PARENT_ID}-01x", id="later version, trailing characters without a dash"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}", id="no flags"),
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    expected = TraceParent(trace_id=TRACE_ID, parent_id=PARENT_ID, flags=1)
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-01") == expected
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds") == expected


def test_a_server_span_continues_the_callers_trace_with_a_span_of_its_own() -> None:
    span = server_span(VALID, "vendor=value")
    assert span.trace_id == TRACE_ID
    assert span.parent_id == PARENT_ID
    assert span.span_id != PARENT_ID and len(span.span_id) == 16 and HEX.match(span.span_id)
    assert span.sampled
    assert span.tracestate == "vendor=value"
    # Downstream, this span is the parent.
    assert span.traceparent() == f"00-{TRACE_ID}-{span.span_id}-01"
    assert parse_traceparent(span.traceparent()) == TraceParent(TRACE_ID, span.span_id, 1)


def test_only_the_sampled_flag_is_passed_on() -> None:
    assert server_span(f"00-{TRACE_ID}-{PARENT_ID}-09").traceparent().endswith("-01")
    assert server_span(f"00-{TRACE_ID}-{PARENT_ID}-02").traceparent().endswith("-00")


@pytest.mark.parametrize("value", [None, "garbage", f"ff-{TRACE_ID}-{PARENT_ID}-01"])
def test_without_a_valid_traceparent_a_new_trace_starts_and_tracestate_is_dropped(value: str | None) -> None:
    span = server_span(value, "vendor=value")
    assert span.trace_id != TRACE_ID and len(span.trace_id) == 32 and HEX.match(span.trace_id)
    assert span.parent_id is None and span.tracestate is None
    assert span.sampled
    assert parse_traceparent(span.traceparent()) is not None


def test_an_oversized_or_unprintable_tracestate_is_not_passed_on() -> None:
    assert server_span(VALID, "a=" + "b" * 600).tracestate is None
    assert server_span(VALID, "a=b\x00").tracestate is None
    assert server_span(VALID, "  ").tracestate is None


def test_made_ids_are_lowercase_hex_of_the_right_length_and_never_repeat() -> None:
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == len(spans) == 1000
    assert all(len(t) == 32 and HEX.match(t) and t != "0" * 32 for t in traces)
    assert all(len(s) == 16 and HEX.match(s) and s != "0" * 16 for s in spans)


def test_a_span_renders_its_traceparent() -> None:
    span = SpanContext(trace_id=TRACE_ID, span_id="b7ad6b7169203331", parent_id=None, sampled=False)
    assert span.traceparent() == f"00-{TRACE_ID}-b7ad6b7169203331-00"
