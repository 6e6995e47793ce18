"""Readiness checks: free ports before the start, gRPC health and Envoy's /ready after it."""

from __future__ import annotations

import asyncio
import errno
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_RETRY_PAUSE_S = 0.2
_ATTEMPT_TIMEOUT_S = 1.0
# grpc's reconnect backoff grows to two minutes by default: far too slow to notice a server that
# has just come up.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_HealthCheck = grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - recognised, not bound


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC and Envoy do: a port left in TIME_WAIT by a previous run is free for them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def dial_host(listen_host: str) -> str:
    """Where to connect to reach a server listening on `listen_host` (a wildcard means loopback)."""
    return "127.0.0.1" if listen_host in _WILDCARD_HOSTS else listen_host


@dataclass
class HealthProbe:
    """Asks one server's grpc.health.v1.Health about one service until it says SERVING."""

    target: str
    service: str
    last_status: str = "not started"

    async def wait_serving(self) -> None:
        """Returns once SERVING; the caller bounds the wait (it has no deadline of its own)."""
        async with grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS) as channel:
            # types-grpcio-health-checking declares HealthStub without its methods.
            check: _HealthCheck = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
            # Polling: the other process gives us nothing to await.
            while not await self._is_serving(check):  # noqa: ASYNC110
                await asyncio.sleep(_RETRY_PAUSE_S)

    async def _is_serving(self, check: _HealthCheck) -> bool:
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            response = await check(request, timeout=_ATTEMPT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            self.last_status = error.code().name
            return False
        self.last_status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == health_pb2.HealthCheckResponse.SERVING


async def wait_http_ok(url: str) -> None:
    """Returns once `url` answers 200; the caller bounds the wait."""
    # Polling: the other process gives us nothing to await.
    while not await asyncio.to_thread(_http_ok, url):  # noqa: ASYNC110
        await asyncio.sleep(_RETRY_PAUSE_S)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=_ATTEMPT_TIMEOUT_S) as response:  # noqa: S310 - our http URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
