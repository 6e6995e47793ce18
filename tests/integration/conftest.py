"""Real services for integration tests, started in-process on 127.0.0.1:0 once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from credit.v1 import credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.server import Runtime
from tests.support.stack import fresh_database, server_environment, wait_serving


@pytest.fixture(scope="session")
async def credit_database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url, "credit_test")


@pytest.fixture(scope="session")
async def credit_server(credit_database_url: str) -> AsyncIterator[Runtime]:
    settings = CreditSettings.from_environment(
        server_environment("CREDIT", credit_database_url, CREDIT_SWEEP_INTERVAL_S="0.2")
    )
    runtime = await start_credit(settings)
    await wait_serving(f"127.0.0.1:{runtime.port}", CREDIT_SERVICE_NAME)
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="session")
def credit_address(credit_server: Runtime) -> str:
    return f"127.0.0.1:{credit_server.port}"


@pytest.fixture(scope="session")
async def credit_stub(credit_address: str) -> AsyncIterator[credit_pb2_grpc.CreditServiceStub]:
    async with grpc.aio.insecure_channel(credit_address) as channel:
        yield credit_pb2_grpc.CreditServiceStub(channel)


@pytest.fixture(scope="session")
async def credit_db(credit_database_url: str, credit_server: Runtime) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the credit database, for checking invariants from outside."""
    pool = await asyncpg.create_pool(credit_database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()
