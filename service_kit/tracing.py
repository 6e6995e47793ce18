"""Distributed tracing with OpenTelemetry: off unless an exporter is configured, the standard way.

Off (the default, and `make run`'s): nothing is installed. No interceptor, no wrapper around
asyncpg, no span or id is made per call; logs carry the request id only. On: the SDK's
TracerProvider with a batch processor and the exporter the standard `OTEL_*` variables name;
the official instrumentations make the spans: `opentelemetry-instrumentation-grpc` (the aio
server interceptor and the aio client interceptors) and `opentelemetry-instrumentation-asyncpg`
(one span per statement). W3C `traceparent`/`tracestate` are read from incoming calls and written
on outgoing ones by the global propagator (`OTEL_PROPAGATORS`, W3C trace context and baggage by
default), so one booking is one trace across the gateway, booking, credit and SQL.

When is it on (docs/operations.md, "Traces"):
- `OTEL_SDK_DISABLED=true`: off, whatever else is set.
- `OTEL_TRACES_EXPORTER`: `otlp` (OTLP over gRPC), `console` (spans as JSON on stdout, for a
  look in development), or `none`.
- Unset: on with `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
  is set, off otherwise. (The specification's default exporter is `otlp`; we ask for an endpoint
  too, so that a service nobody configured does not retry a collector on localhost forever.)

The exporter reads its own variables (endpoint, headers, timeout, `..._INSECURE`), the
TracerProvider its sampler (`OTEL_TRACES_SAMPLER`, parent-based always-on by default) and the
batch processor its bounds (`OTEL_BSP_*`). `OTEL_SERVICE_NAME` names the service (default: the
service's own name, e.g. `booking-service`); `OTEL_RESOURCE_ATTRIBUTES` adds attributes. Only
OTLP over gRPC is installed: `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` is refused at start with
a message, rather than silently exporting nothing.

The process has one tracing (OpenTelemetry's providers and asyncpg's instrumentation are
process-wide): `install` once from main, before the server starts; `current()` is what the
runtime, the clients and the coalescers consult.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from service_kit.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanContext, Tracer

log = structlog.get_logger()

# The gRPC services that get no span: probes call them every few seconds, and a trace of each
# would bury the calls that matter.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
_TRUE = frozenset({"true", "1", "yes", "on"})
_OTLP_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Exporter(enum.Enum):
    NONE = "none"
    OTLP = "otlp"
    CONSOLE = "console"


@dataclass(frozen=True)
class TracingSettings:
    exporter: Exporter
    service_name: str

    @property
    def enabled(self) -> bool:
        return self.exporter is not Exporter.NONE

    @classmethod
    def from_environment(cls, env: Mapping[str, str], default_service_name: str) -> TracingSettings:
        """The standard variables, read as the module's docstring says (ConfigError if malformed)."""
        service_name = (env.get("OTEL_SERVICE_NAME") or "").strip() or default_service_name
        if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() in _TRUE:
            return cls(Exporter.NONE, service_name)
        raw = (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
        if not raw:
            configured = any((env.get(name) or "").strip() for name in _ENDPOINT_VARIABLES)
            return cls(Exporter.OTLP if configured else Exporter.NONE, service_name)
        names = [name.strip() for name in raw.split(",") if name.strip()]
        known = {exporter.value: exporter for exporter in Exporter}
        if len(names) != 1 or names[0] not in known:
            raise ConfigError(f"OTEL_TRACES_EXPORTER must be one of otlp, console, none; got {raw!r}")
        exporter = known[names[0]]
        if exporter is Exporter.OTLP:
            for name in _OTLP_PROTOCOL_VARIABLES:
                protocol = (env.get(name) or "").strip()
                if protocol and protocol != "grpc":
                    raise ConfigError(f"{name}={protocol!r}: only grpc (OTLP over gRPC) is installed")
                if protocol:
                    break
        return cls(exporter, service_name)


@dataclass
class Tracing:
    """The process's tracing. Disabled: every method returns nothing to install."""

    settings: TracingSettings
    provider: TracerProvider | None = None
    _batch_tracer: Tracer | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """To put first in the server's list, so that its span is the active one for the
        runtime's own interceptor and everything the handler does."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters  # noqa: PLC0415

        untraced = filters.negate(filters.any_of(*(filters.service_name(name) for name in UNTRACED_SERVICES)))
        # The instrumentation ships no type annotations.
        return [aio_server_interceptor(tracer_provider=self.provider, filter_=untraced)]  # type: ignore[no-untyped-call]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """For the channels a service calls others on: a client span per call, and the
        `traceparent` header naming it."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors  # noqa: PLC0415

        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider
        )
        return interceptors

    def batch_tracer(self) -> Tracer | None:
        """The tracer of coalesced batches (service_kit/batching.py); None when off."""
        return self._batch_tracer

    def shutdown(self) -> None:
        """Exports what is buffered and stops (blocking, bounded by the exporter's timeout)."""
        if self.provider is not None:
            self.provider.shutdown()


_DISABLED = Tracing(TracingSettings(Exporter.NONE, "unknown"))
_current = _DISABLED


def current() -> Tracing:
    """The process's tracing (disabled until `install` turned it on)."""
    return _current


def install(settings: TracingSettings) -> Tracing:
    """When tracing is on, installs the SDK, the exporter and the asyncpg instrumentation for the
    whole process. Call once, from main, after the logging and before the server starts."""
    global _current  # noqa: PLW0603  # process-wide, as OpenTelemetry's own providers are
    if not settings.enabled:
        _current = Tracing(settings)
        return _current
    assert not _current.enabled, "tracing is configured once per process"
    provider = _new_provider(settings)
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor  # noqa: PLC0415

    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _current = Tracing(settings, provider, provider.get_tracer("service_kit.batching"))
    log.info("tracing_enabled", exporter=settings.exporter.value, service_name=settings.service_name)
    return _current


def _new_provider(settings: TracingSettings) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if settings.exporter is Exporter.OTLP:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter(service_name=settings.service_name)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# --- what the runtime's interceptor and the coalescers use, only when tracing is on ---


def current_span_context() -> SpanContext | None:
    """The active span's context when it is a real one (a caller to link a batch to)."""
    from opentelemetry import trace  # noqa: PLC0415

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def log_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: `trace_id` and `span_id` of the active span, when there is one."""
    context = current_span_context()
    if context is not None:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def batch_span_options(callers: Sequence[SpanContext | None]) -> dict[str, Any]:
    """Arguments of `start_as_current_span` for a batch serving `callers`: the first caller's
    span is its parent (so a lone caller's trace holds the whole call), and every caller's span
    is linked (so each caller's trace leads to the batch that carried its item)."""
    from opentelemetry import trace  # noqa: PLC0415

    valid = [context for context in callers if context is not None]
    options: dict[str, Any] = {"links": [trace.Link(context) for context in valid]}
    if valid:
        options["context"] = trace.set_span_in_context(trace.NonRecordingSpan(valid[0]))
    return options
