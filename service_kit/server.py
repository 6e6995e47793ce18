"""Serving one service: the aio server, health, reflection, readiness, workers, graceful shutdown.

Health starts NOT_SERVING and turns SERVING only while the database is reachable and its schema
is at the version this build needs; a readiness loop keeps checking. On SIGTERM or SIGINT the
server enters graceful shutdown (health NOT_SERVING so balancers drain it), stops accepting
calls, lets running ones finish within the grace period, stops its workers, closes the pool.
Metrics (service_kit/metrics.py) are served on a side port from start to the end of shutdown.
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

from service_kit.auth import AccessRules, AuthSettings, Gate
from service_kit.config import ConfigError, ServerSettings
from service_kit.database import Database, DatabaseState
from service_kit.interceptor import ErrorTable, RpcObserver, ServerInterceptor
from service_kit.metrics import GrpcMetrics, MetricsServer, PoolCollector, new_registry

log = structlog.get_logger()

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
        # This runtime's metrics; the service registers its own here too.
        self.registry = new_registry()
        self.grpc_metrics = GrpcMetrics(self.registry)
        self.registry.register(PoolCollector(database.schema, database.pool_usage))
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: ServiceParts | None = None
        self._workers_started = False
        self._stopped = asyncio.Event()

    async def start(self, build: Callable[[Database], ServiceParts]) -> None:
        parts = build(self.database)
        self._parts = parts
        server = grpc.aio.server(
            interceptors=[
                ServerInterceptor(
                    domain=self.definition.error_domain,
                    error_codes=self.definition.error_codes,
                    default_deadline_s=self.settings.default_rpc_deadline_s,
                    observers=(self.grpc_metrics.server_call_finished, *parts.observers),
                    start_observers=(self.grpc_metrics.server_call_started,),
                    gate=Gate(self.auth, self.definition.service_name, self.definition.access_rules),
                    max_concurrent_rpcs_per_caller=self.settings.max_concurrent_rpcs_per_caller,
                )
            ],
            options=[
                # Otherwise two servers can silently share one port (CONVENTIONS.md).
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
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
        try:
            self.port = server.add_insecure_port(self.settings.grpc_address)
        except RuntimeError:
            # grpcio raises (rather than returning 0, as older versions did) when it cannot bind.
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_address}: address in use or invalid")
        await server.start()
        self._server = server
        host = self.settings.grpc_address.rsplit(":", 1)[0]
        log.info(
            "grpc_server_started",
            service=self.definition.service_name,
            address=f"{host}:{self.port}",
            auth="required" if self.auth.required else "disabled",
        )
        if not self.auth.required:
            log.warning("auth_disabled", detail="every caller acts with every role: development only")
        self.grpc_metrics.initialize_service(self.definition.service_name)
        await self._start_metrics_server()
        self._tasks.append(asyncio.create_task(self._readiness_loop(), name="readiness"))

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
