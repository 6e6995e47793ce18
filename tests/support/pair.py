"""A credit and a booking server of a test module's own, in-process, on fresh databases, for tests
that need servers no other module touches (counters from zero, tables nobody else writes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from booking.v1 import booking_pb2_grpc
from booking_service.config import BookingSettings
from booking_service.server import start as start_booking
from booking_service.servicer import SERVICE_NAME as BOOKING_SERVICE_NAME
from credit.v1 import credit_pb2_grpc
from credit_service.config import CreditSettings
from credit_service.server import start as start_credit
from credit_service.servicer import SERVICE_NAME as CREDIT_SERVICE_NAME
from service_kit.server import Runtime
from tests.support.auth import authorized_channel
from tests.support.stack import fresh_database, server_environment, wait_serving

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub


@dataclass
class Services:
    credit: Runtime
    booking: Runtime
    booking_stub: BookingServiceAsyncStub
    credit_stub: CreditServiceAsyncStub
    credit_db: asyncpg.Pool
    booking_db: asyncpg.Pool
    booking_database_url: str


@contextlib.asynccontextmanager
async def own_services(
    postgres_server_url: str,
    prefix: str,
    *,
    credit_env: Mapping[str, str],
    booking_env: Mapping[str, str],
    pool_max_size: int = 2,
) -> AsyncIterator[Services]:
    """Both servers (the booking one pointed at this credit one) with these settings, serving,
    with an authorized stub and a pool on each database."""
    credit_url, booking_url = await asyncio.gather(
        fresh_database(postgres_server_url, f"{prefix}_credit"),
        fresh_database(postgres_server_url, f"{prefix}_booking"),
    )
    credit = await start_credit(CreditSettings.from_environment(server_environment("CREDIT", credit_url, **credit_env)))
    booking = await start_booking(
        BookingSettings.from_environment(
            server_environment(
                "BOOKING", booking_url, **{"BOOKING_CREDIT_TARGET": f"127.0.0.1:{credit.port}", **booking_env}
            )
        )
    )
    booking_channel = authorized_channel(f"127.0.0.1:{booking.port}")
    credit_channel = authorized_channel(f"127.0.0.1:{credit.port}")
    credit_db = await asyncpg.create_pool(credit_url, min_size=1, max_size=pool_max_size)
    booking_db = await asyncpg.create_pool(booking_url, min_size=1, max_size=pool_max_size)
    assert credit_db is not None and booking_db is not None
    try:
        await wait_serving(f"127.0.0.1:{credit.port}", CREDIT_SERVICE_NAME)
        await wait_serving(f"127.0.0.1:{booking.port}", BOOKING_SERVICE_NAME)
        yield Services(
            credit,
            booking,
            booking_pb2_grpc.BookingServiceStub(booking_channel),
            credit_pb2_grpc.CreditServiceStub(credit_channel),
            credit_db,
            booking_db,
            booking_url,
        )
    finally:
        await booking_channel.close()
        await credit_channel.close()
        await credit_db.close()
        await booking_db.close()
        await booking.stop()
        await credit.stop()
