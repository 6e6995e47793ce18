"""One booking, one trace: OpenTelemetry through the gateway, booking, credit and SQL.

Both services run as real processes with tracing on by the standard variables, exporting over
OTLP/gRPC to a real receiver in this test (tests/support/otlp.py); the real Envoy gateway sits in
front. One CreateBooking over HTTP, sent with a W3C `traceparent` as a caller that traces would
send it, must come back as one trace: booking's server span a child of the caller's span, every
other span (booking's SQL, its batches, its calls to credit, credit's server spans and SQL) a
descendant of it, in both services. The spans are read after a graceful stop, which exports what
the processes still buffered. Envoy's own tracing is not enabled, so the gateway adds no span: it
passes the header on.

Tracing off (the default) is tests/integration/test_observability.py's process test: no trace id
is made or logged there.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from google.protobuf import json_format

from service_kit.config import ConfigError
from service_kit.tracing import Exporter, TracingSettings
from tests.support.gateway import request_json, running_gateway
from tests.support.otlp import ReceivedSpan, otlp_receiver
from tests.support.processes import log_events, running_stack
from tests.support.world import World, future_hour

pytestmark = pytest.mark.timeout(120)

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
CLIENT = 3


def descends_from(span: ReceivedSpan, ancestor_id: str, by_id: dict[str, ReceivedSpan]) -> bool:
    seen = set()
    current: ReceivedSpan | None = span
    while current is not None and current.span_id not in seen:
        if current.parent_id == ancestor_id:
            return True
        seen.add(current.span_id)
        current = by_id.get(current.parent_id)
    return False


async def test_one_booking_through_the_gateway_is_one_trace(postgres_server_url: str, tmp_path: Path) -> None:
    async with otlp_receiver() as receiver:
        tracing_env = receiver.environment()
        async with running_stack(
            postgres_server_url, tmp_path / "stack", booking_env=tracing_env, credit_env=tracing_env
        ) as stack:
            world = await World.create(stack.booking_stub(), stack.credit_stub())
            async with running_gateway(
                tmp_path / "gateway", booking_upstream=stack.bookings[0].address, credit_upstream=stack.credit.address
            ) as gateway:
                request = world.booking_request(future_hour(days_ahead=2, hour=9), request_id=f"trace-{uuid.uuid4()}")
                response = await request_json(
                    "POST",
                    f"{gateway.url}/v1/bookings",
                    json_format.MessageToDict(request, preserving_proto_field_name=True),
                    headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"},
                )
            assert response.status == 200, response.text
            booking_id = response.json()["booking"]["booking_id"]
            # A graceful stop exports what each process still buffers.
            for process in (*stack.bookings, stack.credit):
                assert await stack.stop(process) == 0, stack.logs()
            booking_log, credit_log = log_events(stack.bookings[0]), log_events(stack.credit)

    spans = receiver.trace(CALLER_TRACE_ID)
    by_id = {span.span_id: span for span in spans}
    summary = "\n".join(f"{s.service} {s.name} {s.span_id}<-{s.parent_id}" for s in spans)
    # The caller's span is the root: exactly one span is its child, booking's server span.
    (create,) = [span for span in spans if span.parent_id == CALLER_SPAN_ID]
    assert (create.service, create.name, create.kind) == (
        "booking-service",
        "/booking.v1.BookingService/CreateBooking",
        SERVER,
    ), summary
    assert create.attribute("rpc.grpc.status_code") == 0
    # Every other span of the trace hangs under it, in a tree with no dangling parent.
    for span in spans:
        assert span is create or descends_from(span, create.span_id, by_id), f"{span.name} is detached:\n{summary}"
    # Credit's server spans: the reserve and the commit, each a child of a client span of booking's.
    credit_servers = [s for s in spans if s.service == "credit-service" and s.kind == SERVER]
    names = {s.name.rsplit("/", 1)[1] for s in credit_servers}
    assert {"ReserveCredits", "CommitReservation"} <= names or {"BatchReserveCredits"} <= names, summary
    for server in credit_servers:
        client = by_id[server.parent_id]
        assert (client.service, client.kind, client.name) == ("booking-service", CLIENT, server.name), summary
    # SQL in both services (asyncpg's instrumentation), under the call that ran it.
    for service in ("booking-service", "credit-service"):
        sql = [s for s in spans if s.service == service and s.attribute("db.system") == "postgresql"]
        assert sql, f"no SQL span from {service}:\n{summary}"
    # The batched steps: each batch span is linked to the caller it carried (this call's span).
    batches = [s for s in spans if s.name.startswith("batch ")]
    assert batches, summary
    for batch in batches:
        assert create.span_id in batch.linked_span_ids, summary
        assert batch.attribute("batch.size") == 1

    # The log lines of the call carry its trace and the span they were written in.
    confirmed = [e for e in booking_log if e.get("event") == "booking_confirmed" and e.get("booking_id") == booking_id]
    assert [e["trace_id"] for e in confirmed] == [CALLER_TRACE_ID]
    (finished,) = [e for e in booking_log if e.get("event") == "rpc_finished" and e.get("rpc") == "CreateBooking"]
    assert (finished["trace_id"], finished["span_id"]) == (CALLER_TRACE_ID, create.span_id)
    credit_lines = [e for e in credit_log if e.get("event") == "rpc_finished" and e.get("trace_id") == CALLER_TRACE_ID]
    assert {e["span_id"] for e in credit_lines} == {s.span_id for s in credit_servers}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Exporter.NONE),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, Exporter.OTLP),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, Exporter.OTLP),
        ({"OTEL_TRACES_EXPORTER": "console"}, Exporter.CONSOLE),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, Exporter.NONE),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, Exporter.NONE),
    ],
)
def test_tracing_is_off_unless_an_exporter_is_configured(env: dict[str, str], expected: Exporter) -> None:
    settings = TracingSettings.from_environment(env, "booking-service")
    assert settings.exporter is expected
    assert settings.enabled is (expected is not Exporter.NONE)


def test_tracing_settings_refuse_what_is_not_installed() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        TracingSettings.from_environment(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "x"
        )
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        TracingSettings.from_environment({"OTEL_TRACES_EXPORTER": "zipkin"}, "x")
    assert TracingSettings.from_environment({"OTEL_SERVICE_NAME": "b-1"}, "x").service_name == "b-1"
