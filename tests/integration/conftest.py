"""Real services for integration tests, started in-process on 127.0.0.1:0 once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from booking.v1 import booking_pb2_grpc
from booking_service.config import BookingSettings
from booking_service.server import start as start_booking
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from devstack.gateway import DEVELOPMENT_CORS_ORIGINS
from service_kit.server import Runtime
from tests.support.auth import authorized_channel
from tests.support.gateway import Gateway, running_gateway
from tests.support.stack import fresh_database, server_environment, wait_serving
from tests.support.world import World


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
    async with authorized_channel(credit_address) as channel:
        yield credit_pb2_grpc.CreditServiceStub(channel)


@pytest.fixture(scope="session")
async def credit_db(credit_database_url: str, credit_server: Runtime) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the credit database, for checking invariants from outside."""
    pool = await asyncpg.create_pool(credit_database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def booking_database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url, "booking_test")


@pytest.fixture(scope="session")
async def booking_server(booking_database_url: str, credit_address: str) -> AsyncIterator[Runtime]:
    settings = BookingSettings.from_environment(
        server_environment(
            "BOOKING",
            booking_database_url,
            BOOKING_CREDIT_TARGET=credit_address,
            # The shared server's reconciler leaves holds alone for a minute: tests that exercise
            # recovery start servers of their own with short bounds.
            BOOKING_RECONCILE_INTERVAL_S="0.5",
            BOOKING_OUTBOX_INTERVAL_S="0.2",
            # No video rooms here: a room turns ready while a test compares two reads of a booking.
            # test_side_effects.py starts servers of its own with each provider.
            BOOKING_VIDEO_PROVIDER="none",
        )
    )
    runtime = await start_booking(settings)
    await wait_serving(f"127.0.0.1:{runtime.port}", BOOKING_SERVICE_NAME)
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="session")
def booking_address(booking_server: Runtime) -> str:
    return f"127.0.0.1:{booking_server.port}"


@pytest.fixture(scope="session")
async def booking_stub(booking_address: str) -> AsyncIterator[booking_pb2_grpc.BookingServiceStub]:
    async with authorized_channel(booking_address) as channel:
        yield booking_pb2_grpc.BookingServiceStub(channel)


@pytest.fixture(scope="session")
async def booking_db(booking_database_url: str, booking_server: Runtime) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the booking database, for checking invariants from outside."""
    pool = await asyncpg.create_pool(booking_database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def world(
    booking_stub: booking_pb2_grpc.BookingServiceStub, credit_stub: credit_pb2_grpc.CreditServiceStub
) -> World:
    """A fresh therapist (open around the clock, UTC, no notice) and a client with 100 credits."""
    return await World.create(booking_stub, credit_stub)


@pytest.fixture(scope="session")
async def api_gateway(
    booking_address: str, credit_address: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    """The real Envoy in front of the session's services, configured as `make run` configures it
    (browsers allowed from the development origins), on ports of its own."""
    async with running_gateway(
        tmp_path_factory.mktemp("api-gateway"),
        booking_upstream=booking_address,
        credit_upstream=credit_address,
        cors_origins=DEVELOPMENT_CORS_ORIGINS,
    ) as started:
        yield started
