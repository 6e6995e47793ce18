"""The credit service as a real process (`python -m credit_service`), as production runs it.

Driven through the real grpcurl binary (reflection, health, error details) and a real gRPC
channel; stopped with a real SIGTERM. Each test gets its own fresh database and a concrete free
port, and kills whatever it started, even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest

from credit.v1 import credit_pb2, credit_pb2_grpc
from credit_service.servicer import SERVICE_NAME
from service_kit import migrations
from service_kit.errors import ErrorDetails, error_details
from tests.support.auth import authorized_channel
from tests.support.stack import (
    ServiceProcess,
    free_port,
    fresh_database,
    health_status,
    run_grpcurl,
    server_environment,
    wait_serving,
)

if TYPE_CHECKING:
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub

START_TIMEOUT_S = 20.0
# grpcurl exits with 64 + the gRPC status code when the call fails.
GRPCURL_EXIT_NOT_FOUND = 64 + grpc.StatusCode.NOT_FOUND.value[0]
GRPCURL_EXIT_INVALID_ARGUMENT = 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0]


def credit_process(database_url: str, log_path: Path, **extra: str) -> ServiceProcess:
    port = free_port()
    env = server_environment("CREDIT", database_url, CREDIT_GRPC_ADDRESS=f"127.0.0.1:{port}", **extra)
    return ServiceProcess("credit_service", env, log_path, port)


@contextlib.contextmanager
def killed_at_exit(*processes: ServiceProcess) -> Any:
    """Whatever happens in the test, no process outlives it."""
    try:
        yield
    finally:
        for process in processes:
            process.kill()


def log_events(process: ServiceProcess) -> list[dict[str, Any]]:
    """The process's JSON log lines (other output, e.g. from libraries, is skipped)."""
    events = []
    for line in process.output().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


async def wait_for_log(
    process: ServiceProcess, matches: Callable[[dict[str, Any]], bool], timeout_s: float = START_TIMEOUT_S
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        for event in log_events(process):
            if matches(event):
                return event
        assert process.process is not None
        assert process.process.poll() is None, f"the process exited:\n{process.output()}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"no such log line after {timeout_s} s:\n{process.output()}")


async def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_grpcurl, *args)


@contextlib.asynccontextmanager
async def credit_stub(address: str) -> AsyncIterator[CreditServiceAsyncStub]:
    async with authorized_channel(address) as channel:
        yield credit_pb2_grpc.CreditServiceStub(channel)


async def refusal(stub: CreditServiceAsyncStub, owner: str) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner), timeout=5)
    return error_details(raised.value)


def stop_cleanly(process: ServiceProcess) -> None:
    assert process.stop() == 0, process.output()
    assert process.process is not None
    assert process.process.poll() == 0  # gone, not merely signalled


# --- One served process for the grpcurl checks ---


@pytest.fixture(scope="module")
async def served(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    database_url = await fresh_database(postgres_server_url, "credit_process")
    process = credit_process(database_url, tmp_path_factory.mktemp("credit-process") / "credit.log")
    with killed_at_exit(process):
        process.start()
        await wait_serving(process.address, SERVICE_NAME, timeout_s=START_TIMEOUT_S)
        yield process
        stop_cleanly(process)


async def test_grpcurl_lists_the_service_through_reflection(served: ServiceProcess) -> None:
    listed = await grpcurl(served.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services

    described = await grpcurl(served.address, "describe", SERVICE_NAME)
    assert described.returncode == 0, described.stderr
    for rpc in ("GrantCredits", "ReserveCredits", "CommitReservation", "ListLedgerEntries"):
        assert f"rpc {rpc} (" in described.stdout


@pytest.mark.parametrize("service", [SERVICE_NAME, ""], ids=["credit", "overall"])
async def test_grpcurl_health_check_says_serving(served: ServiceProcess, service: str) -> None:
    checked = await grpcurl("-d", json.dumps({"service": service}), served.address, "grpc.health.v1.Health/Check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


async def test_grpcurl_grants_and_prints_the_reason_of_a_refusal(served: ServiceProcess) -> None:
    owner = str(uuid.uuid4())
    balance_request = json.dumps({"owner_id": owner})
    missing = await grpcurl("-d", balance_request, served.address, "credit.v1.CreditService/GetBalance")
    assert missing.returncode == GRPCURL_EXIT_NOT_FOUND
    assert "NotFound" in missing.stderr
    assert "ACCOUNT_NOT_FOUND" in missing.stderr
    assert owner in missing.stderr  # the ErrorInfo metadata, printed with the details

    grant = json.dumps({"request_id": str(uuid.uuid4()), "owner_id": owner, "amount": 5, "kind": "GRANT_KIND_PURCHASE"})
    granted = await grpcurl("-d", grant, served.address, "credit.v1.CreditService/GrantCredits")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["balance"]["available"] == "5"  # int64 is a JSON string

    found = await grpcurl("-d", balance_request, served.address, "credit.v1.CreditService/GetBalance")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["balance"]["granted"] == "5"

    invalid = await grpcurl(
        "-d", json.dumps({"owner_id": "nope"}), served.address, "credit.v1.CreditService/GetBalance"
    )
    assert invalid.returncode == GRPCURL_EXIT_INVALID_ARGUMENT
    assert "google.rpc.BadRequest" in invalid.stderr
    assert "owner_id" in invalid.stderr


# --- Lifecycle ---


async def test_sigterm_stops_cleanly_and_a_restart_serves_the_same_data(
    postgres_server_url: str, tmp_path: Path
) -> None:
    database_url = await fresh_database(postgres_server_url, "credit_restart")
    process = credit_process(database_url, tmp_path / "credit.log")
    owner, reservation_id = str(uuid.uuid4()), str(uuid.uuid4())
    with killed_at_exit(process):
        process.start()
        await wait_serving(process.address, SERVICE_NAME, timeout_s=START_TIMEOUT_S)
        async with credit_stub(process.address) as stub:
            await stub.GrantCredits(
                credit_pb2.GrantCreditsRequest(
                    request_id=str(uuid.uuid4()), owner_id=owner, amount=7, kind=credit_pb2.GRANT_KIND_PURCHASE
                )
            )
            await stub.ReserveCredits(
                credit_pb2.ReserveCreditsRequest(reservation_id=reservation_id, owner_id=owner, amount=3)
            )

        process.signal(signal.SIGTERM)
        assert process.process is not None
        assert await asyncio.to_thread(process.process.wait, 15) == 0, process.output()
        assert any(event.get("event") == "shutdown_finished" for event in log_events(process))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await health_status(process.address, SERVICE_NAME)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE  # nobody listens any more

        process.start()
        await wait_serving(process.address, SERVICE_NAME, timeout_s=START_TIMEOUT_S)
        async with credit_stub(process.address) as stub:
            balance = (await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner))).balance
            reservation = (
                await stub.GetReservation(credit_pb2.GetReservationRequest(reservation_id=reservation_id))
            ).reservation
        assert (balance.available, balance.held, balance.spent, balance.granted) == (4, 3, 0, 7)
        assert reservation.status == credit_pb2.RESERVATION_STATUS_PENDING
        stop_cleanly(process)


async def test_without_migrations_on_start_a_fresh_database_is_schema_behind(
    postgres_server_url: str, tmp_path: Path
) -> None:
    database_url = await fresh_database(postgres_server_url, "credit_unmigrated")
    process = credit_process(database_url, tmp_path / "credit.log", CREDIT_MIGRATE_ON_START="false")
    with killed_at_exit(process):
        process.start()
        event = await wait_for_log(process, lambda e: e.get("event") == "database_state_changed")
        assert event["state"] == "schema_behind"
        assert event["schema"] == "credit"
        assert await health_status(process.address, SERVICE_NAME) == "NOT_SERVING"
        assert await health_status(process.address, "") == "NOT_SERVING"
        async with credit_stub(process.address) as stub:
            refused = await refusal(stub, str(uuid.uuid4()))
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        stop_cleanly(process)
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT to_regclass('credit.schema_migrations')") is None
    finally:
        await connection.close()


async def test_two_processes_starting_together_migrate_once(postgres_server_url: str, tmp_path: Path) -> None:
    database_url = await fresh_database(postgres_server_url, "credit_twins")
    first = credit_process(database_url, tmp_path / "first.log")
    second = credit_process(database_url, tmp_path / "second.log")
    with killed_at_exit(first, second):
        first.start()
        second.start()
        await asyncio.gather(
            wait_serving(first.address, SERVICE_NAME, timeout_s=START_TIMEOUT_S),
            wait_serving(second.address, SERVICE_NAME, timeout_s=START_TIMEOUT_S),
        )
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch("SELECT version, name FROM credit.schema_migrations ORDER BY version")
        finally:
            await connection.close()
        expected = [(m.version, m.name) for m in migrations.load("credit_service")]
        assert [(row["version"], row["name"]) for row in rows] == expected
        assert expected[0] == (1, "initial")
        # Each migration applied once, by one of the two.
        applied = [e for p in (first, second) for e in log_events(p) if e.get("event") == "migration_applied"]
        assert sorted(e["version"] for e in applied) == [version for version, _ in expected]

        # Both replicas serve the same books.
        owner = str(uuid.uuid4())
        async with credit_stub(first.address) as stub:
            await stub.GrantCredits(
                credit_pb2.GrantCreditsRequest(
                    request_id=str(uuid.uuid4()), owner_id=owner, amount=2, kind=credit_pb2.GRANT_KIND_PURCHASE
                )
            )
        async with credit_stub(second.address) as stub:
            balance = (await stub.GetBalance(credit_pb2.GetBalanceRequest(owner_id=owner))).balance
        assert balance.granted == 2
        stop_cleanly(first)
        stop_cleanly(second)


async def test_an_unreachable_database_keeps_the_process_up_but_not_serving(tmp_path: Path) -> None:
    unreachable = f"postgresql://postgres@/credit?host=/nonexistent-{uuid.uuid4().hex}"
    process = credit_process(unreachable, tmp_path / "credit.log")
    with killed_at_exit(process):
        process.start()
        event = await wait_for_log(process, lambda e: e.get("event") == "database_state_changed")
        assert event["state"] == "unreachable"
        assert await health_status(process.address, SERVICE_NAME) == "NOT_SERVING"
        async with credit_stub(process.address) as stub:
            refused = await refusal(stub, str(uuid.uuid4()))
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert refused.reason == "DATABASE_UNAVAILABLE"

        await asyncio.sleep(1.5)  # several readiness rounds later it still runs and still refuses
        assert process.process is not None
        assert process.process.poll() is None
        assert await health_status(process.address, SERVICE_NAME) == "NOT_SERVING"
        stop_cleanly(process)
