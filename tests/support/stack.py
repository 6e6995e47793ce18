"""Starting real services for tests: in-process servers on 127.0.0.1:0, or real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import ensure_database
from tests.support.auth import auth_environment, token

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"


async def fresh_database(server_url: str, prefix: str) -> str:
    """A new, empty database with a random name, so tests never share or truncate tables."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    return await ensure_database(server_url, name)


def server_environment(prefix: str, database: str, **extra: str) -> dict[str, str]:
    env = {
        f"{prefix}_DATABASE_URL": database,
        f"{prefix}_GRPC_ADDRESS": "127.0.0.1:0",
        # Not the fixed default port: test servers and processes run side by side.
        f"{prefix}_METRICS_ADDRESS": "127.0.0.1:0",
        f"{prefix}_HEALTH_CHECK_INTERVAL_S": "0.2",
        f"{prefix}_SHUTDOWN_GRACE_S": "1",
        "LOG_FORMAT": "json",
        # Authentication stays on in tests: servers trust the test key pair (tests/support/auth.py).
        **auth_environment(),
    }
    env.update(extra)
    return env


async def wait_serving(address: str, service: str, *, timeout_s: float = 30.0) -> None:
    """Waits until the health service says SERVING for `service`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last = "no answer"
    async with grpc.aio.insecure_channel(address) as channel:
        # The typing stubs of grpcio-health-checking declare no methods on HealthStub.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.aio.AioRpcError as error:
                last = error.code().name
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{service} at {address} not SERVING after {timeout_s} s (last: {last})")


async def health_status(address: str, service: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@dataclass
class ServiceProcess:
    """A service run as a real process, as `make run` and production run it."""

    module: str
    env: Mapping[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    # The plaintext health-only port of a TLS server (`*_HEALTH_ADDRESS`), if it has one.
    health_port: int | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def health_address(self) -> str:
        """Where a plaintext health check reaches it: the health port, else the gRPC port."""
        return self.address if self.health_port is None else f"127.0.0.1:{self.health_port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        environment = {**os.environ, **self.env}
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", self.module],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log_file.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after the timeout)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return -9
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_grpcurl(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the real grpcurl binary from the venv
        [str(GRPCURL), "-plaintext", "-max-time", "10", "-H", f"authorization: Bearer {token()}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
