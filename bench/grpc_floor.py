"""What one gRPC call costs in Python here, with nothing behind it: `python -m bench.grpc_floor`.

A server answering grpc.health.v1 Check with a constant (grpc.aio, or the threaded sync server),
and a grpc.aio client process keeping `--concurrency` calls in flight for `--duration-s`; prints
calls per second and the CPU per call of the server and of the client. It is the floor under
every RPC of the services (docs/performance.md, "Why not 25 %").
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from concurrent import futures
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stack import cpu_seconds

SYNC_SERVER_THREADS = 4
START_TIMEOUT_S = 30.0


class ConstantHealth(health_pb2_grpc.HealthServicer):
    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class ConstantHealthSync(health_pb2_grpc.HealthServicer):
    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve_aio() -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(ConstantHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def serve_sync() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SYNC_SERVER_THREADS), options=[("grpc.so_reuseport", 0)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(ConstantHealthSync(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def load(port: int, concurrency: int, duration_s: float) -> tuple[int, float, float]:
    """(calls, seconds, client CPU seconds)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its typing stubs declare no methods
        calls = 0
        stop_at = time.monotonic() + duration_s

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < stop_at:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                calls += 1

        started, cpu_started = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls, time.monotonic() - started, time.process_time() - cpu_started


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__)
    parser.add_argument("--server", choices=("aio", "sync"), default="aio")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--serve", choices=("aio", "sync"), help=argparse.SUPPRESS)  # the server process
    arguments = parser.parse_args()
    if arguments.serve == "aio":
        uvloop.run(serve_aio())
        return 0
    if arguments.serve == "sync":
        serve_sync()
        return 0
    if not 1 <= arguments.concurrency <= 1024 or not 1 <= arguments.duration_s <= 120:
        parser.error("--concurrency 1..1024, --duration-s 1..120")
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", arguments.server], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        server_cpu_before = cpu_seconds(server.pid) or 0.0
        calls, elapsed_s, client_cpu_s = uvloop.run(load(port, arguments.concurrency, arguments.duration_s))
        server_cpu_s = (cpu_seconds(server.pid) or 0.0) - server_cpu_before
    finally:
        server.terminate()
        server.wait(timeout=START_TIMEOUT_S)
    print(
        f"{arguments.server} server, {arguments.concurrency} in flight: {calls / elapsed_s:.0f} calls/s, "
        f"server {server_cpu_s / calls * 1000:.3f} ms CPU/call, client {client_cpu_s / calls * 1000:.3f} ms CPU/call"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
