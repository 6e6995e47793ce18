"""Prometheus metrics of one service process, served on a side port at /metrics.

The gRPC metrics carry go-grpc-prometheus' names and labels (docs/conventions.md), so dashboards and
alerts written for Go services work unchanged: `grpc_server_started_total`,
`grpc_server_handled_total`, `grpc_server_handling_seconds` from the server interceptor's
observers, and `grpc_client_*` from a client interceptor on outgoing channels. The database pool
is read when scraped. Each service adds its own metrics to the same registry, and every registry
carries prometheus_client's default process and platform collectors (`process_*`: CPU seconds,
resident memory, open file descriptors, start time; `python_info`; `python_gc_*`), as its global
registry would.

Every `Runtime` has a registry of its own rather than prometheus_client's global one, so that
servers started side by side in one test process count separately.

The endpoint is a small asyncio HTTP server on the event loop (no thread): collectors then read
the pool's state on the thread that changes it, and the server is bounded (connections, request
size, time) and stops with the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pool
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = structlog.get_logger()

UNARY = "unary"
# go-grpc-prometheus writes codes as Go's codes.Code.String() does.
GRPC_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# The HTTP endpoint's bounds: Prometheus sends a short GET and scrapes every few seconds.
MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
METRICS_PATH = "/metrics"


def new_registry() -> CollectorRegistry:
    """An empty registry for one runtime. go-grpc-prometheus emits no `*_created` series, and
    neither do we (prometheus_client's switch for them is process-wide)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    return CollectorRegistry(auto_describe=True)


def register_process_collectors(registry: CollectorRegistry) -> None:
    """`process_*`, `python_info` and `python_gc_*` on `registry`: prometheus_client's own
    collectors of this process (the ones its global registry carries), read when scraped."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)


def code_name(code: grpc.StatusCode) -> str:
    return GRPC_CODE_NAMES.get(code, "Unknown")


def split_method(method: str | bytes) -> tuple[str, str]:
    """`/pkg.Service/Method` as (service, method)."""
    text = method.decode() if isinstance(method, bytes) else method
    service, _, name = text.lstrip("/").rpartition("/")
    return service, name


class GrpcMetrics:
    """The go-grpc-prometheus counters and histograms, for both sides of a call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.server_started = Counter(
            "grpc_server_started_total", "Total number of RPCs started on the server.", _LABELS, registry=registry
        )
        self.server_handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.server_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            _LABELS,
            registry=registry,
        )
        self.client_started = Counter(
            "grpc_client_started_total", "Total number of RPCs started on the client.", _LABELS, registry=registry
        )
        self.client_handled = Counter(
            "grpc_client_handled_total",
            "Total number of RPCs completed by the client, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.client_handling_seconds = Histogram(
            "grpc_client_handling_seconds",
            "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
            _LABELS,
            registry=registry,
        )
        self._server: dict[tuple[str, str], MethodSeries] = {}
        self._client: dict[tuple[str, str], MethodSeries] = {}

    def initialize_service(self, service_name: str) -> None:
        """Creates every method's server series at zero, as go-grpc-prometheus'
        InitializeMetrics does: a series that appears only at its first call hides that call
        from rate() and increase()."""
        service = descriptor_pool.Default().FindServiceByName(service_name)
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue  # only unary calls are counted (the interceptor wraps unary handlers)
            labels = (UNARY, service_name, method.name)
            self.server_started.labels(*labels)
            self.server_handling_seconds.labels(*labels)
            for code_label in GRPC_CODE_NAMES.values():
                self.server_handled.labels(*labels, code_label)

    # The server interceptor's observers (service_kit.interceptor.RpcStartObserver, RpcObserver).

    def server_call_started(self, service: str, rpc: str) -> None:
        self._server_series(service, rpc).started.inc()

    def server_call_finished(
        self, service: str, rpc: str, code: grpc.StatusCode, reason: str | None, duration_s: float
    ) -> None:
        del reason  # go-grpc-prometheus counts by code only
        series = self._server_series(service, rpc)
        series.handled(code).inc()
        series.seconds.observe(duration_s)

    def client_series(self, service: str, method: str) -> MethodSeries:
        found = self._client.get((service, method))
        if found is None:
            labels = (UNARY, service, method)
            found = self._client[(service, method)] = MethodSeries(
                self.client_started.labels(*labels),
                self.client_handling_seconds.labels(*labels),
                self.client_handled,
                labels,
            )
        return found

    def _server_series(self, service: str, rpc: str) -> MethodSeries:
        found = self._server.get((service, rpc))
        if found is None:
            labels = (UNARY, service, rpc)
            found = self._server[(service, rpc)] = MethodSeries(
                self.server_started.labels(*labels),
                self.server_handling_seconds.labels(*labels),
                self.server_handled,
                labels,
            )
        return found

    def client_interceptor(self) -> ClientMetricsInterceptor:
        return ClientMetricsInterceptor(self)


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts and times unary calls on a channel. It sits above the channel's own retries, so
    a call that the retry policy repeated counts once, with its final code (as in Go)."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        series = self._metrics.client_series(*split_method(client_call_details.method))
        series.started.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None = None
        try:
            call = await continuation(client_call_details, request)
            # Waits for the end of the call; the caller awaiting `call` then gets its answer
            # or its error as without this interceptor.
            code = await call.code()
        except asyncio.CancelledError:
            # The caller was cancelled (its own caller went away, or its budget ran out): grpc
            # cancels this interceptor's task, not the call, so end the call here, as awaiting
            # it directly would. Otherwise it would run on, and a hold could be made after the
            # booking gave up.
            if call is not None:
                call.cancel()
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise
        finally:
            series.handled(code).inc()
            series.seconds.observe(time.perf_counter() - started)
        return call


class MethodSeries:
    """The labelled series of one method, looked up once: prometheus_client's labels() costs
    more than the increment it leads to, and the interceptors count every call."""

    def __init__(self, started: Counter, seconds: Histogram, handled: Counter, labels: tuple[str, ...]) -> None:
        self.started = started
        self.seconds = seconds
        self._handled_family = handled
        self._labels = labels
        self._handled: dict[grpc.StatusCode, Counter] = {}

    def handled(self, code: grpc.StatusCode) -> Counter:
        found = self._handled.get(code)
        if found is None:
            found = self._handled[code] = self._handled_family.labels(*self._labels, code_name(code))
        return found


@dataclass(frozen=True)
class PoolUsage:
    in_use: int
    idle: int
    max_size: int


class PoolCollector(Collector):
    """`db_pool_connections{service,state}` and `db_pool_max_connections{service}`, read from
    the pool when scraped (on the event loop: see the module's docstring)."""

    def __init__(self, service: str, usage: Callable[[], PoolUsage]) -> None:
        self._service = service
        self._usage = usage

    def collect(self) -> Iterable[GaugeMetricFamily]:
        usage = self._usage()
        connections = GaugeMetricFamily(
            "db_pool_connections",
            "Open connections of the database pool, by state (in_use: lent to a call or a worker).",
            labels=("service", "state"),
        )
        connections.add_metric((self._service, "in_use"), usage.in_use)
        connections.add_metric((self._service, "idle"), usage.idle)
        maximum = GaugeMetricFamily(
            "db_pool_max_connections", "The bound of the database pool (*_DATABASE_POOL_MAX_SIZE).", labels=("service",)
        )
        maximum.add_metric((self._service,), usage.max_size)
        return (connections, maximum)


class MetricsServer:
    """`GET /metrics` over HTTP/1.1 on the event loop, one request per connection."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        self._registry = registry
        self._address = address
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> None:
        host, _, port = self._address.rpartition(":")
        self._server = await asyncio.start_server(
            self._handle, host.strip("[]"), int(port), limit=MAX_REQUEST_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self._response(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, oversized or vanished client gets no answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _response(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _http(400, "Bad Request", b"bad request\n")
        method, target, _ = parts
        if target.split("?", 1)[0] != METRICS_PATH:
            return _http(404, "Not Found", b"not found: the metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _http(405, "Method Not Allowed", b"GET only\n", extra=(("Allow", "GET, HEAD"),))
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        return _http(200, "OK", body, content_type=content_type, head_only=method == "HEAD")


def _http(
    status: int,
    phrase: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
