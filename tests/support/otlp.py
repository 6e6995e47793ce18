"""A real OTLP/gRPC trace receiver for tests: what a collector would get from the services.

It serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` on 127.0.0.1 (plaintext
gRPC, as an in-cluster collector usually is) and keeps every span it is sent, flattened with the
name of the service that sent it (`service.name` of its resource). The services export to it by
the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>` and
`OTEL_EXPORTER_OTLP_INSECURE=true` (`environment()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def kind(self) -> int:
        return self.span.kind

    def attribute(self, key: str) -> object:
        for attribute in self.span.attributes:
            if attribute.key == key:
                value = attribute.value
                return getattr(value, value.WhichOneof("value") or "string_value")
        return None

    @property
    def linked_span_ids(self) -> set[str]:
        return {link.span_id.hex() for link in self.span.links}


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    port: int = 0

    async def Export(  # the generated servicer's method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def environment(self) -> dict[str, str]:
        """What a service needs to export here, and soon (the batch processor waits 5 s by default)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver
    finally:
        await server.stop(0)
