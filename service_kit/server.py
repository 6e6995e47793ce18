"""Serving one service: the aio server, health, reflection, readiness, workers, graceful shutdown.

Health starts NOT_SERVING and turns SERVING only while the database is reachable and its schema
is at the version this build needs; a readiness loop keeps checking. On SIGTERM or SIGINT the
server enters graceful shutdown (health NOT_SERVING so balancers drain it), stops accepting
calls, lets running ones finish within the grace period, stops its workers, closes the pool.
Metrics (service_kit/metrics.py) are served on a side port from start to the end of shutdown.
With tracing on (service_kit/tracing.py), OpenTelemetry's server interceptor comes first.

The gRPC port is plaintext, TLS or mutual TLS (service_kit/tls.py); reflection is served there,
behind the same TLS as the services. Probes that cannot speak TLS (Kubernetes' native gRPC
probes) get a second, plaintext port that serves grpc.health.v1 and nothing else, backed by the
same HealthServicer, so it reports the same statuses and the same graceful shutdown; it closes
last, after the main server has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_kit import tracing
from service_kit.auth import AccessRules, AuthSettings, Gate
from service_kit.config import ConfigError, ServerSettings
from service_kit.database import Database, DatabaseState
from service_kit.interceptor import ErrorTable, RpcObserver, ServerInterceptor
from service_kit.logs import quiet_caller_metadata_errors
from service_kit.metrics import GrpcMetrics, MetricsServer, PoolCollector, new_registry, register_process_collectors
from service_kit.tls import Transport

log = structlog.get_logger()

# The health-only port takes tiny requests from a few probes: bounds of its own, far below the
# service's (a Watch stream held open by a stranger costs one of these slots, no more).
HEALTH_MAX_CONCURRENT_RPCS = 100
HEALTH_MAX_MESSAGE_BYTES = 4096
# Above what the gateway forwards (its 16 KiB of request headers), so that a call through it is
# never refused for its metadata; a direct caller past it gets RESOURCE_EXHAUSTED, every time.
MAX_METADATA_BYTES = 32 * 1024

Worker = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class ServiceParts:
    """What a service plugs into the runtime."""

    register: Callable[[grpc.aio.Server], None]
    # Long-running loops (sweepers, reconcilers); started once the database is first ready,
    # cancelled on shutdown. Each must handle its own errors and bound its own work.
    workers: Sequence[Worker] = ()
    # Told of every finished call, after the runtime's own gRPC metrics.
    observers: tuple[RpcObserver, ...] = ()
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class ServiceDefinition:
    service_name: str  # e.g. "credit.v1.CreditService"
    error_domain: str  # ErrorInfo.domain, e.g. "credit.therapy.example"
    error_codes: ErrorTable
    # Who may call each RPC (service_kit/auth.py); an RPC without a rule is refused.
    access_rules: AccessRules


class Runtime:
    """A started server; `serve_forever` for main, `stop` for tests and signals."""

    def __init__(
        self, settings: ServerSettings, definition: ServiceDefinition, database: Database, auth: AuthSettings
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.definition = definition
        self.database = database
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.health_port = 0  # the plaintext health-only port, when there is one
        # This runtime's metrics; the service registers its own here too.
        self.registry = new_registry()
        self.grpc_metrics = GrpcMetrics(self.registry)
        register_process_collectors(self.registry)
        self.registry.register(PoolCollector(database.schema, database.pool_usage))
        self.tracing = tracing.current()
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: ServiceParts | None = None
        self._workers_started = False
        self._stopped = asyncio.Event()

    async def start(self, build: Callable[[Database], ServiceParts]) -> None:
        parts = build(self.database)
        self._parts = parts
        quiet_caller_metadata_errors()
        gate = Gate(self.auth, self.definition.service_name, self.definition.access_rules)
        server = grpc.aio.server(
            interceptors=[
                # Empty when tracing is off: nothing traced, nothing paid per call.
                *self.tracing.server_interceptors(),
                *gate.interceptors(),
                ServerInterceptor(
                    domain=self.definition.error_domain,
                    error_codes=self.definition.error_codes,
                    default_deadline_s=self.settings.default_rpc_deadline_s,
                    observers=(self.grpc_metrics.server_call_finished, *parts.observers),
                    start_observers=(self.grpc_metrics.server_call_started,),
                    gate=gate,
                    max_concurrent_rpcs_per_caller=self.settings.max_concurrent_rpcs_per_caller,
                    traced=self.tracing.enabled,
                ),
            ],
            options=[
                # Otherwise two servers can silently share one port (docs/conventions.md).
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                # One bound on a call's metadata, not gRPC's default pair (8 KiB soft, 16 KiB hard),
                # between which calls are refused at random: a token at its 8 KiB bound plus the
                # other headers must be answered the same way every time (docs/http-api.md).
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            ],
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        parts.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.reflection_enabled:
            reflection.enable_server_reflection(
                (self.definition.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        await self._set_serving(False)
        tls = self.settings.tls
        self.port = _bind(server, self.settings.grpc_address, tls.credentials() if tls is not None else None)
        # Bound before either server starts: a health port that cannot listen stops the start
        # with nothing left running.
        try:
            health_server = self._health_only_server()
        except OSError:
            await server.stop(None)
            raise
        await server.start()
        self._server = server
        host = self.settings.grpc_address.rsplit(":", 1)[0]
        log.info(
            "grpc_server_started",
            service=self.definition.service_name,
            address=f"{host}:{self.port}",
            transport=(tls.transport if tls is not None else Transport.PLAINTEXT).value,
            auth="required" if self.auth.required else "disabled",
            **(tls.certificate.log_fields() if tls is not None else {}),
        )
        if health_server is not None:
            await health_server.start()
            self._health_server = health_server
            health_host = (self.settings.health_address or "").rsplit(":", 1)[0]
            log.info(
                "health_server_started",
                address=f"{health_host}:{self.health_port}",
                transport=Transport.PLAINTEXT.value,
                services=[health.SERVICE_NAME],
            )
        if not self.auth.required:
            log.warning("auth_disabled", detail="every caller acts with every role: development only")
        self.grpc_metrics.initialize_service(self.definition.service_name)
        await self._start_metrics_server()
        self._tasks.append(asyncio.create_task(self._readiness_loop(), name="readiness"))

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """For a channel this service calls another on: the trace (when on), then the metrics."""
        return [*self.tracing.client_interceptors(), self.grpc_metrics.client_interceptor()]

    def _health_only_server(self) -> grpc.aio.Server | None:
        """The plaintext port for probes: grpc.health.v1 only (no reflection, no interceptor: there
        is nothing behind it to authorize), bound but not started; None when not configured."""
        address = self.settings.health_address
        if address is None:
            return None
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", HEALTH_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", HEALTH_MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=HEALTH_MAX_CONCURRENT_RPCS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = _bind(server, address, None)
        return server

    async def _start_metrics_server(self) -> None:
        address = self.settings.metrics_address
        if address is None:
            log.info("metrics_server_disabled")
            return
        metrics_server = MetricsServer(self.registry, address)
        try:
            await metrics_server.start()
        except OSError as error:
            # Metrics are not worth refusing calls for: the service runs on, loudly, and
            # Prometheus sees the target down. (In a pod the port is the pod's own.)
            log.error("metrics_server_failed", address=address, error=repr(error))
            return
        self._metrics_server = metrics_server
        self.metrics_port = metrics_server.port
        host = address.rpartition(":")[0]
        log.info("metrics_server_started", address=f"{host}:{self.metrics_port}", path="/metrics")

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(self.definition.service_name, status)
        await self.health.set("", status)

    async def _readiness_loop(self) -> None:
        serving = False
        while True:
            try:
                state = await self.database.check()
            except Exception:  # a bug in a check must not stop readiness checking for good
                log.exception("readiness_check_failed")
                state = DatabaseState.UNREACHABLE
            ready = state is DatabaseState.READY
            if ready != serving:
                await self._set_serving(ready)
                serving = ready
                log.info("health_changed", serving=ready, reason=state.value)
            if ready and not self._workers_started:
                self._start_workers()
            await asyncio.sleep(
                self.settings.health_check_interval_s if ready else min(1.0, self.settings.health_check_interval_s)
            )

    def _start_workers(self) -> None:
        assert self._parts is not None
        self._workers_started = True
        for worker in self._parts.workers:
            self._tasks.append(asyncio.create_task(worker(), name=getattr(worker, "__name__", "worker")))

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        log.info("shutdown_started", grace_s=self.settings.shutdown_grace_s)
        await self.health.enter_graceful_shutdown()
        await server.stop(self.settings.shutdown_grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._parts is not None:
            for hook in self._parts.on_shutdown:
                await hook()
        await self.database.close()
        if self._health_server is not None:
            # Last of the gRPC ports: until here probes read NOT_SERVING rather than a refused
            # connection, as on the main port during its grace.
            await self._health_server.stop(0)
            self._health_server = None
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        log.info("shutdown_finished")
        self._stopped.set()

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await stop_requested.wait()
        await self.stop()


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `address` (TLS with `credentials`, else plaintext); the port (OSError if it cannot)."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        # grpcio raises (rather than returning 0, as older versions did) when it cannot bind.
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or invalid")
    return port


def run_main(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The process entry point of a service: uvloop, and clean exits for start-up failures."""
    try:
        uvloop.run(main())
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"cannot start: {error}", file=sys.stderr)
        sys.exit(1)
