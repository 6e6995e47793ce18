"""A whole deployment as real processes, for fault tests and chaos runs.

`running_stack` starts one or more credit processes and one or more booking processes
(`python -m credit_service`, `python -m booking_service`, as production runs them) on fresh
databases and concrete ports on 127.0.0.1, waits until each says SERVING, and hands back a
`Stack`: stubs and database pools to observe it from outside, and the levers to break it (stop,
kill, freeze, thaw, restart keeping ports and data, with environment overrides). Leaving the
`async with` block ends every process it started, frozen or not, whatever happened inside.

Each booking replica talks to every credit replica (a round_robin target); all booking replicas
share one booking database and all credit replicas one credit database, as DESIGN.md's "Scale"
section has it.

With `tls=StackTls(pki)` the stack runs as the production overlay does: every process serves
mutual TLS on its gRPC port and plaintext health on a port of its own (where readiness is
checked), booking calls credit with its client certificate, and the stack's stubs present one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from booking.v1 import booking_pb2_grpc
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2_grpc
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from tests.support.auth import authorized_channel
from tests.support.invariants import credit_invariant_violations
from tests.support.pki import Pki
from tests.support.stack import ServiceProcess, free_port, fresh_database, server_environment, wait_serving

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

CREDIT_MODULE = "credit_service"
BOOKING_MODULE = "booking_service"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# How long a restart waits for the harness's own channels to the process to connect again.
RECONNECT_TIMEOUT_S = 10.0
# At teardown nobody waits for a graceful exit for long: the test's verdict is already in.
TEARDOWN_STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05
PORT_ATTEMPTS = 3
ADDRESS_VARIABLES = {CREDIT_MODULE: "CREDIT_GRPC_ADDRESS", BOOKING_MODULE: "BOOKING_GRPC_ADDRESS"}
HEALTH_VARIABLES = {CREDIT_MODULE: "CREDIT_HEALTH_ADDRESS", BOOKING_MODULE: "BOOKING_HEALTH_ADDRESS"}
# The name the test servers' certificate carries and every TLS client here checks: targets are
# IP addresses, or lists of them (a round_robin target has no single host name to check).
TLS_SERVER_NAME = "localhost"

# A booking service that resolves stale holds within about a second and a half: a hold older
# than 1 s is stale, and the reconciler looks every 0.3 s; the outbox looks every 0.2 s.
FAST_RECOVERY: Mapping[str, str] = {
    "BOOKING_RECONCILE_AFTER_S": "1",
    "BOOKING_RECONCILE_INTERVAL_S": "0.3",
    "BOOKING_OUTBOX_INTERVAL_S": "0.2",
}

# Test clients reconnect fast to a restarted process (gRPC's default backoff starts at 1 s and
# grows to 120 s) and never retry on their own, so a test sees each call's own outcome.
CLIENT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
)

EnvOverrides = Mapping[str, str | None]  # None removes the variable


@dataclass(frozen=True)
class StackTls:
    """Mutual TLS between everything in a stack, from one test CA (tests/support/pki.py)."""

    pki: Pki

    def server_env(self, prefix: str, health_port: int) -> dict[str, str]:
        return {
            f"{prefix}_TLS_CERT_FILE": str(self.pki.server.certificate_file),
            f"{prefix}_TLS_KEY_FILE": str(self.pki.server.key_file),
            f"{prefix}_TLS_CLIENT_CA_FILE": str(self.pki.ca.certificate_file),
            f"{prefix}_HEALTH_ADDRESS": f"127.0.0.1:{health_port}",
        }

    def booking_client_env(self) -> dict[str, str]:
        return {
            "BOOKING_CREDIT_TLS_CA_FILE": str(self.pki.ca.certificate_file),
            "BOOKING_CREDIT_TLS_CERT_FILE": str(self.pki.client.certificate_file),
            "BOOKING_CREDIT_TLS_KEY_FILE": str(self.pki.client.key_file),
            "BOOKING_CREDIT_TLS_SERVER_NAME": TLS_SERVER_NAME,
        }

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca.certificate_pem,
            private_key=self.pki.client.key_pem,
            certificate_chain=self.pki.client.certificate_pem,
        )


def _apply(env: Mapping[str, str], overrides: EnvOverrides) -> dict[str, str]:
    merged = dict(env)
    for name, value in overrides.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def balanced_target(addresses: Sequence[str]) -> str:
    """A gRPC target over several `host:port` addresses (use with round_robin)."""
    assert addresses
    return "ipv4:" + ",".join(addresses)


def log_events(process: ServiceProcess) -> list[dict[str, Any]]:
    """The process's JSON log lines, over all its runs (other output is skipped)."""
    events = []
    for line in process.output().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def _uuid(value: object) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def is_running(process: ServiceProcess) -> bool:
    return process.process is not None and process.process.poll() is None


async def wait_exit(process: ServiceProcess, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Waits for the process to exit on its own; its exit code (raises TimeoutError)."""
    assert process.process is not None, "never started"
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (code := process.process.poll()) is None:
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"{process.module} on {process.address} still running after {timeout_s} s")
        await asyncio.sleep(POLL_INTERVAL_S)
    return code


async def wait_for(
    check: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.1, what: str = "condition"
) -> Any:
    """Polls `check` (sync or async) until it returns something truthy; returns that value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"{what} not reached after {timeout_s} s (last: {last!r})")
        await asyncio.sleep(interval_s)


@dataclass
class Stack:
    """Running credit and booking processes, how to reach them and how to break them."""

    credits: list[ServiceProcess]
    bookings: list[ServiceProcess]
    credit_database_url: str
    booking_database_url: str
    log_dir: Path
    credit_db: asyncpg.Pool
    booking_db: asyncpg.Pool
    tls: StackTls | None = None
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    _frozen: set[int] = field(default_factory=set)

    @property
    def credit(self) -> ServiceProcess:
        """The first (often the only) credit process."""
        return self.credits[0]

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*self.credits, *self.bookings]

    @property
    def credit_target(self) -> str:
        return balanced_target([p.address for p in self.credits])

    # --- reaching it ---

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            options = [*CLIENT_CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
            credentials = None
            if self.tls is not None:
                options.append(("grpc.ssl_target_name_override", TLS_SERVER_NAME))
                credentials = self.tls.channel_credentials()
            channel = authorized_channel(target, options=options, credentials=credentials)
            self._channels[target] = channel
        return channel

    def credit_stub(self, replica: int | None = None) -> CreditServiceAsyncStub:
        """A stub for one credit replica, or (None) balanced over all of them."""
        target = self.credit_target if replica is None else self.credits[replica].address
        return credit_pb2_grpc.CreditServiceStub(self._channel(target))

    def booking_stub(self, replica: int | None = None) -> BookingServiceAsyncStub:
        """A stub for one booking replica, or (None) balanced over all of them."""
        target = (
            balanced_target([p.address for p in self.bookings]) if replica is None else self.bookings[replica].address
        )
        return booking_pb2_grpc.BookingServiceStub(self._channel(target))

    # --- observing it from outside, through SQL: no service reports on itself ---

    async def buckets(self, owner_id: str | uuid.UUID) -> tuple[int, int, int, int]:
        """(available, held, spent, granted) of an account, read from the credit database."""
        row = await self.credit_db.fetchrow(
            "SELECT available, held, spent, granted FROM credit.accounts WHERE owner_id = $1", _uuid(owner_id)
        )
        assert row is not None, f"no account for {owner_id}"
        return row["available"], row["held"], row["spent"], row["granted"]

    async def refusal(self, request_key: uuid.UUID) -> str | None:
        """The refusal recorded as a request's answer (booking.request_answers), None if none."""
        value = await self.booking_db.fetchval(
            "SELECT refusal_reason FROM booking.request_answers WHERE request_key = $1", request_key
        )
        return None if value is None else str(value)

    async def reservation(self, reservation_id: str | uuid.UUID) -> dict[str, Any] | None:
        """status, release_reason, owner_id, amount, committed_amount, reference; None if absent."""
        row = await self.credit_db.fetchrow(
            """SELECT status, release_reason, owner_id, amount, committed_amount, reference
                 FROM credit.reservations WHERE reservation_id = $1""",
            _uuid(reservation_id),
        )
        return None if row is None else dict(row)

    async def legacy_decision(self, reservation_id: str | uuid.UUID) -> str | None:
        """The previous version's decision log (booking.decisions), for its holds."""
        value = await self.booking_db.fetchval(
            "SELECT decision FROM booking.decisions WHERE reservation_id = $1", _uuid(reservation_id)
        )
        return None if value is None else str(value)

    async def session(self, booking_id: str | uuid.UUID) -> dict[str, Any] | None:
        """status, payment_status, client_id, therapist_id, credit_cost, request_id; None if absent."""
        row = await self.booking_db.fetchrow(
            """SELECT status, payment_status, client_id, therapist_id, credit_cost, request_id
                 FROM booking.sessions WHERE booking_id = $1""",
            _uuid(booking_id),
        )
        return None if row is None else dict(row)

    async def pending_holds(self, owner_ids: Collection[str | uuid.UUID]) -> list[uuid.UUID]:
        """The PENDING reservations of these accounts."""
        rows = await self.credit_db.fetch(
            "SELECT reservation_id FROM credit.reservations WHERE status = 'pending' AND owner_id = ANY($1::uuid[])",
            [_uuid(o) for o in owner_ids],
        )
        return [row["reservation_id"] for row in rows]

    async def wait_settled(self, owner_ids: Collection[str | uuid.UUID], *, timeout_s: float) -> None:
        """Until these accounts hold nothing PENDING: every hold committed or released."""

        async def settled() -> bool:
            return not await self.pending_holds(owner_ids)

        await wait_for(settled, timeout_s=timeout_s, what=f"no pending hold among {len(owner_ids)} accounts")

    async def credit_violations(self, owner_ids: Collection[str | uuid.UUID] | None = None) -> list[str]:
        """Every broken invariant of the credit books (tests/support/invariants.py)."""
        owners = None if owner_ids is None else [_uuid(o) for o in owner_ids]
        async with self.credit_db.acquire() as connection:
            return await credit_invariant_violations(connection, owners)

    # --- breaking it ---

    async def stop(self, process: ServiceProcess, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait (SIGKILL after `timeout_s`); the exit code. A frozen process is
        thawed first, or it could not act on the signal."""
        self.thaw(process)
        return await asyncio.to_thread(process.stop, timeout_s)

    def terminate(self, process: ServiceProcess) -> None:
        """SIGTERM without waiting (see `wait_exit`), to act while the process drains."""
        self.thaw(process)
        process.signal(signal.SIGTERM)

    async def kill(self, process: ServiceProcess) -> int | None:
        """SIGKILL and wait; the exit code (None if it was not running)."""
        if not is_running(process):
            return None if process.process is None else process.process.returncode
        await asyncio.to_thread(process.kill)
        self._frozen.discard(self._pid(process))
        assert process.process is not None
        return process.process.returncode

    def freeze(self, process: ServiceProcess) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung dependency)."""
        assert is_running(process), "cannot freeze a process that is not running"
        process.signal(signal.SIGSTOP)
        self._frozen.add(self._pid(process))

    def thaw(self, process: ServiceProcess) -> None:
        """SIGCONT, if `freeze` stopped it."""
        pid = self._pid(process)
        if pid in self._frozen:
            self._frozen.discard(pid)
            if is_running(process):
                process.signal(signal.SIGCONT)

    async def start(self, process: ServiceProcess, env: EnvOverrides | None = None) -> None:
        """Starts a stopped process again on its port and data, with `env` changes; waits
        until it says SERVING."""
        assert not is_running(process), f"{process.module} on {process.address} is still running"
        if env:
            process.env = _apply(process.env, env)
        process.start()
        await _wait_serving(process)
        await self._reconnected(process)

    async def _reconnected(self, process: ServiceProcess) -> None:
        """This harness's channels to `process` connected again. A channel whose peer went away
        waits out its reconnect backoff (a second or more) before it tries again, and a call made
        meanwhile fails at once with UNAVAILABLE: a test calling right after a restart saw that
        now and then, instead of the answer it meant to check."""
        for target, channel in self._channels.items():
            if process.address in target:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.channel_ready(), RECONNECT_TIMEOUT_S)

    async def restart(self, process: ServiceProcess, env: EnvOverrides | None = None) -> None:
        """A graceful stop (if running), then `start` with `env` changes."""
        if is_running(process):
            await self.stop(process)
        await self.start(process, env)

    async def add_booking_replica(self, env: EnvOverrides | None = None) -> ServiceProcess:
        """One more booking process on the same database; started and SERVING."""
        process = _booking_process(self, len(self.bookings), env or {})
        self.bookings.append(process)
        await _launch(process)
        return process

    def logs(self) -> str:
        """Every process's output, for assertion messages."""
        return "\n".join(f"--- {p.module} {p.address} ---\n{p.output()}" for p in self.processes)

    def events(self, process: ServiceProcess, name: str) -> list[dict[str, Any]]:
        return [e for e in log_events(process) if e.get("event") == name]

    @staticmethod
    def _pid(process: ServiceProcess) -> int:
        return -1 if process.process is None else process.process.pid

    async def close(self) -> None:
        """Ends every process (thawed, SIGTERM, SIGKILL if slow) and closes channels and pools."""
        for process in self.processes:
            self.thaw(process)
        await asyncio.gather(*(asyncio.to_thread(_end, process) for process in self.processes), return_exceptions=True)
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
        for pool in (self.credit_db, self.booking_db):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)


def _end(process: ServiceProcess) -> None:
    if process.process is None:
        return
    try:
        process.stop(TEARDOWN_STOP_TIMEOUT_S)
    finally:
        process.kill()  # no-op when it is gone


def _credit_process(
    log_dir: Path, index: int, database_url: str, env: EnvOverrides, tls: StackTls | None
) -> ServiceProcess:
    port = free_port()
    base = server_environment("CREDIT", database_url, CREDIT_GRPC_ADDRESS=f"127.0.0.1:{port}")
    health_port = None
    if tls is not None:
        health_port = free_port()
        base |= tls.server_env("CREDIT", health_port)
    log_path = log_dir / f"credit-{index}.log"
    return ServiceProcess(CREDIT_MODULE, _apply(base, env), log_path, port, health_port=health_port)


def _booking_process(stack: Stack, index: int, env: EnvOverrides) -> ServiceProcess:
    port = free_port()
    base = server_environment(
        "BOOKING",
        stack.booking_database_url,
        BOOKING_GRPC_ADDRESS=f"127.0.0.1:{port}",
        BOOKING_CREDIT_TARGET=stack.credit_target,
    )
    health_port = None
    if stack.tls is not None:
        health_port = free_port()
        base |= stack.tls.server_env("BOOKING", health_port) | stack.tls.booking_client_env()
    log_path = stack.log_dir / f"booking-{index}.log"
    return ServiceProcess(BOOKING_MODULE, _apply(base, env), log_path, port, health_port=health_port)


class ProcessExited(AssertionError):
    """The process ended while we waited for it to serve."""


async def _wait_serving(process: ServiceProcess, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until SERVING; fails at once, with its output, if the process exits meanwhile."""
    service = BOOKING_SERVICE_NAME if process.module == BOOKING_MODULE else CREDIT_SERVICE_NAME
    # Plaintext health: the health-only port of a TLS process, else its gRPC port.
    waiting = asyncio.ensure_future(wait_serving(process.health_address, service, timeout_s=timeout_s))
    try:
        while not waiting.done():
            if not is_running(process):
                raise ProcessExited(f"{process.module} on {process.address} exited:\n{process.output()}")
            await asyncio.wait({waiting}, timeout=0.1)
        waiting.result()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await waiting


async def _launch(process: ServiceProcess) -> None:
    """Starts a new process and waits until it serves. A port from `free_port` is free only
    until someone else takes it (any outgoing connection may): if the process cannot bind it,
    it gets another port, a bounded number of times."""
    for attempt in range(PORT_ATTEMPTS):
        output_before = len(process.output())
        process.start()
        try:
            await _wait_serving(process)
            return
        except ProcessExited:
            failure = process.output()[output_before:]
            if attempt + 1 == PORT_ATTEMPTS or not ("cannot start" in failure or "Address already in use" in failure):
                raise
        process.port = free_port()
        process.env = {**process.env, ADDRESS_VARIABLES[process.module]: f"127.0.0.1:{process.port}"}
        if process.health_port is not None:
            process.health_port = free_port()
            process.env = {**process.env, HEALTH_VARIABLES[process.module]: f"127.0.0.1:{process.health_port}"}


async def _pool(database_url: str) -> asyncpg.Pool:
    """A small pool for looking at a database from outside."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def running_stack(
    postgres_server_url: str,
    log_dir: Path,
    *,
    booking_replicas: int = 1,
    credit_replicas: int = 1,
    booking_env: EnvOverrides | None = None,
    credit_env: EnvOverrides | None = None,
    replica_env: Sequence[EnvOverrides] = (),
    tls: StackTls | None = None,
) -> AsyncIterator[Stack]:
    """Starts the stack on fresh databases; ends all of it on exit.

    `booking_env` applies to every booking replica, `replica_env[i]` on top of it to replica i;
    `credit_env` to every credit replica; `tls` makes every hop mutual TLS.
    """
    assert booking_replicas >= 1 and credit_replicas >= 1
    assert len(replica_env) <= booking_replicas
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    credit_url, booking_url = await asyncio.gather(
        fresh_database(postgres_server_url, "faults_credit"), fresh_database(postgres_server_url, "faults_booking")
    )
    credit_db, booking_db = await asyncio.gather(_pool(credit_url), _pool(booking_url), return_exceptions=True)
    if not isinstance(credit_db, asyncpg.Pool) or not isinstance(booking_db, asyncpg.Pool):
        for pool in (credit_db, booking_db):
            if isinstance(pool, asyncpg.Pool):
                await pool.close()
        raise AssertionError(f"cannot reach the test databases: {credit_db!r}, {booking_db!r}")
    stack = Stack(
        credits=[_credit_process(log_dir, i, credit_url, credit_env or {}, tls) for i in range(credit_replicas)],
        bookings=[],
        credit_database_url=credit_url,
        booking_database_url=booking_url,
        log_dir=log_dir,
        credit_db=credit_db,
        booking_db=booking_db,
        tls=tls,
    )
    try:
        # Credit first: the booking replicas' credit target names the credit ports.
        await asyncio.gather(*(_launch(p) for p in stack.credits))
        for index in range(booking_replicas):
            env = {**(booking_env or {}), **(replica_env[index] if index < len(replica_env) else {})}
            stack.bookings.append(_booking_process(stack, index, env))
        await asyncio.gather(*(_launch(p) for p in stack.bookings))
        yield stack
    finally:
        await stack.close()


__all__ = [
    "BOOKING_MODULE",
    "CREDIT_MODULE",
    "FAST_RECOVERY",
    "ProcessExited",
    "Stack",
    "StackTls",
    "balanced_target",
    "is_running",
    "log_events",
    "running_stack",
    "wait_exit",
    "wait_for",
]
