"""W3C Trace Context (https://www.w3.org/TR/trace-context/): reading and making `traceparent`.

`traceparent: 00-<trace id, 32 hex>-<parent id, 16 hex>-<flags, 2 hex>`, lowercase. A server
keeps the caller's trace id, makes a span id of its own for the call, and sends
`00-<trace id>-<its span id>-<flags>` downstream, so both services' log lines share the trace id.
Nothing here records spans: the ids exist to join log lines (and any tracing system added later).

Only what the spec asks of a participant that does not record spans: version `ff` and all-zero
ids are invalid; version 00 is exactly 55 characters; a later version is read by its first four
fields when what follows them starts with `-`; an invalid value is ignored and a new trace made.
Of the flags only `sampled` is defined and passed on; the others are sent as zero.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
VERSION = "00"
SAMPLED_FLAG = 0x01
# The spec's bound for tracestate (32 list members of at most 256 characters each is larger, but
# vendors may cut at 512 characters); anything longer is dropped rather than passed on.
MAX_TRACESTATE_LENGTH = 512
_VERSION_00_LENGTH = 55
_FIELDS = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


@dataclass(frozen=True)
class TraceParent:
    """A valid `traceparent`: the trace, the sender's span, and the flags."""

    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED_FLAG)


@dataclass(frozen=True)
class SpanContext:
    """This process's span of a call: what to log and what to send downstream."""

    trace_id: str
    span_id: str
    # The caller's span, when the call came with a valid traceparent.
    parent_id: str | None
    sampled: bool
    tracestate: str | None = None

    def traceparent(self) -> str:
        """The header for a call made within this span: this span is the callee's parent."""
        flags = SAMPLED_FLAG if self.sampled else 0
        return f"{VERSION}-{self.trace_id}-{self.span_id}-{flags:02x}"


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The caller's traceparent, or None when it is missing or invalid (never an error)."""
    text = None if value is None else value.strip(" \t")  # optional whitespace around a header value
    match = None if text is None else _FIELDS.match(text)
    if text is None or match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == VERSION:
        well_formed = len(text) == _VERSION_00_LENGTH
    else:
        # A later version may append fields, always after a dash; ff is never a version.
        well_formed = version != "ff" and (len(text) == _VERSION_00_LENGTH or text[_VERSION_00_LENGTH] == "-")
    if not well_formed or trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return TraceParent(trace_id=trace_id, parent_id=parent_id, flags=int(flags, 16))


def _clean_tracestate(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip(" \t")
    if not value or len(value) > MAX_TRACESTATE_LENGTH or not value.isascii() or not value.isprintable():
        return None
    return value


def new_trace_id() -> str:
    while True:  # all zeros is invalid; one draw in 2**128 needs a second one
        trace_id = secrets.token_hex(16)
        if trace_id != _ZERO_TRACE_ID:
            return trace_id


def new_span_id() -> str:
    while True:  # all zeros is invalid; one draw in 2**64 needs a second one
        span_id = secrets.token_hex(8)
        if span_id != _ZERO_SPAN_ID:
            return span_id


def server_span(traceparent: str | None, tracestate: str | None = None) -> SpanContext:
    """The span of a call received with these headers: the caller's trace continued, or (no
    valid traceparent) a new trace. A new trace is marked sampled: every call is logged, so this
    process does record it, and a tracing system added later keeps what it is sent."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        # The spec: a tracestate without a valid traceparent is discarded.
        return SpanContext(trace_id=new_trace_id(), span_id=new_span_id(), parent_id=None, sampled=True)
    return SpanContext(
        trace_id=parent.trace_id,
        span_id=new_span_id(),
        parent_id=parent.parent_id,
        sampled=parent.sampled,
        tracestate=_clean_tracestate(tracestate),
    )
